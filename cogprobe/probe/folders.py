"""Probing a run folder: sweeps and capture, each writing its table there.

These are the functions behind `cogprobe sweep|capture RUN` (selection: `selection.folders`). They score an
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

import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from cogprobe.core import io
from cogprobe.core.distributed import world
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import with_changes
from cogprobe.core.layout import ACTIVATIONS, ALIGNMENT, SWEEPS
from cogprobe.core.memory import gib, process_peak
from cogprobe.core.progress import bar
from cogprobe.data.evalset import EvalSet
from cogprobe.probe.alignment import MIN_PAIRS, sentence_batches
from cogprobe.probe.backends import check_sites
from cogprobe.probe.capture import capture_tables, task_batches
from cogprobe.probe.fit import STREAMABLE, block_count, capture_engine, sweep_engine
from cogprobe.probe.options import DTYPES, CaptureOptions, SweepOptions
from cogprobe.probe.streamed_acts import Streaming
from cogprobe.probe.engine import n_batches
from cogprobe.probe.sweep import engine_label, engines_in, sweep, sweep_configs
from cogprobe.probe.tables import (claim_table, merge_parts, open_checkpoints, out_dir, record_run, say_set, source_id,
                                   steps_in)
from cogprobe.tuning.checkpoints import Checkpoints


def sweep_run(source, options: SweepOptions | None = None, *, evalset: EvalSet | None = None, out=None, base=None,
              overwrite: bool = False, device=None, log=print, progress: bool = True,
              checkpoints: Checkpoints | None = None, steps: Sequence[int] | None = None, **changes) -> pd.DataFrame:
    """Revert/skip sweeps of every checkpoint (or of `steps`) into `sweeps.parquet`; returns the whole table.

    Launched on N processes (torchrun, accelerate launch), each sweeps a contiguous share of the
    configurations of every checkpoint into its own part file and the main process merges them:
    the table equals a single-process one row for row. `checkpoints`: `source` already opened
    (the study opens its probe run once for the sweep, capture and selection). `changes`: fields of
    `SweepOptions` given as keywords (`sweep_run(run, mode="skip")`), on top of `options`.
    The engine that ran, the precision and the peak memory are recorded beside the table (`computed`).
    """
    o = with_changes(SweepOptions, options, changes)
    ckpts = checkpoints or open_checkpoints(source, base, device)
    with ckpts.precision(DTYPES[o.dtype]):
        return _sweep_run(source, o, ckpts, evalset, out, overwrite, log, progress, steps)


def _sweep_run(source, o: SweepOptions, ckpts: Checkpoints, evalset, out, overwrite, log, progress, steps):
    mode, tasks, ends, engine, batch_size = o.mode, o.tasks, o.ends, o.engine, o.batch_size
    w = world()
    out = out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    tok = ckpts.reference_tokenizer() if engine in STREAMABLE else ckpts.reference()[1]
    configs = sweep_configs(block_count(ckpts), mode=mode, directions=o.directions, ks=o.ks, ends=ends)
    examples = evalset.examples(tok, tasks)
    say_set(evalset, tok, w, log)
    _check_engine(out / SWEEPS, engine, overwrite)
    engine, fit, _ = sweep_engine(engine, ckpts, dtype=DTYPES[o.dtype], max_memory=o.max_memory, examples=examples,
                                  batch_size=batch_size, n_configs=len(configs) + 2)   # fails before a file is written
    precision = {"dtype": o.dtype} if o.dtype != "float32" else {}   # rows of two precisions never mix
    claim_table(out, SWEEPS, evalset, {**source_id(source, ckpts), **precision}, overwrite, w)
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
        start = time.perf_counter()
        with bar("sweep", total=len(mine) * n_batches(examples, batch_size), unit="batch",
                 enabled=progress) as ticks:
            table = sweep(ckpts, examples, mode=mode, configs=share, engine=engine, batch_size=batch_size,
                          steps=mine, on_checkpoint=save, on_batch=ticks.update, max_memory=o.max_memory)
        ran = dict(engine=table.attrs["engine"], dtype=o.dtype, device=str(ckpts.device), steps=mine,
                   seconds=round(time.perf_counter() - start, 1), peak_bytes=process_peak(ckpts.device),
                   block_evals=table.attrs["block_evals"], fit=table.attrs["fit"] or (fit.record() if fit else None))
        if w.is_main:
            record_run(out, SWEEPS, ran)
            log(f"sweep: {ran['engine']} engine, {o.dtype}, peak {gib(ran['peak_bytes'])}")
    merge_parts(path, w, todo, list(examples), keep=lambda t: (t["mode"] == mode) & (t["ends"] == ends))
    return io.read_parquet(path)


def _check_engine(path: Path, engine: str, overwrite: bool) -> None:
    """One engine per table: first-order estimates never join exact rows (nor the reverse)."""
    if path.exists() and not overwrite:
        have, want = engines_in(io.read_parquet(path)), engine_label(engine)
        if have and have != {want}:
            raise CogprobeError(f"{path} holds {'/'.join(sorted(have))} sweep rows and --engine {engine} writes "
                                f"{want} rows; sweep into another folder (--out DIR) or pass --overwrite")


def _grid(tasks, configs) -> set[tuple]:
    return {(t, c.labels["direction"], c.labels["k"]) for t in tasks for c in configs}


def _done_steps(path: Path, mode: str, ends: bool, want: set[tuple]) -> set[int]:
    """Steps already swept (same mode, ends, tasks); refused if their (task, direction, k) rows are not
    `want`. Rows of other tasks are another sweep's: the study sweeps the shuffled-source controls at
    fewer k's than their tasks (`sweep_controls_at = "read"`) into the same table."""
    if not path.exists():
        return set()
    t = io.read_parquet(path)
    t = t[(t["mode"] == mode) & (t["ends"] == ends) & t["task"].isin({task for task, _, _ in want})]
    for step, rows in t.groupby("checkpoint_step"):
        if set(zip(rows["task"], rows["direction"], rows["k"].astype(int))) != want:
            raise CogprobeError(f"{path} holds a {mode} sweep of step {step} with other tasks, directions or ks; "
                                "pass the same options as before, another --out, or --overwrite")
    return set(t["checkpoint_step"].unique())


def capture_run(source, options: CaptureOptions | None = None, *, evalset: EvalSet | None = None, out=None,
                base=None, overwrite: bool = False, device=None, log=print, progress: bool = True,
                checkpoints: Checkpoints | None = None, **changes) -> pd.DataFrame:
    """Drift, CKA, norms and logit lens of every checkpoint into `activations.parquet`, and (unless
    `alignment=False`) the cross-lingual alignment of its blocks into `alignment.parquet`.

    A checkpoint already in one table but not the other is captured for the missing one only. On N
    processes each captures every N-th checkpoint into its own part files; the main process merges
    them in checkpoint order (the same tables as one process writes). Returns the activations table.
    `changes`: fields of `CaptureOptions` given as keywords, on top of `options`.
    """
    o = with_changes(CaptureOptions, options, changes)
    ckpts = checkpoints or open_checkpoints(source, base, device)
    with ckpts.precision(DTYPES[o.dtype]):
        return _capture_run(source, o, ckpts, evalset, out, overwrite, log, progress)


def _capture_run(source, o: CaptureOptions, ckpts: Checkpoints, evalset, out, overwrite, log, progress):
    sites, backend, alignment, batch_size = o.sites, o.backend, o.alignment, o.batch_size
    w = world()
    out = out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    check_sites(sites)
    if alignment and "resid" not in sites:
        raise CogprobeError("alignment pools the residual stream: add resid to --sites, or pass --no-alignment")
    tok = ckpts.reference_tokenizer() if o.engine in STREAMABLE else ckpts.reference()[1]
    examples = evalset.examples(tok)  # bad data fails before anything is written
    say_set(evalset, tok, w, log)
    if alignment and len(evalset.pairs(tok)) < MIN_PAIRS:
        alignment = False  # a study's tiny probe set still gets its activations
        if w.is_main:
            log(f"capture: alignment left out: it needs at least {MIN_PAIRS} pairs (--pairs)")
    sentences = sentence_batches(tok, evalset.pairs(tok), batch_size) if alignment else None
    streaming, chosen = capture_engine(o, ckpts, examples)   # a budget too small fails before a file is written
    tables = [ACTIVATIONS, ALIGNMENT] if alignment else [ACTIVATIONS]
    precision = {"dtype": o.dtype} if o.dtype != "float32" else {}   # rows of two precisions never mix
    for table in tables:
        claim_table(out, table, evalset, {**source_id(source, ckpts), **precision}, overwrite, w)
    todo = {t: [s for s in ckpts.steps if s not in steps_in(out / t)] for t in tables}
    if not any(todo.values()):
        if w.is_main:
            log(f"capture: every checkpoint of {out} is already in {' and '.join(tables)}")
        return io.read_parquet(out / ACTIVATIONS)
    parts = {t: w.part(out / t) for t in tables}
    need = {t: [s for s in w.share(todo[t]) if s not in steps_in(parts[t])] for t in tables}
    mine = [s for s in ckpts.steps if any(s in steps for steps in need.values())]
    if mine:
        start = time.perf_counter()
        with bar("capture", total=len(mine), unit="checkpoint", enabled=progress) as ticks:
            _capture_steps(ckpts, mine, examples, parts, need, sentences, sites=sites, backend=backend,
                           batch_size=batch_size, log=log if w.is_main else lambda _: None, on_step=ticks.update,
                           streaming=streaming)
        ran = dict(engine="streamed" if streaming else "memory", backend="torch" if streaming else backend,
                   dtype=o.dtype, device=str(ckpts.device), steps=mine,
                   seconds=round(time.perf_counter() - start, 1), peak_bytes=process_peak(ckpts.device),
                   fit=chosen.record() if chosen else None)
        if w.is_main:
            for table in tables:
                record_run(out, table, ran)
    for table in tables:
        merge_parts(out / table, w, todo[table])
    return io.read_parquet(out / ACTIVATIONS)


def _capture_steps(ckpts: Checkpoints, steps, examples, parts: dict, need: dict, sentences, *, sites, backend,
                   batch_size, log, on_step=lambda: None, streaming: Streaming | None = None) -> None:
    """Capture each of `steps` against the reference in one pass (the reference's activations
    computed once for all of them), appending each step's rows to the part files (`parts[table]`)
    of the tables that still `need` it, as the step finishes. `streaming`: no model is loaded whole."""
    ref_step = ckpts.reference_step
    batched = task_batches(examples, batch_size)

    def models():
        ref, tok = ckpts.load(ref_step)
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
    if streaming is not None:
        streaming.steps = steps
    capture_tables(ckpts if streaming is not None else models(), batched, sentences if with_alignment else None,
                   sites=sites, backend=backend, log=log, task_steps=need[ACTIVATIONS],
                   align_steps=need.get(ALIGNMENT, []) if with_alignment else None, on_checkpoint=write,
                   streaming=streaming, tokenizer=ckpts.reference_tokenizer())
