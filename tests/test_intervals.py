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


def _seed_study(rng, n_seeds: int, spread: float, n: int = 60) -> tuple[list[dict], float]:
    """One simulated study: arms a and b on the same n pairs, every seed. The per-pair difference a - b
    is a pair effect shared by every seed (what pairing and the shared test set carry), pair x seed
    noise, and the seed's own shift, whose sd is `spread` times the pair error of one seed's estimate;
    the true token-weighted difference is -0.1. About half the pair variance is pair x seed noise, as
    measured on the committed studies (per-pair differences correlate 0.3-0.85 between their two seeds)."""
    tokens = rng.integers(5, 40, size=n).astype(float)
    difficulty, effect = rng.normal(0, 1.0, n), rng.normal(0, 0.3, n)
    pair_error = np.sqrt((tokens ** 2).sum() * (0.3 ** 2 + 2 * 0.2 ** 2)) / tokens.sum()
    seeds = []
    for _ in range(n_seeds):
        shift = rng.normal(0, spread * pair_error)
        arm = lambda mu: ((mu + difficulty + rng.normal(0, 0.2, n)) * tokens, tokens)  # noqa: E731
        a, b = arm(4.0 + shift), arm(4.1)
        seeds.append({"a": (a[0] + effect * tokens, tokens), "b": b})
    return seeds, -0.1


# coverage of the nominal 95% interval at each (seeds, seed spread / pair error), as this test measures
# it (300 simulated studies each, 200 resamples; seed 7); `python tests/test_intervals.py` prints it
COVERAGE_CELLS = [(s, k) for s in (2, 3, 5) for k in (0, 1, 2, 4)]


def seed_coverage(n_studies: int = 300, n_resamples: int = 200, seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    diff = lambda m: m["a"] - m["b"]  # noqa: E731
    found = {}
    for n_seeds, spread in COVERAGE_CELLS:
        hits = 0
        for _ in range(n_studies):
            seeds, truth = _seed_study(rng, n_seeds, spread)
            i = intervals.hierarchical(diff, seeds, n_resamples=n_resamples, seed=int(rng.integers(1 << 30)))
            hits += i.low <= truth <= i.high
        found[(n_seeds, spread)] = hits / n_studies
    return found


def test_the_seed_interval_covers_at_2_3_and_5_seeds_whatever_the_seed_spread():
    """The interval every headline and row table uses (`intervals.over_seeds`) at the study's own seed
    count (2) and at 3 and 5, with the seeds' spread 0, 1, 2 and 4 times the pair error: the two-stage
    bootstrap it replaced covered 82% at 2 seeds and twice the pair error, 68% at four times."""
    coverage = seed_coverage()
    assert min(coverage.values()) >= 0.93, coverage


def test_the_seed_interval_reports_its_parts_and_what_would_resolve_it():
    rng = np.random.default_rng(5)
    seeds, _ = _seed_study(rng, 2, 4.0)
    i = intervals.hierarchical(lambda m: m["a"] - m["b"], seeds, n_resamples=300)
    per_seed = [float(s["a"][0].sum() / s["a"][1].sum() - s["b"][0].sum() / s["b"][1].sum()) for s in seeds]
    assert i.per_seed == pytest.approx(per_seed) and i.estimate == pytest.approx(np.mean(per_seed))
    assert i.high - i.estimate == pytest.approx(np.hypot(i.pair_half, i.seed_half))
    assert i.seed_sd == pytest.approx(np.std(per_seed, ddof=1))
    # the seeds dominate: more seeds, not pairs; the pairs dominate: pairs, counted from their part alone
    assert intervals.to_resolve(0.1, 0.02, 0.2, 256, 2)[0] == "seeds"
    what, n = intervals.to_resolve(0.1, 0.15, 0.05, 256, 2)
    assert what == "pairs" and n == int(np.ceil(256 * 0.15 ** 2 / (0.1 ** 2 - 0.05 ** 2)))
    row = dict(estimate=0.1, low=-0.1, high=0.3, n_pairs=256, n_seeds=2, pair_half=0.02, seed_half=0.2)
    assert "more seeds would resolve it, not more pairs" in verdicts.difference_words(row, "b", "w")
    groups = intervals.hierarchical(lambda m: m["a"] - m["b"], seeds + seeds, groups=[0, 1, 0, 1], n_resamples=300)
    assert groups.per_seed == pytest.approx(i.per_seed)   # a seed's units are averaged before the seeds


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


if __name__ == "__main__":   # the coverage the test measures, cell by cell
    for (n_seeds, spread), got in seed_coverage().items():
        print(f"{n_seeds} seeds, seed spread {spread}x the pair error: coverage {got:.3f}")
