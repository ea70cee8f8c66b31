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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from scipy import stats

LEVEL, RESAMPLES, SEED = 0.95, 2000, 0
CHUNK = 250   # resamples scored in one array operation (hierarchical): a few MB at 5 seeds x 256 pairs


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


def hierarchical(statistic: Callable[[dict], np.ndarray], seeds: list[Arms], *, level: float = LEVEL,
                 n_resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Interval of the mean over seeds of `statistic`, resampling seeds, then examples (the same
    examples for every arm and seed: the evaluation set is shared); see `two_stage`. `statistic`
    works elementwise, so every resample of a chunk is scored in one array operation."""
    names = list(seeds[0])
    sums = {a: np.stack([s[a][0] for s in seeds]) for a in names}     # [n_seeds, n_examples]
    tokens = {a: np.stack([s[a][1] for s in seeds]) for a in names}
    per_seed = lambda s_ix, e_ix: statistic({a: sums[a][s_ix][:, e_ix].sum(-1) / tokens[a][s_ix][:, e_ix].sum(-1)
                                             for a in names})  # noqa: E731
    n_seeds, n = sums[names[0]].shape
    estimate = float(np.mean(per_seed(np.arange(n_seeds), np.arange(n))))

    def scored(s, e):   # resamples [C, n_seeds] and [C, n] -> each one's mean over its seeds, [C]
        at = (s[:, :, None], e[:, None, :])
        return statistic({a: _in_order(sums[a][at]) / _in_order(tokens[a][at]) for a in names}).mean(-1)

    s_ix, e_ix = two_stage_draws(n_seeds, n, n_resamples, seed)
    draws = np.concatenate([scored(s_ix[i:i + CHUNK], e_ix[i:i + CHUNK]) for i in range(0, n_resamples, CHUNK)])
    return _percentile(estimate, draws, level)


def _in_order(values: np.ndarray) -> np.ndarray:
    """Sums over the last axis, adding left to right: as numpy sums one resample's [seeds, pairs]
    array, so the chunked resamples give the per-resample numbers to the last bit."""
    return np.cumsum(values, axis=-1)[..., -1]


def two_stage_draws(n_seeds: int, n: int, n_resamples: int = RESAMPLES,
                    seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The resamples of the two-stage bootstrap: [R, n_seeds] seed indices and [R, n] example
    indices, drawn seeds then examples for each resample in turn (so every caller, vectorised or
    not, sees the same resamples for the same seed)."""
    rng = np.random.default_rng(seed)
    s_ix, e_ix = np.empty((n_resamples, n_seeds), dtype=np.int64), np.empty((n_resamples, n), dtype=np.int64)
    for r in range(n_resamples):
        s_ix[r], e_ix[r] = rng.integers(0, n_seeds, n_seeds), rng.integers(0, n, n)
    return s_ix, e_ix


def two_stage(per_seed: Callable[[np.ndarray, np.ndarray], np.ndarray], n_seeds: int, n: int, *,
              level: float = LEVEL, n_resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Percentile interval of the mean over seeds of `per_seed(seed indices, example indices)` (one
    value per given seed): seeds drawn with replacement, then one draw of examples applied to every
    drawn seed. scipy's bootstrap has no nested design, so it is written out here."""
    estimate = float(np.mean(per_seed(np.arange(n_seeds), np.arange(n))))
    draws = [float(np.mean(per_seed(s, e))) for s, e in zip(*two_stage_draws(n_seeds, n, n_resamples, seed))]
    return _percentile(estimate, np.asarray(draws), level)


def _percentile(estimate: float, draws: np.ndarray, level: float) -> Interval:
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high))


def seed_spread(statistic: Callable[[dict], np.ndarray], seeds: list[Arms]) -> float:
    """Standard deviation over seeds of the statistic's point estimate (reported beside the interval)."""
    values = [float(statistic({a: s[a][0].sum() / s[a][1].sum() for a in s})) for s in seeds]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


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
