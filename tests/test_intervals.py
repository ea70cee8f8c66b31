"""Paired bootstrap intervals: coverage on synthetic scores with a known truth, and findings worded from them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cogprobe import intervals, verdicts


def _synthetic(rng, n: int, means: dict[str, float], shared: float = 1.0, own: float = 0.3) -> dict:
    """Per-example (nll_sum, tokens) of several arms on the same examples: a shared per-example
    difficulty (what makes pairing matter) plus each arm's own noise."""
    tokens = rng.integers(5, 40, size=n).astype(float)
    difficulty = rng.normal(0, shared, size=n)
    return {a: ((mu + difficulty + rng.normal(0, own, size=n)) * tokens, tokens) for a, mu in means.items()}


def test_paired_difference_covers_the_truth_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        data = _synthetic(rng, 40, {"a": 4.0, "b": 4.1})
        i = intervals.difference(data, "a", "b", n_resamples=500, seed=int(rng.integers(1 << 30)))
        hits += i.low <= -0.1 <= i.high
    assert 0.90 * 200 <= hits <= 0.99 * 200


def test_pairing_tightens_the_interval_of_a_difference():
    rng = np.random.default_rng(1)
    data = _synthetic(rng, 60, {"a": 4.0, "b": 4.2}, shared=1.0, own=0.1)
    paired = intervals.difference(data, "a", "b")
    alone = [intervals.nll(data, arm) for arm in ("a", "b")]
    assert paired.high < 0  # resolved: a is better
    assert (paired.high - paired.low) < 0.5 * min(i.high - i.low for i in alone)
    assert alone[0].high > alone[1].low  # the separate intervals overlap: unpaired it looks unresolved


def test_share_interval_and_ratio_estimate():
    data = {"base": (np.array([10.0, 20.0]), np.array([2.0, 4.0])), "row": (np.array([8.0, 16.0]), np.array([2.0, 4.0])),
            "full": (np.array([6.0, 12.0]), np.array([2.0, 4.0]))}
    assert intervals.share(data, "row", "base", "full").estimate == pytest.approx(0.5)
    assert intervals.nll(data, "base").estimate == pytest.approx(5.0)


def _scores(rng, n, means_by_task):
    rows = []
    for task, means in means_by_task.items():
        for arm, (sums, tokens) in _synthetic(rng, n, means, shared=0.5, own=0.05).items():
            rows.append(pd.DataFrame(dict(arm=arm, task=task, pair_id=range(n), nll_sum=sums, n_tokens=tokens)))
    return pd.concat(rows, ignore_index=True)


def test_findings_state_a_clear_difference_and_not_a_null_one():
    rng = np.random.default_rng(2)
    means = {"base": 5.0, "full-s0": 4.0, "cogsym-s0": 4.1, "middle-s0": 4.6, "bottom-s0": 4.1}
    scores = _scores(rng, 64, {"perception": means, "production": means})
    table = verdicts.comparison_table(scores, [("full", 0), ("cogsym", 0), ("middle", 0), ("bottom", 0)])
    row = lambda q: table[(table["strategy"] == "cogsym") & (table["task"] == "perception")  # noqa: E731
                          & (table["quantity"] == q)].iloc[0]
    assert verdicts.difference_words(row("share_minus_middle"), "better", "worse") == "better"
    null = verdicts.difference_words(row("share_minus_bottom"), "better", "worse")
    assert null.startswith("not resolved at 64 pairs")
    assert row("share")["low"] < 0.9 < row("share")["high"]
    assert verdicts.within_bar(row("rel_deviation")).startswith(("not resolved", "within"))


def test_within_bar_reads_the_whole_interval():
    inside = dict(estimate=0.01, low=0.0, high=0.02, n_pairs=50)
    outside = dict(estimate=0.10, low=0.06, high=0.14, n_pairs=50)
    unsure = dict(estimate=0.03, low=0.0, high=0.06, n_pairs=50)
    assert verdicts.within_bar(inside).startswith("within 3%")
    assert verdicts.within_bar(outside).startswith("more than 3% worse")
    assert verdicts.within_bar(unsure).startswith("not resolved against the 3% bar at 50 pairs")
