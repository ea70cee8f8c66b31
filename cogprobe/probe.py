"""Probing a run folder: sweeps, capture and layer selection, each writing its table there.

These are the functions behind `cogprobe sweep|capture|select RUN`. They score an
`EvalSet` (see `evalset`) built from the run's manifest (same corpus, columns and
split as training; a sample of the dev split by default, since what they find
drives decisions), so a run folder is all they need. Any other
checkpoint source (an HF Trainer folder, a list of model folders) works too,
given the corpus and an `out` folder.

Every table is appended per finished checkpoint and written atomically, so an
interrupted call loses at most one checkpoint's work and a rerun continues (under
torchrun / accelerate launch each process appends to its own part file, merged by
the main process at the end; see `sweep_run` and `capture_run`): a
checkpoint whose rows are already there (for the same mode and `ends`) is not
recomputed. The evaluation set and the checkpoints' source (a run's config and
base model) are recorded next to the table; a rerun with different ones, or a
sweep with other tasks, directions or ks, is refused unless `overwrite`. Bad
requests and data fail before anything is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cogprobe import io
from cogprobe.alignment import MIN_PAIRS, sentence_batches
from cogprobe.backends import check_sites
from cogprobe.blocks import find_blocks
from cogprobe.capture import capture_tables
from cogprobe.checkpoints import Checkpoints
from cogprobe.distributed import World, default_device, world
from cogprobe.errors import CogprobeError
from cogprobe.evalset import EvalSet
from cogprobe.layersets import check_fraction
from cogprobe.layout import ACTIVATIONS, ALIGNMENT, MANIFEST, SELECTION, SWEEPS, metadata, same
from cogprobe.progress import bar
from cogprobe.select import (Selection, budget_decider, curves_decider, select_budget, select_curves,
                             select_fixed, sweep_candidates)
from cogprobe.stability import stability
from cogprobe.sweep import DIRECTIONS, FastEngine, engine_label, engines_in, n_batches, sweep, sweep_configs
from cogprobe.tasks import TASKS, batches
from cogprobe.trainconfig import EXECUTION_ONLY


def open_checkpoints(source, base=None, device=None) -> Checkpoints:
    """`source` opened (unless it is a `Checkpoints` already), loading onto `device` (default: this
    process's CUDA device if any, else the CPU; a given `Checkpoints` keeps its own)."""
    if isinstance(source, Checkpoints):
        return source if device is None else source.to(device)
    return Checkpoints.open(source, base=base).to(device if device is not None else default_device())


def _out_dir(source, out) -> Path:
    if out is not None:
        return Path(out)
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        return Path(source)
    raise CogprobeError("these checkpoints are not a cogprobe run folder; pass --out DIR for the tables")


def _source_id(source, ckpts: Checkpoints) -> dict:
    """What a table's rows come from: a run's config and base model (so a moved run folder is the
    same run, a retrained one with other settings is not), else the checkpoint folders."""
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        manifest = io.read_json(Path(source) / MANIFEST)
        config = {k: v for k, v in manifest["config"].items() if k not in EXECUTION_ONLY}
        return dict(run=config, base=manifest["base"]["fingerprint"])
    return dict(checkpoints=ckpts.source)


def _claim_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool, w: World) -> None:
    """Refuse to mix rows of other checkpoints or another evaluation set into an existing table.

    Every process checks (so all fail alike); the main one writes, the others wait for it.
    """
    _check_table(out, table, evalset, source, overwrite)
    for part in w.parts(out / table) if not overwrite else ():  # a damaged part stops every rank alike
        if part.exists():
            io.read_parquet(part)
    if w.is_main:
        _start_table(out, table, evalset, source, overwrite)
    w.barrier()


def _want(evalset: EvalSet, source: dict) -> dict:
    return io.jsonable(dict(evalset.to_dict(), source=source))


def _check_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool) -> None:
    meta_path = metadata(out / table)
    want = _want(evalset, source)
    if (out / table).exists() and not overwrite:
        have = io.read_json(meta_path)  # a table without its metadata is refused too: where are its rows from?
        same(want, have, f"{out / table} holds rows of other checkpoints or another evaluation set",
             "pass the same run and options, another --out, or --overwrite to start the table again")


def _start_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool) -> None:
    meta_path, want = metadata(out / table), _want(evalset, source)
    if overwrite:
        (out / table).unlink(missing_ok=True)
        _drop_parts(out / table)
    if overwrite or not meta_path.exists() or io.read_json(meta_path) != want:  # overwrite: even a damaged one
        io.write_json(meta_path, want)


def _drop_parts(path: Path) -> None:
    for part in path.parent.glob(f".{path.name}.part-*"):
        part.unlink(missing_ok=True)


def _steps_in(path: Path) -> set[int]:
    return set(io.read_parquet(path)["checkpoint_step"].unique()) if path.exists() else set()


def _merge_parts(path: Path, w: World, todo: Sequence[int], tasks: Sequence[str] = (), keep=None) -> None:
    """Main process: append the ranks' parts to the table in single-process order (checkpoint, then
    task, then rank: each rank holds a contiguous share of the configurations, or whole checkpoints).

    Called by every process once its own part is complete; a no-op for one process (it writes the
    table directly). `keep(rows)`: a mask of the part rows that belong to this call (a sweep's mode).
    """
    w.barrier()
    if w.size > 1 and w.is_main:
        frames = [t for t in (io.read_parquet(p) for p in w.parts(path) if p.exists()) if len(t)]
        if frames:
            rows = pd.concat(frames, ignore_index=True)
            rows = rows[rows["checkpoint_step"].isin(todo) & (keep(rows) if keep else True)]
            step_pos = rows["checkpoint_step"].map({s: i for i, s in enumerate(todo)}).to_numpy()
            task_pos = (rows["task"].map({t: i for i, t in enumerate(tasks)}).to_numpy() if tasks
                        else np.zeros(len(rows)))
            io.append_parquet(path, rows.iloc[np.lexsort((task_pos, step_pos))].reset_index(drop=True))
        _drop_parts(path)
    w.barrier()


def sweep_run(source, *, mode: str = "revert", directions: Sequence[str] = DIRECTIONS, tasks: Sequence[str] = TASKS,
              ks: Sequence[int] | None = None, ends: bool = False, engine: str = "fast", batch_size: int = 8,
              evalset: EvalSet | None = None, out=None, base=None, overwrite: bool = False, device=None,
              log=print, progress: bool = True, checkpoints: Checkpoints | None = None,
              steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Revert/skip sweeps of every checkpoint (or of `steps`) into `sweeps.parquet`; returns the whole table.

    Launched on N processes (torchrun, accelerate launch), each sweeps a contiguous share of the
    configurations of every checkpoint into its own part file and the main process merges them:
    the table equals a single-process one row for row. `checkpoints`: `source` already opened
    (the study opens its probe run once for the sweep, capture and selection).
    """
    w = world()
    ckpts = checkpoints or open_checkpoints(source, base, device)
    out = _out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    reference, tok = ckpts.reference()
    configs = sweep_configs(find_blocks(reference).n, mode=mode, directions=directions, ks=ks, ends=ends)
    examples = evalset.examples(tok, tasks)
    _say_set(evalset, tok, w, log)
    _check_engine(out / SWEEPS, engine, overwrite)
    _claim_table(out, SWEEPS, evalset, _source_id(source, ckpts), overwrite, w)
    path = out / SWEEPS
    done = _done_steps(path, mode, ends, _grid(tasks, configs))
    todo = [s for s in ckpts.steps if s not in done and (steps is None or s in steps)]
    if not todo:
        if w.is_main:
            log(f"sweep: every checkpoint of {out} is already in {SWEEPS}")
        return io.read_parquet(path)
    part, share = w.part(path), w.chunk(configs)
    mine = [s for s in todo if s not in _done_steps(part, mode, ends, _grid(tasks, share))]

    def save(step, rows):
        io.append_parquet(part, rows)
        if w.is_main:
            log(f"sweep: step {step} done" + (f" (process 0 of {w.size})" if w.size > 1 else f" ({len(rows)} rows)"))

    if mine:
        with bar("sweep", total=len(mine) * n_batches(examples, batch_size), unit="batch",
                 enabled=progress) as ticks:
            sweep(ckpts, examples, mode=mode, configs=share, engine=engine, batch_size=batch_size,
                  steps=mine, on_checkpoint=save, on_batch=ticks.update)
    _merge_parts(path, w, todo, list(examples), keep=lambda t: (t["mode"] == mode) & (t["ends"] == ends))
    return io.read_parquet(path)


def _check_engine(path: Path, engine: str, overwrite: bool) -> None:
    """One engine per table: first-order estimates never join exact rows (nor the reverse)."""
    if path.exists() and not overwrite:
        have, want = engines_in(io.read_parquet(path)), engine_label(engine)
        if have and have != {want}:
            raise CogprobeError(f"{path} holds {'/'.join(sorted(have))} sweep rows and --engine {engine} writes "
                                f"{want} rows; sweep into another folder (--out DIR) or pass --overwrite")


def _say_set(evalset: EvalSet, tok, w: World, log) -> None:
    if w.is_main:
        r = evalset.report(tok)
        log(f"scoring {r['sampled']} {evalset.split} pairs per task from {r['documents']} documents "
            f"({r['dropped_long']} of {r['split_pairs']} left out: a side over {evalset.max_sentence_tokens} tokens)")


def _grid(tasks, configs) -> set[tuple]:
    return {(t, c.labels["direction"], c.labels["k"]) for t in tasks for c in configs}


def _done_steps(path: Path, mode: str, ends: bool, want: set[tuple]) -> set[int]:
    """Steps already swept (same mode, ends); refused if their (task, direction, k) rows are not `want`."""
    if not path.exists():
        return set()
    t = io.read_parquet(path)
    t = t[(t["mode"] == mode) & (t["ends"] == ends)]
    for step, rows in t.groupby("checkpoint_step"):
        if set(zip(rows["task"], rows["direction"], rows["k"].astype(int))) != want:
            raise CogprobeError(f"{path} holds a {mode} sweep of step {step} with other tasks, directions or ks; "
                                "pass the same options as before, another --out, or --overwrite")
    return set(t["checkpoint_step"].unique())


def capture_run(source, *, sites: Sequence[str] = ("resid",), backend: str = "torch", batch_size: int = 8,
                evalset: EvalSet | None = None, out=None, base=None, overwrite: bool = False,
                alignment: bool = True, device=None, log=print, progress: bool = True,
                checkpoints: Checkpoints | None = None) -> pd.DataFrame:
    """Drift, CKA, norms and logit lens of every checkpoint into `activations.parquet`, and (unless
    `alignment=False`) the cross-lingual alignment of its blocks into `alignment.parquet`.

    A checkpoint already in one table but not the other is captured for the missing one only. On N
    processes each captures every N-th checkpoint into its own part files; the main process merges
    them in checkpoint order (the same tables as one process writes). Returns the activations table.
    """
    w = world()
    ckpts = checkpoints or open_checkpoints(source, base, device)
    out = _out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    check_sites(sites)
    if alignment and "resid" not in sites:
        raise CogprobeError("alignment pools the residual stream: add resid to --sites, or pass --no-alignment")
    tok = ckpts.reference()[1]
    examples = evalset.examples(tok)  # bad data fails before anything is written
    _say_set(evalset, tok, w, log)
    if alignment and len(evalset.pairs(tok)) < MIN_PAIRS:
        alignment = False  # a study's tiny probe set still gets its activations
        if w.is_main:
            log(f"capture: alignment left out: it needs at least {MIN_PAIRS} pairs (--pairs)")
    sentences = sentence_batches(tok, evalset.pairs(tok), batch_size) if alignment else None
    tables = [ACTIVATIONS, ALIGNMENT] if alignment else [ACTIVATIONS]
    for table in tables:
        _claim_table(out, table, evalset, _source_id(source, ckpts), overwrite, w)
    todo = {t: [s for s in ckpts.steps if s not in _steps_in(out / t)] for t in tables}
    if not any(todo.values()):
        if w.is_main:
            log(f"capture: every checkpoint of {out} is already in {' and '.join(tables)}")
        return io.read_parquet(out / ACTIVATIONS)
    parts = {t: w.part(out / t) for t in tables}
    need = {t: [s for s in w.share(todo[t]) if s not in _steps_in(parts[t])] for t in tables}
    mine = [s for s in ckpts.steps if any(s in steps for steps in need.values())]
    if mine:
        with bar("capture", total=len(mine), unit="checkpoint", enabled=progress) as ticks:
            _capture_steps(ckpts, mine, examples, parts, need, sentences, sites=sites, backend=backend,
                           batch_size=batch_size, log=log if w.is_main else lambda _: None, on_step=ticks.update)
    for table in tables:
        _merge_parts(out / table, w, todo[table])
    return io.read_parquet(out / ACTIVATIONS)


def _capture_steps(ckpts: Checkpoints, steps, examples, parts: dict, need: dict, sentences, *, sites, backend,
                   batch_size, log, on_step=lambda: None) -> None:
    """Capture each of `steps` against the reference in one pass (the reference's activations
    computed once for all of them), appending each step's rows to the part files (`parts[table]`)
    of the tables that still `need` it, as the step finishes."""
    ref_step = ckpts.reference_step
    ref, tok = ckpts.load(ref_step)
    batched = {t: list(batches(sorted(ex, key=lambda e: -len(e.input_ids)), batch_size, pad_id=0))
               for t, ex in examples.items()}

    def models():
        yield ref_step, ref, tok
        for step in steps:
            if step != ref_step:
                yield step, ckpts.load(step)[0], tok

    def write(step, rows, aligned):
        if step not in steps:
            return   # the reference, passed through first but not wanted here
        if step in need[ACTIVATIONS]:
            io.append_parquet(parts[ACTIVATIONS], rows)
        if step in need.get(ALIGNMENT, ()):
            io.append_parquet(parts[ALIGNMENT], aligned)
        log(f"capture: step {step} done")
        on_step()

    with_alignment = sentences is not None and bool(need.get(ALIGNMENT))
    capture_tables(models(), batched, sentences if with_alignment else None, sites=sites, backend=backend, log=log,
             task_steps=need[ACTIVATIONS], align_steps=need.get(ALIGNMENT, []) if with_alignment else None,
             on_checkpoint=write)


def select_run(source, *, rule: str = "budget", tau: float = 0.8, fraction: float = 0.25, step: int | None = None,
               input_task: str = "perception", output_task: str = "production", max_total: int | None = None,
               criterion: str = "remove", batch_size: int = 8, evalset: EvalSet | None = None, out=None, base=None,
               name: str = SELECTION, device=None, log=print, search: str = "frontier", progress: bool = True,
               checkpoints: Checkpoints | None = None, by_tau: bool = False) -> Selection:
    """A CogSym layer set by `rule` (fixed | curves | budget, or a cheap ranking of `rank`: the top
    blocks of rankings.parquet, CogSym's size unless `by_tau`), written to `selection.json`.

    The budget rule reads the candidates that `sweeps.parquet` in `out` already scored (a revert
    sweep without --ends of the same checkpoint, tasks and evaluation set), instead of scoring them
    again, and searches the rest by `search` (frontier | exhaustive, see `select_budget`)."""
    check_fraction(tau, "tau")
    if not str(name).endswith(".json"):
        raise CogprobeError(f"selection name {name!r} must end in .json (that is how --layers recognises it)")
    from cogprobe.rank import RANKINGS, select_ranking_run
    if rule in RANKINGS:
        selection = select_ranking_run(source, rule, out=out, step=step, fraction=fraction,
                                       tau=tau if by_tau else None)
        io.write_json(_out_dir(source, out) / name, selection.to_json())
        return selection
    if rule not in ("fixed", "curves", "budget"):
        raise CogprobeError(f"unknown rule {rule!r}; use fixed, curves, budget or a ranking ({', '.join(RANKINGS)})")
    ckpts = checkpoints or open_checkpoints(source, base, device)
    out = _out_dir(source, out)
    n_layers = ckpts.reference()[0].config.get_text_config().num_hidden_layers
    record: dict = {}
    if rule == "fixed":
        selection = select_fixed(n_layers, fraction)
    elif rule == "curves":
        if not (out / SWEEPS).exists():
            raise CogprobeError(f"no {SWEEPS} in {out}; run `cogprobe sweep {source}` first, or use --rule fixed")
        sweeps = io.read_parquet(out / SWEEPS)
        selection = select_curves(sweeps, tau=tau, step=step, input_task=input_task, output_task=output_task,
                                  n_layers=n_layers, criterion=criterion)
        meta = metadata(out / SWEEPS)
        record["evalset"] = {k: v for k, v in io.read_json(meta).items() if k != "source"} if meta.is_file() else None
        rows = sweeps[(sweeps["mode"] == "revert") & (sweeps["checkpoint_step"] == selection.params["step"])]
        selection.stability = _stability(curves_decider(tau, input_task=input_task, output_task=output_task,
                                                        n_layers=n_layers, criterion=criterion), selection, rows)
    else:
        evalset = evalset or EvalSet.for_run(source)
        step = ckpts.steps[-1] if step is None else step
        known = _swept_candidates(out, evalset, _source_id(source, ckpts), step, n_layers)
        with bar("select budget", total=None, unit="candidate", enabled=progress) as ticks:
            selection, rows = _budget(ckpts, n_layers, tau=tau, step=step, max_total=max_total,
                                      batch_size=batch_size, evalset=evalset, known=known, search=search,
                                      log=log, on_scored=ticks.update)
        record["evalset"] = evalset.to_dict()
        pairs = [(c["k_in"], c["k_out"]) for c in selection.candidates]
        selection.stability = _stability(budget_decider(tau, selection.params["tasks"], pairs), selection, rows)
    io.write_json(out / name, {**selection.to_json(), **record})
    return selection


def _stability(decide, selection: Selection, rows: pd.DataFrame) -> dict | None:
    """The rule rerun on resamples of the probe pairs (None for tables written before per-example scores)."""
    if "example_nll" not in rows.columns or rows["example_nll"].isna().any():
        return None
    return stability(decide, rows.reset_index(drop=True), (selection.k_in, selection.k_out))


def _swept_candidates(out: Path, evalset: EvalSet, source: dict, step: int, n_layers: int) -> pd.DataFrame | None:
    """The budget candidates the sweep table in `out` holds for `step` (None if it holds none of
    this evaluation set and these checkpoints, or lacks a task or a per-example column)."""
    path = out / SWEEPS
    if not path.exists() or not metadata(path).is_file():
        return None
    if io.read_json(metadata(path)) != _want(evalset, source):
        return None
    rows = sweep_candidates(io.read_parquet(path), step, n_layers)
    rows = rows[rows["task"].isin(TASKS)]
    if set(rows["task"]) != set(TASKS) or rows["example_nll"].isna().any():
        return None
    return rows


def _budget(ckpts: Checkpoints, n_layers: int, *, tau, step, max_total, batch_size, evalset, known, search,
            log, on_scored) -> tuple[Selection, pd.DataFrame]:
    """The budget set and every keep-outer row it read or scored (their per-example scores feed the
    stability check)."""
    if step == ckpts.reference_step:
        raise CogprobeError("the budget rule needs a trained checkpoint besides the reference; train longer "
                            "or pass --step")
    ref, tok = ckpts.load(ckpts.reference_step)
    model = ckpts.load(step)[0]
    examples = evalset.examples(tok)
    runner = FastEngine(ref)  # one engine for the whole search: reference prefixes are scored once

    scored = [] if known is None else [known]

    def evaluate(pairs):
        log(f"select: scoring {len(pairs)} candidate(s): {pairs}")
        t = sweep([(ckpts.reference_step, ref), (step, model)], examples, mode="keep-outer", keep_outer=pairs,
                  batch_size=batch_size, steps=[step], runner=runner, remember=True)
        scored.append(t[t["checkpoint_step"] == step])
        on_scored(len(pairs))
        return scored[-1]

    selection = select_budget(evaluate, n_layers, tau=tau, max_total=max_total, search=search, known=known)
    return selection, pd.concat(scored, ignore_index=True)
