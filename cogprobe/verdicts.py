"""The study's comparisons with their intervals, and the sentences they allow.

From the per-example scores of the study (`scores.parquet`: arm, task, pair_id,
nll_sum, n_tokens) this builds one tidy table, one row per (row, seed, task,
quantity), with a paired-bootstrap interval (see `intervals`):

  nll                 the row's test NLL
  share               (NLL base - NLL row) / (NLL base - NLL full): its share of full FT's gain
  rel_deviation       (NLL row - NLL full) / NLL full: the paper's "within x%" yardstick on NLL
  share_minus_<ctrl>  share(row) - share(control) for CogSym against each same-size control

and words a finding only where the interval allows it: a difference is stated when
its interval excludes 0 ("within 3%" when the whole interval of the relative deviation
is below 3%); otherwise it is "not resolved", with the number of pairs that would
resolve it at the observed spread.
"""
from __future__ import annotations

import pandas as pd

from cogprobe import intervals
from cogprobe.tasks import TASKS

BAR = 0.03        # the paper's "within 2-3% of full fine-tuning", as a relative deviation
CONTROLS = ("middle", "bottom", "top", "random")


def comparison_table(scores: pd.DataFrame, rows: list[tuple[str, int]], **kw) -> pd.DataFrame:
    """Every (row, seed, task, quantity) with estimate, low, high; `rows` are (strategy, seed)."""
    out = []
    for task in TASKS:
        for strategy, seed in rows:
            arm, full = f"{strategy}-s{seed}", f"full-s{seed}"
            names = list(dict.fromkeys([arm, "base", full]))
            data = intervals.arms(scores, task, [n for n in names if n in set(scores["arm"])])
            if arm not in data:
                continue
            found = {"nll": intervals.nll(data, arm, **kw)}
            if full in data:
                found["share"] = intervals.share(data, arm, "base", full, **kw)
                found["rel_deviation"] = intervals.paired(lambda m: (m[arm] - m[full]) / m[full],
                                                          {k: data[k] for k in dict.fromkeys((arm, full))}, **kw)
            if strategy == "cogsym" and full in data:
                for control in CONTROLS:
                    other = f"{control}-s{seed}"
                    both = intervals.arms(scores, task, [arm, other, "base", full]) if other in set(scores["arm"]) \
                        else None
                    if both:
                        found[f"share_minus_{control}"] = intervals.share_difference(both, arm, other, "base", full,
                                                                                     **kw)
            n_pairs = len(data[arm][0])
            out += [dict(strategy=strategy, seed=seed, task=task, quantity=q, estimate=i.estimate, low=i.low,
                         high=i.high, n_pairs=n_pairs) for q, i in found.items()]
    return pd.DataFrame(out)


def _interval(row) -> intervals.Interval:
    return intervals.Interval(row["estimate"], row["low"], row["high"])


def fmt(row, percent: bool = False) -> str:
    f = (lambda x: f"{x:.1%}") if percent else (lambda x: f"{x:.3f}")
    return f"{f(row['estimate'])} [{f(row['low'])}, {f(row['high'])}]"


def within_bar(row) -> str:
    """The paper's yardstick on one relative deviation: within the bar, not within it, or unresolved."""
    i = _interval(row)
    if i.high <= BAR:
        return f"within {BAR:.0%} of full fine-tuning"
    if i.low > BAR:
        return f"more than {BAR:.0%} worse than full fine-tuning"
    need = intervals.pairs_to_resolve(i, int(row["n_pairs"]), BAR)
    return (f"not resolved against the {BAR:.0%} bar at {int(row['n_pairs'])} pairs"
            + (f" (about {need} pairs would resolve it at this spread)" if need else ""))


def difference_words(row, better: str, worse: str) -> str:
    """A paired difference stated only when its interval excludes 0."""
    i = _interval(row)
    if i.low > 0:
        return better
    if i.high < 0:
        return worse
    need = intervals.pairs_to_resolve(i, int(row["n_pairs"]))
    return (f"not resolved at {int(row['n_pairs'])} pairs" + (f" (about {need} would resolve it)" if need else ""))
