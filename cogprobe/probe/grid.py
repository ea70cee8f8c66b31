"""The adaptive k grid: score a coarse grid of k first, then only the k's where a curve moves by more
than its own noise.

Why: the shares are smooth in k, and the report and the selector read a few k's. On the quick
study's 8 dev pairs every k of 0..30 was scored, and no interval resolved anything; the same block
evaluations buy more where they are spent on fewer k's (issue 41).

The coarse grid at L = 30 blocks is 0-3, 5, 8, 10, 12, 16, 20, 24, 27-30; for other L its inner
points sit at the same fractions of L, and the first and last four k's are always in. So is `keep`:
the k's the caller reads (the study: the report's two k's and the fixed CogSym set's sizes), which
are then scored, never read off a neighbour.

Refinement, per (checkpoint, task, direction): between two neighbouring scored k's a < b with
b - a > 1, the midpoint (a + b) // 2 is scored when the share moves by more than the wider of the
two points' 95% interval half-widths (paired bootstrap over the pairs, `intervals.sweep_intervals`);
rounds repeat until no gap qualifies or every gap is adjacent. A point with no share (a checkpoint
that did not gain, the reference itself) refines nothing; an undefined half-width (one pair) counts
as 0, so the grid errs toward scoring more. A task's shuffled-source control is scored at its task's
k's, so conditional gain stays defined at every scored k.

Every row says how its k came in: `k_grid` is "coarse" or "refined" (a plain sweep's rows have no
k_grid: every k asked for was scored). Rows are appended per round, and what is still to score is
decided from the rows alone, so an interrupted sweep continues where it stopped and a finished
checkpoint is not loaded again. The in-memory engine (`sweep.FastEngine`) scores every round, one
runner for the whole sweep: the reference's prefixes and each checkpoint's are computed once. The
streamed engine (`probe.streamed`, chosen as for a plain sweep: `probe.fit`) gives the same rows and
holds no model: each round reads the blocks it needs from the files again (once per checkpoint per
round and group of batches), so it trades reads for memory.
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.core.distributed import world
from cogprobe.core.errors import CogprobeError
from cogprobe.core.intervals import sweep_intervals
from cogprobe.core.knob import with_changes
from cogprobe.core.layout import SWEEPS
from cogprobe.core.memory import process_peak
from cogprobe.data.evalset import EvalSet
from cogprobe.data.tasks import BATCH_SIZE, Example
from cogprobe.models.blocks import find_blocks
from cogprobe.probe.engine import iter_checkpoints
from cogprobe.probe.fit import STREAMABLE, block_count, sweep_engine
from cogprobe.probe.options import DIRECTIONS, DTYPES, SweepOptions
from cogprobe.probe.streamed import StreamedEngine
from cogprobe.probe.sweep import FastEngine, check_ks, engines_in, sweep, sweep_configs
from cogprobe.probe.tables import claim_table, open_checkpoints, out_dir, record_run, say_set, source_id
from cogprobe.tuning.checkpoints import Checkpoints

COARSE_AT_30 = (5, 8, 10, 12, 16, 20, 24)   # the inner coarse k's at L = 30, scaled for other L
EDGE = 3                                    # k = 0..3 and L-3..L: every coarse grid holds them
COARSE, REFINED = "coarse", "refined"       # the values of the k_grid column
CONTROL = "-shuffled"                       # a task's control: scored at the task's k's
KEYS = ["checkpoint_step", "task", "direction", "k"]


def coarse_grid(n_layers: int, keep: Iterable[int] = ()) -> list[int]:
    """The k's scored first for L = n_layers blocks (see the module docstring), `keep` included."""
    ends = set(range(min(EDGE, n_layers) + 1)) | set(range(max(0, n_layers - EDGE), n_layers + 1))
    inner = {round(k * n_layers / 30) for k in COARSE_AT_30}
    return check_ks(ends | inner | {int(k) for k in keep}, n_layers)


def half_widths(rows: pd.DataFrame) -> pd.Series:
    """Half the width of each row's 95% share interval (NaN where the row has no share)."""
    t = sweep_intervals(rows)
    return (t["share_high"] - t["share_low"]) / 2


def refinements(rows: pd.DataFrame, half: pd.Series | None = None) -> pd.DataFrame:
    """The rows to score next (checkpoint_step, task, direction, k): the midpoint of every gap between
    neighbouring scored k's across which the share moves by more than the wider half-width. `half`:
    the rows' half-widths if already known (`half_widths`)."""
    half = half_widths(rows) if half is None else half
    rows = rows.assign(half=half.fillna(0.0).to_numpy())
    found = []
    for (step, task, direction), g in rows[~rows["task"].str.endswith(CONTROL)].groupby(KEYS[:3]):
        g = g.drop_duplicates("k", keep="last").sort_values("k")
        ks, share, h = g["k"].astype(int).to_numpy(), g["share"].to_numpy(float), g["half"].to_numpy()
        for i in range(len(ks) - 1):
            moved = abs(share[i + 1] - share[i])   # NaN (no share) compares False: nothing to refine
            if ks[i + 1] - ks[i] > 1 and moved > max(h[i], h[i + 1]):
                found.append((step, task, direction, (ks[i] + ks[i + 1]) // 2))
    swept = set(zip(rows["checkpoint_step"], rows["task"], rows["direction"]))
    found += [(s, t + CONTROL, d, k) for s, t, d, k in found if (s, t + CONTROL, d) in swept]
    return pd.DataFrame(found, columns=KEYS)


def to_score(rows: pd.DataFrame, coarse: Sequence[int], tasks: Sequence[str], directions: Sequence[str],
             step: int, half: pd.Series | None = None) -> pd.DataFrame:
    """What one checkpoint still needs: its missing coarse rows, else the next round of refinement."""
    want = pd.DataFrame([(step, t, d, k) for t in tasks for d in directions for k in coarse], columns=KEYS)
    have = set(zip(rows["task"], rows["direction"], rows["k"].astype(int)))
    missing = want[[(t, d, k) not in have for t, d, k in zip(want["task"], want["direction"], want["k"])]]
    if len(missing) or rows.empty:
        return missing.reset_index(drop=True)
    new = refinements(rows, half)
    return new[[(t, d, k) not in have for t, d, k in zip(new["task"], new["direction"], new["k"])]]


def adaptive_sweep(checkpoints, examples: dict[str, list[Example]], *, mode: str = SweepOptions.mode,
                   directions: Sequence[str] = DIRECTIONS, ends: bool = SweepOptions.ends,
                   ks: Iterable[int] | None = SweepOptions.ks, keep: Iterable[int] = (), batch_size: int = BATCH_SIZE,
                   have: pd.DataFrame | None = None, on_rows=None, on_batch=None,
                   runner: StreamedEngine | None = None) -> pd.DataFrame:
    """A revert or skip sweep on the adaptive grid: the coarse grid of every checkpoint, then refined
    (see the module docstring). `checkpoints` as `sweep` takes them. `ks`: the coarse grid, if not
    `coarse_grid`'s (`keep` added either way). `have`: rows already scored (a resumed sweep; a
    checkpoint with nothing left to score is not loaded). `on_rows(rows)`: after each round (the
    folder verb appends there). `runner`: a `StreamedEngine` of `checkpoints` (a `Checkpoints`;
    `probe.fit.sweep_engine` makes one): every round reads its blocks from the files, the same rows;
    default: the in-memory engine. Returns `have` and the new rows, with attrs["block_evals"] (the new
    rows' cost) and attrs["ks"] ({(step, task, direction): the k's scored})."""
    opened = hasattr(checkpoints, "load")
    pairs = None if opened else list(checkpoints)
    if not opened and not pairs:
        raise CogprobeError("no checkpoints given; pass [(step, model), ...] with the reference first")
    if runner is not None and not opened:
        raise CogprobeError("the streamed engine reads checkpoints from their files; give a Checkpoints, not "
                            "models already in memory")
    n = block_count(checkpoints) if opened else find_blocks(pairs[0][1]).n
    coarse = coarse_grid(n, keep) if ks is None else check_ks({*ks, *keep}, n)
    tasks = list(examples)
    have = pd.DataFrame(columns=KEYS) if have is None else have.reset_index(drop=True)
    halves = half_widths(have) if len(have) else pd.Series(dtype=float)
    steps = list(checkpoints.steps) if opened else [s for s, _ in pairs]
    work = [s for s in steps if len(to_score(have[have["checkpoint_step"] == s], coarse, tasks, directions, s,
                                             halves[have["checkpoint_step"] == s]))]
    frames, used = [have], runner
    for step, source, used in _sources(checkpoints if opened else pairs, work, runner):
        done = have["checkpoint_step"] == step
        rows, half = have[done], halves[done]
        while len(todo := to_score(rows, coarse, tasks, directions, step, half)):
            new = _score(source, step, todo, examples, used, n, mode=mode, ends=ends, batch_size=batch_size,
                         on_batch=on_batch)
            new["k_grid"] = np.where(new["k"].isin(coarse), COARSE, REFINED)
            if on_rows is not None:
                on_rows(new)
            rows, half = pd.concat([rows, new], ignore_index=True), pd.concat([half, half_widths(new)],
                                                                              ignore_index=True)
            frames.append(new)
    table = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else have
    table.attrs["block_evals"] = used.counter.block_evals if used is not None else 0
    table.attrs["ks"] = {key: sorted(int(k) for k in g["k"]) for key, g in table.groupby(KEYS[:3])} if len(table) \
        else {}
    return table


def _sources(checkpoints, work: list[int], runner):
    """(step, what `sweep` scores it from, the engine) for each step of `work`, in step order. Streamed:
    the checkpoints themselves, read from the files in every round. In memory: each checkpoint loaded
    once, beside the reference, and one engine for the whole sweep (the reference's prefix states and
    each checkpoint's are computed once across its rounds)."""
    if isinstance(runner, StreamedEngine):
        yield from ((step, checkpoints, runner) for step in work)
        return
    if not work:
        return
    items = iter_checkpoints(checkpoints, work)
    ref_step, reference = next(items)
    engine = FastEngine(reference)
    if ref_step in work:
        yield ref_step, [(ref_step, reference)], engine
    for step, model in items:
        yield step, [(ref_step, reference), (step, model)], engine


def _score(source, step: int, todo: pd.DataFrame, examples, runner, n: int, *, mode, ends, batch_size,
           on_batch) -> pd.DataFrame:
    """The rows of `todo` (one checkpoint), one engine call per task: a task scores only its own k's."""
    frames = []
    engine = "streamed" if isinstance(runner, StreamedEngine) else "fast"
    for task, g in todo.groupby("task", sort=False):
        configs = [c for d, gd in g.groupby("direction", sort=False)
                   for c in sweep_configs(n, mode=mode, directions=[d], ks=gd["k"].tolist(), ends=ends)]
        frames.append(sweep(source, {task: examples[task]}, mode=mode, configs=configs, steps=[step], runner=runner,
                            remember=True, engine=engine, batch_size=batch_size, on_batch=on_batch))
    return pd.concat(frames, ignore_index=True)


def adaptive_sweep_run(source, options: SweepOptions | None = None, *, keep: Iterable[int] = (),
                       evalset: EvalSet | None = None, out=None, base=None, overwrite: bool = False, device=None,
                       log=print, checkpoints: Checkpoints | None = None, **changes) -> pd.DataFrame:
    """`sweep_run` on the adaptive grid: every checkpoint of a run into `sweeps.parquet`, each row with
    its `k_grid`; returns the whole table. `options.ks`, if given, is the coarse grid. A rerun
    continues (rows are appended per round). The table is claimed as `sweep_run` claims it (a table
    holds one precision); one that holds a plain sweep of this mode is refused (its k's were chosen
    otherwise). The engine is chosen as `sweep_run` chooses it (`--engine auto` streams the blocks
    where two models do not fit `--max-memory`) and recorded beside the table with what it measured.
    Under torchrun the main process scores and the others wait (the rounds depend on each other, and
    the grid is small)."""
    o = with_changes(SweepOptions, options, changes)
    if o.engine == "taylor":
        raise CogprobeError("the adaptive grid refines on exact shares and their intervals; use an exact engine")
    ckpts = checkpoints or open_checkpoints(source, base, device)
    with ckpts.precision(DTYPES[o.dtype]):
        return _adaptive_run(source, o, keep, ckpts, evalset, out, overwrite, log)


def _adaptive_run(source, o: SweepOptions, keep, ckpts: Checkpoints, evalset, out, overwrite, log) -> pd.DataFrame:
    w = world()
    out = out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    tok = ckpts.reference_tokenizer() if o.engine in STREAMABLE else ckpts.reference()[1]
    examples = evalset.examples(tok, o.tasks)
    say_set(evalset, tok, w, log)
    n = block_count(ckpts)
    coarse = coarse_grid(n, keep) if o.ks is None else check_ks({*o.ks, *keep}, n)
    engine, fit, runner = sweep_engine(o.engine, ckpts, dtype=DTYPES[o.dtype], max_memory=o.max_memory,
                                       examples=examples, batch_size=o.batch_size,
                                       n_configs=len(coarse) * len(o.directions) + 2)   # fails before a file is written
    precision = {"dtype": o.dtype} if o.dtype != "float32" else {}   # rows of two precisions never mix
    path = out / SWEEPS
    claim_table(out, SWEEPS, evalset, {**source_id(source, ckpts), **precision}, overwrite, w)
    have = _have(path, o.mode, o.ends, o.tasks, overwrite)   # every process checks, so all fail alike
    if w.is_main:
        save = lambda rows: io.append_parquet(path, rows)  # noqa: E731  (each round kept as it finishes)
        start = time.perf_counter()
        t = adaptive_sweep(ckpts, examples, mode=o.mode, directions=o.directions, ends=o.ends, ks=o.ks, keep=keep,
                           batch_size=o.batch_size, have=have, on_rows=save, runner=runner)
        engine = "memory" if engine in ("auto", "fast", "naive") else engine   # the in-memory engine scores
        if t.attrs["block_evals"]:   # what this call computed, beside the table (none: nothing was left)
            record_run(out, SWEEPS, dict(engine=engine, grid="adaptive", dtype=o.dtype, device=str(ckpts.device),
                                         seconds=round(time.perf_counter() - start, 1),
                                         peak_bytes=process_peak(ckpts.device), block_evals=t.attrs["block_evals"],
                                         fit=fit.record() if fit else None))
        log(f"sweep: adaptive grid, {engine} engine, {o.dtype}, "
            f"{len({k for ks in t.attrs['ks'].values() for k in ks})} k's scored "
            f"({t.attrs['block_evals']} block evaluations in this call)")
    w.barrier()
    return io.read_parquet(path)


def _have(path, mode: str, ends: bool, tasks, overwrite: bool) -> pd.DataFrame | None:
    """The rows of this mode, `ends` and tasks an earlier adaptive sweep left (None: none, or
    `overwrite`). Other tasks' rows are another sweep's (a study's controls at the k's its report
    reads, `sweep_controls_at = "read"`)."""
    if overwrite or not path.exists():
        return None
    t = io.read_parquet(path)
    if engines_in(t) - {"exact"}:
        raise CogprobeError(f"{path} holds {'/'.join(sorted(engines_in(t)))} sweep rows; the adaptive grid writes "
                            "exact rows: sweep into another folder (--out DIR) or pass --overwrite")
    t = t[(t["mode"] == mode) & (t["ends"] == ends) & t["task"].isin(list(tasks))]
    if len(t) and ("k_grid" not in t.columns or t["k_grid"].isna().any()):
        raise CogprobeError(f"{path} holds a {mode} sweep on a grid of its own (rows without k_grid); pass the "
                            "same options as before, another --out, or --overwrite")
    return t
