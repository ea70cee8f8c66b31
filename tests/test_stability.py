"""Stability of a layer set: the rule rerun on resamples of the probe's examples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cogprobe.selection.rules import budget_decider, curves_decider, select_curves
from cogprobe.selection.stability import resampled, stability, table
from helpers import PLANT_12, KeepOuterModel, revert_table


def with_examples(rows: pd.DataFrame, noise: float, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Per-example sums around each row's NLL: example e's NLL = row NLL + a shared difficulty + noise."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 30, size=n).astype(float)
    rows = rows.copy()
    for column in ("example_nll", "example_tokens", "reference_example_nll", "checkpoint_example_nll"):
        rows[column] = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    for task in rows["task"].unique():
        ix = rows.index[rows["task"] == task]
        difficulty = rng.normal(0, 0.5, n)

        def sums(mean):
            return ((mean + difficulty + rng.normal(0, noise, n)) * tokens).tolist()

        ref, ck = sums(rows.loc[ix[0], "nll_reference"]), sums(rows.loc[ix[0], "nll_checkpoint"])
        for i in ix:  # k = 0 of a revert sweep is the checkpoint itself, example for example
            zero = rows.loc[i, "mode"] == "revert" and rows.loc[i, "k"] == 0
            rows.at[i, "example_nll"] = ck if zero else sums(rows.loc[i, "nll"])
            rows.at[i, "example_tokens"] = tokens.tolist()
            rows.at[i, "reference_example_nll"], rows.at[i, "checkpoint_example_nll"] = ref, ck
    return rows


def test_resamples_recompute_every_row_on_the_same_examples():
    rows = with_examples(revert_table(PLANT_12), noise=0.1)
    first = next(resampled(rows, n_resamples=1, seed=3))
    assert not np.allclose(first["nll"], rows["nll"])
    k0 = first[(first["k"] == 0)]
    assert np.allclose(k0["share"], 1.0)  # k = 0 is the checkpoint itself on any resample


def test_a_clear_plant_is_stable_and_a_noisy_one_is_not():
    kw = dict(input_task="perception", output_task="production", n_layers=12)
    clear = with_examples(revert_table(PLANT_12), noise=0.01)
    chosen = select_curves(clear, tau=0.8, **kw)
    stab = stability(curves_decider(0.8, **kw), clear, (chosen.k_in, chosen.k_out), n_resamples=100)
    assert stab["p_same_set"] == 1.0 and stab["p_meets_tau"] == 1.0 and stab["p_no_set"] == 0
    noisy = with_examples(revert_table(PLANT_12), noise=3.0)
    shaky = stability(curves_decider(0.8, **kw), noisy, (chosen.k_in, chosen.k_out), n_resamples=100)
    assert shaky["p_same_set"] < 0.8 and len(shaky["distribution"]) > 1
    assert sum(d["share"] for d in shaky["distribution"]) + shaky["p_no_set"] == pytest.approx(1.0)
    assert "stability over 100 resamples" in table(shaky)


def test_budget_decider_reads_the_scored_candidates():
    model = KeepOuterModel(PLANT_12)
    pairs = [(a, b) for size in range(5) for a, b in [(k, size - k) for k in range(size + 1)]]
    rows = model(pairs)
    rows = with_examples(rows.assign(checkpoint_step=10).reset_index(drop=True), noise=0.01)
    decide = budget_decider(0.8, ("perception", "production"), pairs)
    choice, ok = decide(rows, (3, 3))
    assert choice is None and not ok  # no candidate up to size 4 keeps 0.8 of both gains
    stab = stability(decide, rows, (2, 2), n_resamples=20)
    assert stab["p_no_set"] == 1.0
