"""The table protocol the folder verbs share (sweep, capture, select, rank).

A table in an output folder is claimed for one evaluation set and one source of checkpoints (a
run's config and base model, or the checkpoint folders): the record beside it says which, and a
rerun with other ones is refused unless `overwrite`. Rows are appended per finished checkpoint;
under torchrun each process appends to its own part file, and the main process merges the parts
in single-process order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.core.distributed import World, default_device
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import MANIFEST, metadata, same
from cogprobe.data.corpora import dropped_note
from cogprobe.data.evalset import EvalSet
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.tuning.config import EXECUTION_ONLY, current


def open_checkpoints(source, base=None, device=None) -> Checkpoints:
    """`source` opened (unless it is a `Checkpoints` already), loading onto `device` (default: this
    process's CUDA device if any, else the CPU; a given `Checkpoints` keeps its own)."""
    if isinstance(source, Checkpoints):
        return source if device is None else source.to(device)
    return Checkpoints.open(source, base=base).to(device if device is not None else default_device())


def out_dir(source, out) -> Path:
    if out is not None:
        return Path(out)
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        return Path(source)
    raise CogprobeError("these checkpoints are not a cogprobe run folder; pass --out DIR for the tables")


def source_id(source, ckpts: Checkpoints) -> dict:
    """What a table's rows come from: a run's config and base model (so a moved run folder is the
    same run, a retrained one with other settings is not), else the checkpoint folders."""
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        manifest = io.read_json(Path(source) / MANIFEST)
        config = {k: v for k, v in current(manifest["config"]).items() if k not in EXECUTION_ONLY}
        return dict(run=config, base=manifest["base"]["fingerprint"])
    return dict(checkpoints=ckpts.source)


def claim_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool, w: World) -> None:
    """Refuse to mix rows of other checkpoints or another evaluation set into an existing table.

    Every process checks (so all fail alike); the main one writes, the others wait for it.
    """
    check_table(out, table, evalset, source, overwrite)
    for part in w.parts(out / table) if not overwrite else ():  # a damaged part stops every rank alike
        if part.exists():
            io.read_parquet(part)
    if w.is_main:
        start_table(out, table, evalset, source, overwrite)
    w.barrier()


COMPUTED = "computed"   # how each call computed its rows (engine, precision, peak memory): not the identity


def identity(meta: dict) -> dict:
    """What a table's rows depend on: its metadata without the record of how they were computed, the
    run it names in today's key names (a table of an older run stays that run's)."""
    found = {k: v for k, v in meta.items() if k != COMPUTED}
    if "run" in found.get("source", {}):
        found["source"] = {**found["source"], "run": current(found["source"]["run"])}
    return found


def record_run(out: Path, table: str, ran: dict) -> None:
    """Add one call's record (which engine ran, its peak memory, ...) to the table's metadata."""
    path = metadata(out / table)
    meta = io.read_json(path)
    meta[COMPUTED] = [*meta.get(COMPUTED, []), io.jsonable(ran)]
    io.write_json(path, meta)


def wanted(evalset: EvalSet, source: dict) -> dict:
    return io.jsonable(dict(evalset.to_dict(), source=source))


def check_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool) -> None:
    meta_path = metadata(out / table)
    want = wanted(evalset, source)
    if (out / table).exists() and not overwrite:
        have = identity(io.read_json(meta_path))  # a table without its metadata is refused too
        same(want, have, f"{out / table} holds rows of other checkpoints or another evaluation set",
             "pass the same run and options, another --out, or --overwrite to start the table again")


def start_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool) -> None:
    meta_path, want = metadata(out / table), wanted(evalset, source)
    if overwrite:
        (out / table).unlink(missing_ok=True)
        drop_parts(out / table)
    if overwrite or not meta_path.exists() or identity(io.read_json(meta_path)) != want:  # overwrite: even a damaged one
        io.write_json(meta_path, want)


def drop_parts(path: Path) -> None:
    for part in path.parent.glob(f".{path.name}.part-*"):
        part.unlink(missing_ok=True)


def steps_in(path: Path) -> set[int]:
    return set(io.read_parquet(path)["checkpoint_step"].unique()) if path.exists() else set()


def merge_parts(path: Path, w: World, todo: Sequence[int], tasks: Sequence[str] = (), keep=None) -> None:
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
        drop_parts(path)
    w.barrier()


def say_set(evalset: EvalSet, tok, w: World, log) -> None:
    if w.is_main:
        r = evalset.report(tok)
        note = dropped_note(evalset.splits().train)
        log(f"scoring {r['sampled']} {evalset.split} pairs per task from {r['documents']} documents "
            f"({r['dropped_long']} of {r['split_pairs']} left out: a side over {evalset.max_sentence_tokens} tokens)"
            + (f"; {note}" if note else ""))
