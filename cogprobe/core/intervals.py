"""Confidence intervals by paired bootstrap over examples, from stored per-example scores.

Every NLL cogprobe reports is a ratio over a set of examples, sum of NLL / number of
scored tokens, so a resample recomputes both sums; every comparison (a gain, a share
of full fine-tuning's gain, a difference between two rows) is computed on the *same*
resampled examples for all its arms, which is what makes the interval of a difference
much tighter than the two intervals side by side. The resampling is scipy's
(`scipy.stats.bootstrap`, `paired=True`, percentile intervals); 95%, 2,000 resamples
and seed 0 by default, all three options.

Per-example scores are a tidy long table (one row per arm, task and example):
`arm`, `task`, `pair_id`, `nll_sum`, `n_tokens`; `arms()` turns it into the arrays
the intervals take.

Over several seeds (`hierarchical`, `over_seeds`) the interval combines the pairs' bootstrap error
with a t-interval over the seeds' own estimates, so it stays valid at 2-5 seeds, and says which of
the two sets its width (`to_resolve`: more pairs, or more seeds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

LEVEL, RESAMPLES, SEED = 0.95, 2000, 0


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def excludes(self, value: float = 0.0) -> bool:
        return not self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


Arms = Mapping[str, tuple[np.ndarray, np.ndarray]]  # arm -> (nll sums, token counts), aligned by example


def arms(scores: pd.DataFrame, names: list[str], *, by: str = "arm", **where) -> dict:
    """{name: (nll sums, token counts)} of the rows whose `by` column is each name (and whose other
    columns equal `where`, e.g. task="perception"), aligned on pair_id: only pairs every name scored."""
    rows = scores[scores[by].isin(names)]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    wide = rows.pivot_table(index="pair_id", columns=by, values=["nll_sum", "n_tokens"], aggfunc="sum").dropna()
    return {a: (wide[("nll_sum", a)].to_numpy(float), wide[("n_tokens", a)].to_numpy(float)) for a in names}


def paired(statistic: Callable[[dict], np.ndarray], data: Arms, *, level: float = LEVEL,
           n_resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Interval of `statistic({arm: mean NLL per token})`, resampling examples jointly for every arm."""
    names = list(data)
    columns = [col for a in names for col in data[a]]

    def on_resample(*cols, axis=-1):
        nll = {a: cols[2 * i].sum(axis=axis) / cols[2 * i + 1].sum(axis=axis) for i, a in enumerate(names)}
        return statistic(nll)

    estimate = float(on_resample(*columns))
    if len(columns[0]) < 2:
        return Interval(estimate, float("nan"), float("nan"))
    res = stats.bootstrap(columns, on_resample, paired=True, vectorized=True, n_resamples=n_resamples,
                          confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return Interval(estimate, float(res.confidence_interval.low), float(res.confidence_interval.high))


def hierarchical(statistic: Callable[[dict], np.ndarray], seeds: list[Arms], *, groups: list[int] | None = None,
                 level: float = LEVEL, n_resamples: int = RESAMPLES, seed: int = SEED) -> "SeedInterval":
    """Interval of the mean over seeds of `statistic`, valid at 2-5 seeds (`over_seeds`). Each unit of
    `seeds` is one run's arms on the same examples (the evaluation set is shared); `groups` names each
    unit's seed where several units share one (the random draws of a seed: averaged within it first)."""
    names = list(seeds[0])
    sums = {a: np.stack([s[a][0] for s in seeds]) for a in names}     # [n_units, n_examples]
    tokens = {a: np.stack([s[a][1] for s in seeds]) for a in names}

    def per_unit(e_ix: np.ndarray) -> np.ndarray:                      # e_ix [B, n] -> [n_units, B]
        return statistic({a: sums[a][:, e_ix].sum(-1) / tokens[a][:, e_ix].sum(-1) for a in names})

    return over_seeds(by_seed(per_unit, groups or list(range(len(seeds)))), len(set(groups or range(len(seeds)))),
                      sums[names[0]].shape[1], level=level, n_resamples=n_resamples, seed=seed)


def by_seed(per_unit: Callable[[np.ndarray], np.ndarray], groups: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """`per_unit` (one row per unit) averaged within each seed of `groups` (one row per seed, in first-seen order)."""
    order = list(dict.fromkeys(groups))
    masks = [np.array([g == s for g in groups]) for s in order]
    if len(order) == len(groups):
        return per_unit
    return lambda e_ix: np.stack([np.asarray(per_unit(e_ix))[m].mean(0) for m in masks])


@dataclass(frozen=True)
class SeedInterval(Interval):
    """The mean over seeds with its interval (`over_seeds`), and what makes its width: each seed's own
    estimate, `pair_half` (the half-width the shared test pairs give, seeds held fixed) and `seed_half`
    (the half-width the spread between seeds gives); half = sqrt(pair_half^2 + seed_half^2)."""
    per_seed: tuple[float, ...] = ()
    pair_half: float = float("nan")
    seed_half: float = float("nan")

    @property
    def seed_sd(self) -> float:
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else float("nan")


def over_seeds(per_seed: Callable[[np.ndarray], np.ndarray], n_seeds: int, n: int, *, level: float = LEVEL,
               n_resamples: int = RESAMPLES, seed: int = SEED) -> SeedInterval:
    """The mean over seeds of a paired statistic, with an interval that is valid at 2-5 seeds.

    `per_seed(e_ix)` gives, for example indices `e_ix` of shape [B, n], the statistic of every seed on
    those examples, [n_seeds, B]. Two sources of error, each with its own valid half-width:
      - the test pairs, shared by every seed: z * the bootstrap standard error of the mean over seeds
        (pairs resampled, the same draw for every seed and arm; seeds held fixed);
      - the seeds: t(n_seeds - 1) * sd over the seeds' own estimates / sqrt(n_seeds), a t-interval
        over the per-seed paired estimates, which is what stays valid at 2 seeds (the two-stage
        bootstrap it replaces covered 82% of the time at 2 seeds when the seed spread was twice the
        pair error; `tests/test_intervals.py` measures this one at 2, 3 and 5 seeds).
    The interval is the estimate +- sqrt(pair_half^2 + seed_half^2). The seed part also holds the
    pair x seed noise that the pair part counts, so the interval errs wide, never narrow. One seed: the
    pair part alone (a normal interval from the bootstrap standard error)."""
    estimate_per_seed = np.asarray(per_seed(np.arange(n)[None, :]), float)[:, 0]
    rng = np.random.default_rng(seed)
    draws = np.asarray(per_seed(rng.integers(0, n, (n_resamples, n))), float)   # [n_seeds, B]
    pooled = draws.mean(0)
    pooled = pooled[np.isfinite(pooled)]
    z = stats.norm.ppf((1 + level) / 2)
    pair_half = float(z * np.std(pooled, ddof=1)) if len(pooled) > 1 else float("nan")
    if n_seeds > 1:
        seed_half = float(stats.t.ppf((1 + level) / 2, n_seeds - 1) * np.std(estimate_per_seed, ddof=1)
                          / np.sqrt(n_seeds))
    else:
        seed_half = 0.0
    estimate = float(np.mean(estimate_per_seed))
    half = float(np.hypot(pair_half, seed_half))
    return SeedInterval(estimate, estimate - half, estimate + half, tuple(float(v) for v in estimate_per_seed),
                        pair_half, seed_half)


def to_resolve(estimate: float, pair_half: float, seed_half: float, n_pairs: int, n_seeds: int,
               margin: float = 0.0, level: float = LEVEL) -> tuple[str, int | None]:
    """What would resolve an interval of `over_seeds` that holds `margin`: ("pairs", n) where the pairs'
    part sets most of its width and n pairs (the pair part shrinking as 1/sqrt(n), the seed part
    kept) would exclude the margin; ("seeds", s) where the seeds' spread sets most of it, or alone
    reaches the margin: s seeds at this spread (None: more than 50); ("none", None) where the
    estimate sits on the margin."""
    gap = abs(estimate - margin)
    if gap == 0 or not np.isfinite(pair_half):
        return "none", None
    seed_half = 0.0 if not np.isfinite(seed_half) else seed_half
    if seed_half ** 2 <= pair_half ** 2 and seed_half < gap:
        return "pairs", max(n_pairs + 1, int(np.ceil(n_pairs * pair_half ** 2 / (gap ** 2 - seed_half ** 2))))
    if n_seeds < 2:
        return "seeds", None
    sd = seed_half * np.sqrt(n_seeds) / stats.t.ppf((1 + level) / 2, n_seeds - 1)
    for s in range(n_seeds + 1, 51):
        if np.hypot(pair_half, stats.t.ppf((1 + level) / 2, s - 1) * sd / np.sqrt(s)) < gap:
            return "seeds", s
    return "seeds", None


def nll(data: Arms, arm: str, **kw) -> Interval:
    return paired(lambda m: m[arm], {arm: data[arm]}, **kw)


def difference(data: Arms, a: str, b: str, **kw) -> Interval:
    """NLL(a) - NLL(b) on the same examples."""
    return paired(lambda m: m[a] - m[b], {a: data[a], b: data[b]}, **kw)


def share(data: Arms, row: str, base: str, full: str, **kw) -> Interval:
    """(NLL(base) - NLL(row)) / (NLL(base) - NLL(full)): the row's share of full fine-tuning's gain."""
    return paired(lambda m: (m[base] - m[row]) / (m[base] - m[full]),
                  {k: data[k] for k in dict.fromkeys((row, base, full))}, **kw)


def share_difference(data: Arms, a: str, b: str, base: str, full: str, **kw) -> Interval:
    """share(a) - share(b), both of the same full fine-tuning gain, on the same examples."""
    return paired(lambda m: (m[b] - m[a]) / (m[base] - m[full]),
                  {k: data[k] for k in dict.fromkeys((a, b, base, full))}, **kw)


def pairs_to_resolve(interval: Interval, n_pairs: int, margin: float = 0.0) -> int | None:
    """Pairs at which an interval of this shape around this estimate would exclude `margin` (its
    half toward the margin shrinks as 1/sqrt(n)); None when the estimate sits on the margin."""
    half = interval.estimate - interval.low if interval.estimate > margin else interval.high - interval.estimate
    gap = abs(interval.estimate - margin)
    if not np.isfinite(half) or gap == 0:
        return None
    return max(n_pairs + 1, int(np.ceil(n_pairs * (half / gap) ** 2)))


def sweep_intervals(sweeps: pd.DataFrame, **kw) -> pd.DataFrame:
    """`share_low` / `_high` on every sweep row that has per-example scores (NaN elsewhere):
    reference, checkpoint and ablated scores resampled together over the same examples."""
    sweeps = sweeps.copy()
    sweeps["share_low"] = sweeps["share_high"] = float("nan")
    if "example_nll" not in sweeps.columns:
        return sweeps
    for i, row in sweeps.iterrows():
        if row["example_nll"] is None or not np.isfinite(row["share"]):
            continue
        tokens = np.asarray(row["example_tokens"], float)
        data = {"ref": (np.asarray(row["reference_example_nll"], float), tokens),
                "ck": (np.asarray(row["checkpoint_example_nll"], float), tokens),
                "k": (np.asarray(row["example_nll"], float), tokens)}
        got = paired(lambda m: (m["ref"] - m["k"]) / (m["ref"] - m["ck"]), data, **kw)
        sweeps.loc[i, ["share_low", "share_high"]] = got.low, got.high
    return sweeps
