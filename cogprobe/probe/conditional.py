"""The conditional-gain view of a sweep table: localisation of the gain that uses the source.

A sweep scores each task's NLL, so its curves locate the *total* gain of fine-tuning, and most of
that gain does not depend on the source sentence: with each source replaced by another pair's (the
shuffled-source controls, `data.tasks.CONTROLS`), the model keeps most of it (it has learnt the
target language's form, not the translation). The *conditional gain* of a model is
NLL(shuffled source) - NLL(true source): how much its prediction uses the source.

`conditional_rows` turns each task row and its control row (same checkpoint, configuration and
pairs) into one row of the same schema in which every NLL column holds NLL(true) - NLL(shuffled),
the conditional gain negated, per example too. A drop in that quantity is a rise in source use, as
a drop in NLL is a gain, so every consumer of a sweep table (the curves and budget rules, their
stability resamples, the report's intervals) reads it unchanged and then locates the
source-dependent gain: the share is (reference - value) / (reference - checkpoint) of the rise in
conditional gain. The rows say so in a `gain` column ("conditional"; a plain table's rows are the
"total" gain).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import CONTROLS

GAINS = ("total", "conditional")
SCALARS = ("nll", "nll_reference", "nll_checkpoint")
ARRAYS = ("example_nll", "reference_example_nll", "checkpoint_example_nll")
# what differs between a task's row and its control's, besides the task (k_grid: an adaptive grid
# may have marked the same k coarse in one and refined in the other); the rest must match
VALUES = {"task", "share", "n_tokens", "example_tokens", "k_grid", "gain", *SCALARS, *ARRAYS}


def conditional_rows(table: pd.DataFrame, strict: bool = True) -> pd.DataFrame:
    """Each task's rows with NLL(true) - NLL(shuffled) in the NLL columns (see the module docstring);
    the controls themselves dropped. Fails with one line where a task has no control rows or (when
    `strict`, as a rule reading it must be) a configuration lacks its control, rather than locate a
    gain it cannot compute; not `strict` (a figure), such a configuration is left out. A table
    already in this view is returned as it is."""
    if "gain" in table.columns and (table["gain"] == "conditional").all() and len(table):
        return table
    keys = [c for c in table.columns if c not in VALUES]
    out = []
    for control, task in CONTROLS.items():
        true, shuffled = table[table["task"] == task], table[table["task"] == control]
        if true.empty:
            continue
        if shuffled.empty:
            raise CogprobeError(f"the table has no {control!r} rows, so no conditional gain of {task!r}; "
                                "sweep with the controls (--tasks perception,production,perception-shuffled,"
                                "production-shuffled; in a study, sweep_controls = true)")
        both = true.merge(shuffled, on=keys, how="left", suffixes=("", "_shuffled"), indicator=True)
        if strict and (both["_merge"] != "both").any():
            lost = both.loc[both["_merge"] != "both", ["checkpoint_step", "direction", "k"]].head(3).to_dict("records")
            raise CogprobeError(f"{task!r} rows without their {control!r} row (e.g. {lost}); sweep the controls "
                                "at the same checkpoints and k's")
        out.append(_difference(both[both["_merge"] == "both"], task))
    if not out:
        raise CogprobeError(f"the table has none of the tasks {sorted(CONTROLS.values())}")
    return pd.concat(out, ignore_index=True)[[*table.columns.drop("gain", errors="ignore"), "gain"]]


def _difference(both: pd.DataFrame, task: str) -> pd.DataFrame:
    """NLL(true) - NLL(shuffled) per row and per example, and the share of the rise recomputed (NaN
    where tuning did not raise the conditional gain, as a sweep's share is where it found no gain)."""
    rows = both.copy()
    for col in SCALARS:
        rows[col] = rows[col] - rows[f"{col}_shuffled"]
    if "example_nll" in rows.columns and rows[["example_nll", "example_nll_shuffled"]].notna().all(axis=None):
        same = [np.array_equal(np.asarray(a, float), np.asarray(b, float))
                for a, b in zip(rows["example_tokens"], rows["example_tokens_shuffled"])]
        if not all(same):
            raise CogprobeError(f"{task!r} and its control score different tokens per example, so their NLLs do "
                                "not pair; rerun the sweep with this version")
        for col in ARRAYS:
            rows[col] = [list(np.asarray(a, float) - np.asarray(b, float))
                         for a, b in zip(rows[col], rows[f"{col}_shuffled"])]
    else:   # a table without per-example scores (or a control without them): no intervals on it
        rows[[c for c in ARRAYS if c in rows.columns]] = None
    rise = rows["nll_reference"] - rows["nll_checkpoint"]
    rows["share"] = np.where(rise > 0, (rows["nll_reference"] - rows["nll"]) / rise.where(rise > 0, 1), np.nan)
    rows["task"], rows["gain"] = task, "conditional"
    return rows[[c for c in rows.columns if not c.endswith("_shuffled") and c != "_merge"]]
