"""Paired bootstrap intervals: coverage on synthetic scores with a known truth, and findings worded from them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cogprobe.core import intervals
from cogprobe.study import verdicts


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
    row = lambda q: table[(table["row"] == "cogsym") & (table["task"] == "perception")  # noqa: E731
                          & (table["quantity"] == q)].iloc[0]
    assert verdicts.difference_words(row("share_minus_middle"), "better", "worse") == "better"
    null = verdicts.difference_words(row("share_minus_bottom"), "better", "worse")
    assert null.startswith("not resolved at 64 pairs")
    assert row("share")["low"] < 0.9 < row("share")["high"]
    assert verdicts.within_bar(row("rel_deviation")).startswith(("not resolved", "within"))


def test_the_standard_rows_get_their_comparisons_every_random_draw_and_lora_as_yardstick():
    rng = np.random.default_rng(3)
    means = {"base": 5.0, "full-s0": 4.0, "blocks-s0": 4.05, "cogsym-s0": 4.1, "random-1-s0": 4.6,
             "random-2-s0": 4.1, "budget-s0": 4.5, "lora-s0": 4.2, "cogsym-lora-s0": 4.8}
    scores = _scores(rng, 64, {"perception": means, "production": means})
    rows = [(a.rsplit("-s", 1)[0], 0) for a in means if a != "base"]
    table = verdicts.comparison_table(scores, rows)
    got = lambda row, q: table[(table["row"] == row) & (table["task"] == "perception")  # noqa: E731
                               & (table["quantity"] == q)].iloc[0]
    words = lambda row, q: verdicts.difference_words(got(row, q), "better", "worse")  # noqa: E731
    assert words("cogsym", "share_minus_random-1") == "better"        # every draw, by its own name
    assert words("cogsym", "share_minus_random-2").startswith("not resolved")
    assert words("budget", "share_minus_cogsym") == "worse"           # the derived set against the fixed rule
    assert "share_minus_blocks" in set(table[table["row"] == "cogsym"]["quantity"])
    lora = got("cogsym-lora", "rel_deviation_vs_lora")               # the paper's yardstick, LoRA against LoRA
    assert lora["low"] > 0.1 and lora["estimate"] == pytest.approx(0.6 / 4.2, abs=0.02)
    assert not {"share_minus_cogsym", "rel_deviation_vs_lora"} & set(table[table["row"] == "cogsym"]["quantity"])


def test_within_bar_reads_the_whole_interval():
    inside = dict(estimate=0.01, low=0.0, high=0.02, n_pairs=50)
    outside = dict(estimate=0.10, low=0.06, high=0.14, n_pairs=50)
    unsure = dict(estimate=0.03, low=0.0, high=0.06, n_pairs=50)
    assert verdicts.within_bar(inside).startswith("within 3%")
    assert verdicts.within_bar(outside).startswith("more than 3% worse")
    assert verdicts.within_bar(unsure).startswith("not resolved against the 3% bar at 50 pairs")


def test_conditional_gain_is_paired_over_the_same_pairs():
    rng = np.random.default_rng(3)
    means = {"perception": 4.0, "perception-shuffled": 4.5}
    rows = [pd.DataFrame(dict(arm="base", task=t, pair_id=range(30), nll_sum=sums, n_tokens=tokens))
            for t, (sums, tokens) in _synthetic(rng, 30, means, shared=1.0, own=0.05).items()]
    got = verdicts.conditional_gain_table(pd.concat(rows, ignore_index=True)).iloc[0]
    assert got["task"] == "perception" and got["arm"] == "base" and got["n_pairs"] == 30
    assert 0.4 < got["low"] < got["estimate"] < got["high"] < 0.6


def test_ends_sentence_names_the_end_that_holds_the_gain():
    """Planted: reverting the first 2 blocks keeps most of the gain, reverting the last 2 almost none."""
    rng = np.random.default_rng(4)
    n, tokens = 40, np.full(40, 10.0)
    noise = lambda: rng.normal(0, 0.05, n) * tokens  # noqa: E731
    ref, ck = 5.0 * tokens + noise(), 4.0 * tokens + noise()
    nll = {"input": 4.1 * tokens + noise(), "output": 4.9 * tokens + noise()}
    rows = pd.DataFrame([dict(direction=d, k=2, share=0.0, example_nll=nll[d].tolist(),
                              example_tokens=tokens.tolist(), reference_example_nll=ref.tolist(),
                              checkpoint_example_nll=ck.tolist()) for d in ("input", "output")])
    text = verdicts.ends_sentence(rows, 2)
    assert "the last 2 blocks hold more of the gain than the first 2" in text and text.startswith("with 2 blocks")
    rows.at[1, "example_nll"] = (nll["input"] + rng.normal(0, 0.05, n) * tokens).tolist()  # no difference
    assert "not resolved at 40 pairs" in verdicts.ends_sentence(rows, 2)


def test_too_few_pairs_state_nothing_and_resolving_sizes_exceed_the_sample():
    few = dict(estimate=0.5, low=0.4, high=0.6, n_pairs=8)
    assert verdicts.difference_words(few, "better", "worse").startswith("not resolved: 8 pairs are too few")
    assert verdicts.within_bar(few).startswith("not resolved: 8 pairs")
    wide = intervals.Interval(0.1, -0.05, 0.4)  # asymmetric: the half toward 0 is what matters
    assert intervals.pairs_to_resolve(wide, 50) == 113
    assert intervals.pairs_to_resolve(intervals.Interval(0.1, 0.05, 0.15), 50) == 51


def test_hierarchical_interval_covers_the_truth_across_seeds():
    """Seeds add their own effect on the difference (run-to-run variation); the interval must cover the
    true mean difference, which a one-seed interval over examples alone would not."""
    rng = np.random.default_rng(5)
    hits, one_seed_hits = 0, 0
    for _ in range(200):
        tokens = rng.integers(5, 40, size=40).astype(float)
        difficulty = rng.normal(0, 1.0, size=40)
        seeds = []
        for _s in range(5):
            shift = rng.normal(0, 0.05)  # this seed's own luck
            arm = lambda mu: ((mu + difficulty + rng.normal(0, 0.1, 40)) * tokens, tokens)  # noqa: E731
            seeds.append({"a": arm(4.0 + shift), "b": arm(4.1)})
        diff = lambda m: m["a"] - m["b"]  # noqa: E731
        i = intervals.hierarchical(diff, seeds, n_resamples=400, seed=int(rng.integers(1 << 30)))
        hits += i.low <= -0.1 <= i.high
        j = intervals.difference(seeds[0], "a", "b", n_resamples=400)
        one_seed_hits += j.low <= -0.1 <= j.high
    assert 0.90 * 200 <= hits <= 0.99 * 200
    assert one_seed_hits < hits  # ignoring the seed effect covers less
    assert intervals.seed_spread(diff, seeds) > 0


def test_comparison_table_pools_seeds_hierarchically():
    rng = np.random.default_rng(6)
    frames = []
    for seed in (0, 1, 2):
        means = {"base": 5.0, f"full-s{seed}": 4.0 + 0.05 * seed, f"cogsym-s{seed}": 4.2}
        frames.append(_scores(rng, 30, {"perception": means, "production": means}))
    scores = pd.concat(frames).drop_duplicates(["arm", "task", "pair_id"])
    rows = [(s, seed) for seed in (0, 1, 2) for s in ("full", "cogsym")]
    table = verdicts.comparison_table(scores, rows)
    pooled = table[(table["seed"] == -1) & (table["row"] == "cogsym") & (table["quantity"] == "share")]
    assert len(pooled) == 2 and (pooled["n_seeds"] == 3).all() and (pooled["seed_sd"] > 0).all()
    one = table[(table["seed"] == 0) & (table["row"] == "cogsym") & (table["quantity"] == "share")]
    assert (pooled["low"].to_numpy() < pooled["estimate"].to_numpy()).all()
    assert len(one) == 2


@pytest.mark.parametrize("n_seeds", [2, 3, 5])
def test_hierarchical_scores_its_resamples_in_chunks_as_two_stage_does_one_by_one(n_seeds):
    """The vectorised resamples give two_stage's per-resample numbers to the last bit (the committed
    intervals were computed one resample at a time)."""
    rng = np.random.default_rng(n_seeds)
    seeds = [{a: (rng.normal(5, 1, 50) * 30, rng.integers(20, 40, 50).astype(float)) for a in ("row", "base", "full")}
             for _ in range(n_seeds)]
    share = lambda m: (m["base"] - m["row"]) / (m["base"] - m["full"])  # noqa: E731
    sums = {a: np.stack([s[a][0] for s in seeds]) for a in seeds[0]}
    tokens = {a: np.stack([s[a][1] for s in seeds]) for a in seeds[0]}
    per_seed = lambda s, e: share({a: sums[a][s][:, e].sum(-1) / tokens[a][s][:, e].sum(-1)  # noqa: E731
                                   for a in sums})
    one_by_one = intervals.two_stage(per_seed, n_seeds, 50, n_resamples=600)
    assert intervals.hierarchical(share, seeds, n_resamples=600) == one_by_one
