"""Pairs where they pay: the probe scores its pairs in chunks until its intervals are narrow enough.

Why (issue 41): a probe's findings are read at a few k's, and what decides whether one resolves is
the width of its interval there, which shrinks as 1/sqrt(pairs). A fixed pair count is either too
few (nothing resolves: the quick study at 8 pairs) or more than the question needed. So, with a
study's `probe_chunk` > 0:

  - the probe's sample of `probe_pairs` dev pairs is cut into chunks of `probe_chunk` (windows of one
    sample in a seeded order, `EvalSet.window`: the first m pairs are a random subsample of it);
  - each chunk is swept into its own folder (probe-chunks/chunk-J/), the first on the study's grid
    (the adaptive grid's refinement decided on it), the later ones at the k's the first scored;
  - after each chunk the chunks so far are read as one table (`probe.chunks.union`, exactly the
    sweep of their pairs) and, at the k's the report and the selector read of the last checkpoint,
    each task and direction whose share is defined gives its 95% half-width (`grid.half_widths`);
  - the probe stops at the first of: every one of those half-widths at most `probe_half_width`
    ("narrow"); the next chunk, at the mean time of the chunks so far, would take the sweeping past
    `probe_seconds` ("budget"; 0: no budget); every pair scored ("all pairs").

The union becomes the study's sweeps.parquet, recorded for the set of the pairs used (the window
(0, m)), which capture and the budget selection then score too. `probe_pairs.json` records the rule,
each chunk (pairs so far, seconds, widest half-width) and why it stopped; a rerun reads the decision
there and does not decide again (the budget depends on the machine's speed, a decision must not).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import PROBE_PAIRS, SWEEPS, metadata
from cogprobe.data.evalset import EvalSet
from cogprobe.probe.chunks import union
from cogprobe.probe.grid import half_widths
from cogprobe.probe.tables import COMPUTED

NARROW, BUDGET, ALL = "narrow", "budget", "all pairs"
CHUNKS = "probe-chunks"


def used_set(whole: EvalSet, out: Path) -> EvalSet | None:
    """The set of the pairs a finished sequential probe used (None before it decided), checked against
    the set the sweeps table records: the two files must name the same pairs."""
    path = Path(out) / PROBE_PAIRS
    record = io.read_json(path) if path.is_file() else {}
    if "stopped" not in record:
        return None
    used = dataclasses.replace(whole, window=(0, record["pairs"]))
    table = metadata(Path(out) / SWEEPS)
    swept = io.read_json(table).get("window") if table.is_file() else None
    if swept is not None and tuple(swept) != used.window:
        raise CogprobeError(f"{path} says the probe used pairs {used.window} but {table} records {tuple(swept)}; "
                            f"delete both (and {CHUNKS}/) to probe again")
    return used


def probe(whole: EvalSet, out: Path, *, chunk: int, half_width: float, seconds: float, read_ks: list[int],
          sweep: Callable[[EvalSet, Path, list[int] | None], pd.DataFrame]) -> EvalSet:
    """Sweep the chunks of `whole` with `sweep(evalset, folder, ks)` (ks None: the study's grid; else these
    k's) until the rule stops; write their union as `out`/sweeps.parquet; the set of the pairs used."""
    out, n = Path(out), int(whole.n)
    record = io.read_json(out / PROBE_PAIRS) if (out / PROBE_PAIRS).is_file() else {}
    record = {**record, "rule": dict(chunk=chunk, half_width=half_width, seconds=seconds, pairs=n, read_ks=read_ks)}
    done = record.get("chunks", [])
    tables, ks = [], None
    for j, start in enumerate(range(0, n, chunk)):
        if "stopped" in record and j * chunk >= record["pairs"]:
            break
        window = dataclasses.replace(whole, window=(start, min(start + chunk, n)))
        began = time.perf_counter()
        tables.append(sweep(window, out / CHUNKS / f"chunk-{j}", ks))
        ks = ks or sorted({int(k) for k in tables[0]["k"]})
        if j < len(done):   # decided before (a rerun): the record stands
            continue
        widest = _widest(union(tables), read_ks)
        done.append(dict(pairs=window.window[1], seconds=round(time.perf_counter() - began, 1), widest=widest))
        record["chunks"] = done
        stop = stop_reason(done, widest, half_width, seconds, n)
        if stop:
            record.update(stopped=stop, pairs=window.window[1])
        io.write_json(out / PROBE_PAIRS, record)
        if stop:
            break
    used = dataclasses.replace(whole, window=(0, record["pairs"]))
    _write_union(union(tables), used, out, [out / CHUNKS / f"chunk-{j}" for j in range(len(tables))])
    return used


def _widest(table: pd.DataFrame, read_ks: list[int]) -> float | None:
    """The widest 95% share half-width at the read k's of the last checkpoint's tasks (no controls), over
    the rows whose share is defined; None where none is."""
    rows = table[~table["task"].str.endswith("-shuffled") & table["k"].isin(read_ks)
                 & (table["checkpoint_step"] == table["checkpoint_step"].max())]
    widths = half_widths(rows.reset_index(drop=True)).to_numpy(float)
    widths = widths[np.isfinite(widths)]
    return float(widths.max()) if len(widths) else None


def stop_reason(done: list[dict], widest: float | None, half_width: float, seconds: float, n: int) -> str | None:
    """Why the probe stops after the chunks `done`, or None to go on (the module docstring's rule)."""
    if widest is not None and widest <= half_width:
        return NARROW
    if done[-1]["pairs"] >= n:
        return ALL
    spent = sum(c["seconds"] for c in done)
    if seconds and spent + spent / len(done) > seconds:
        return BUDGET
    return None


def _write_union(table: pd.DataFrame, used: EvalSet, out: Path, folders: list[Path]) -> None:
    """The chunks' union as the study's sweeps table, its record that of one sweep of the pairs used (the
    first chunk's checkpoints' source) and every chunk's computed records."""
    first = io.read_json(metadata(folders[0] / SWEEPS))
    computed = [c for f in folders for c in io.read_json(metadata(f / SWEEPS)).get(COMPUTED, [])]
    io.write_parquet(out / SWEEPS, table)
    io.write_json(metadata(out / SWEEPS), {**io.jsonable(dict(used.to_dict(), source=first["source"])),
                                           COMPUTED: computed})


def words(record: dict) -> str:
    """The rule and where it stopped, for the report."""
    rule, chunks = record["rule"], record.get("chunks", [])
    why = {NARROW: f"every share half-width at the read k's was at most {rule['half_width']:.2f}",
           BUDGET: f"a further chunk would pass the {rule['seconds']:g} s budget",
           ALL: "every pair was scored"}.get(record.get("stopped"), "not finished")
    widest = chunks[-1]["widest"] if chunks else None
    return (f"the probe scored its pairs in chunks of {rule['chunk']} of {rule['pairs']} and stopped at "
            f"{record.get('pairs', '?')} pairs: {why}"
            + (f" (widest half-width {widest:.2f})" if widest is not None else " (no share defined there)"))
