"""Sweep tables of disjoint chunks of pairs, as the table of their union.

A sequential probe (`study.probe_pairs`) sweeps the pairs of one sample in chunks (`EvalSet.window`:
(0, m), (m, 2m), ...) and stops once its intervals are narrow enough. Every sweep row keeps its
per-example sums, so the table of the first j chunks together is their rows side by side: each
configuration's example arrays concatenated in chunk order, and the means and the share recomputed
from them exactly as `sweep` computes them from one set's arrays (a ratio of sums, in float64). A
configuration missing from any chunk is left out: the union holds what every chunk scored.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

KEYS = ["checkpoint_step", "task", "direction", "mode", "k", "k_in", "k_out", "blocks", "ends", "engine"]
ARRAYS = ["example_nll", "example_tokens", "reference_example_nll", "checkpoint_example_nll"]


def union(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The rows of `tables` (sweeps of disjoint chunks, in chunk order) as one table over all their pairs,
    in the first table's row order and columns (its `k_grid`, where it has one)."""
    keyed = [dict(zip(_keys(t), t.to_dict("records"))) for t in tables]
    rows = []
    for key, row in keyed[0].items():
        if not all(key in t for t in keyed[1:]):
            continue
        row = dict(row)
        for name in ARRAYS:
            row[name] = np.concatenate([np.asarray(t[key][name]) for t in keyed]).tolist()
        rows.append(_means(row))
    return pd.DataFrame(rows, columns=tables[0].columns)


def _keys(table: pd.DataFrame) -> list[tuple]:
    return [tuple(None if pd.isna(v) else v for v in r) for r in table[KEYS].itertuples(index=False)]


def _means(row: dict) -> dict:
    """nll, n_tokens, nll_reference, nll_checkpoint and share from the row's example arrays (as `sweep._rows`)."""
    tokens = int(np.sum(row["example_tokens"]))
    mean = lambda sums: float(np.sum(sums)) / tokens  # noqa: E731
    nll, ref, ck = mean(row["example_nll"]), mean(row["reference_example_nll"]), mean(row["checkpoint_example_nll"])
    gain = ref - ck
    return {**row, "nll": nll, "n_tokens": tokens, "nll_reference": ref, "nll_checkpoint": ck,
            "share": (ref - nll) / gain if gain > 0 else float("nan")}
