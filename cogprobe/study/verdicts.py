"""The study's comparisons with their intervals, and the sentences they allow.

From the per-example scores of the study (`scores.parquet`: arm, task, pair_id,
nll_sum, n_tokens) this builds one tidy table, one row per (row, seed, task,
quantity), with a paired-bootstrap interval (see `intervals`):

  nll                 the row's test NLL
  share               (NLL base - NLL row) / (NLL base - NLL full): its share of full FT's gain
  rel_deviation       (NLL row - NLL full) / NLL full: the paper's "within x%" yardstick on NLL
  share_minus_<other> share(row) - share(other), paired (DIFFERENCES: CogSym against each same-size
                      control and `blocks`, the budget and cogsym-ends against CogSym)
  rel_deviation_vs_lora  (NLL row - NLL lora) / NLL lora for the CogSym-LoRA rows (RELATIVE_TO)

(both the report's comparisons of `comparisons.toml`, the one list of the comparisons that matter)

and words a finding only where the interval allows it: a difference is stated when
its interval excludes 0 ("within 3%" when the whole interval of the relative deviation
is below 3%); otherwise it is "not resolved", with the number of pairs that would
resolve it at the observed spread.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cogprobe.core import intervals
from cogprobe.core import layout
from cogprobe.study.comparisons import BAR, REPORT
from cogprobe.study.rows import kind
from cogprobe.data.tasks import TASKS

MIN_PAIRS = 20    # below this, percentile bootstrap intervals cover too rarely to state a finding from
# share(row) - share(other), paired, for the comparisons the study exists for: CogSym against its
# same-size controls (every random draw) and against every block with the ends frozen (its matched
# full fine-tuning); the derived budget against the fixed rule; what training the ends adds to CogSym
_SHARES = [c for c in REPORT if c.quantity == "share_minus"]
DIFFERENCES = {row: tuple(c.other for c in _SHARES if c.row == row) for row in dict.fromkeys(c.row for c in _SHARES)}
# the paper's yardstick against another row than full: CogSym-LoRA against LoRA on every block
RELATIVE_TO = {c.row: c.other for c in REPORT if c.quantity == "rel_deviation"}


def comparison_table(scores: pd.DataFrame, rows: list[tuple[str, int]], **kw) -> pd.DataFrame:
    """Every (row, seed, task, quantity) with estimate, low, high; `rows` are (row, seed). With
    several seeds, `across_seeds` adds the mean over seeds (seed -1) with its interval over seeds."""
    out = []
    for task in TASKS:
        for row, seed in rows:
            arm, full = layout.arm(row, seed), layout.arm("full", seed)
            names = list(dict.fromkeys([arm, "base", full]))
            data = intervals.arms(scores, [n for n in names if n in set(scores["arm"])], task=task)
            if arm not in data:
                continue
            found = {"nll": intervals.nll(data, arm, **kw)}
            if full in data:
                found["share"] = intervals.share(data, arm, "base", full, **kw)
                found["rel_deviation"] = intervals.paired(lambda m: (m[arm] - m[full]) / m[full],
                                                          {k: data[k] for k in dict.fromkeys((arm, full))}, **kw)
            if full in data:
                found.update(_differences(scores, row, seed, task, **kw))
            if row in RELATIVE_TO and layout.arm(RELATIVE_TO[row], seed) in set(scores["arm"]):
                other = layout.arm(RELATIVE_TO[row], seed)
                both = intervals.arms(scores, [arm, other], task=task)
                found[f"rel_deviation_vs_{RELATIVE_TO[row]}"] = intervals.paired(
                    lambda m, o=other: (m[arm] - m[o]) / m[o], both, **kw)
            n_pairs = len(data[arm][0])
            out += [dict(row=row, seed=seed, task=task, quantity=q, estimate=i.estimate, low=i.low,
                         high=i.high, n_pairs=n_pairs) for q, i in found.items()]
    return pd.concat([pd.DataFrame(out), across_seeds(scores, rows, **kw)], ignore_index=True)


def _differences(scores: pd.DataFrame, row: str, seed: int, task: str, **kw) -> dict:
    """{share_minus_<other>: interval} of `row` against each row DIFFERENCES names that this study ran
    (a random control: every draw, random or random-1 ... random-N)."""
    present = set(scores["arm"])
    found = {}
    for control in DIFFERENCES.get(row, ()):
        others = [control] if control != "random" else sorted(
            {a.rsplit("-s", 1)[0] for a in present if kind(a.rsplit("-s", 1)[0]) == "random"})
        for other in others:
            arm, full, theirs = layout.arm(row, seed), layout.arm("full", seed), layout.arm(other, seed)
            if theirs in present:
                both = intervals.arms(scores, [arm, theirs, "base", full], task=task)
                found[f"share_minus_{other}"] = intervals.share_difference(both, arm, theirs, "base", full, **kw)
    return found


def conditional_gain_table(scores: pd.DataFrame, **kw) -> pd.DataFrame:
    """Per arm and task: NLL(shuffled source) - NLL(true source), paired over the same pairs; and, for
    every arm but the base, its change from the base's (`conditional_gain_change`, same pairs)."""
    keyed = scores.assign(arm=scores["arm"] + "|" + scores["task"])  # one arm per (row, task or control)
    out = []
    for arm in dict.fromkeys(scores["arm"]):
        present = set(scores.loc[scores["arm"] == arm, "task"])
        for task in [t for t in TASKS if {t, f"{t}-shuffled"} <= present]:
            true, shuffled = f"{arm}|{task}", f"{arm}|{task}-shuffled"
            found = {"conditional_gain": lambda m: m[shuffled] - m[true]}
            names = [true, shuffled]
            if arm != "base" and f"base|{task}" in set(keyed["arm"]):
                names += [f"base|{task}", f"base|{task}-shuffled"]
                found["conditional_gain_change"] = lambda m: (m[shuffled] - m[true]) - (m[names[3]] - m[names[2]])
            data = intervals.arms(keyed, names)
            for quantity, statistic in found.items():
                i = intervals.paired(statistic, {k: data[k] for k in names[:2 if quantity == "conditional_gain"
                                                                         else 4]}, **kw)
                out.append(dict(arm=arm, task=task, quantity=quantity, estimate=i.estimate, low=i.low,
                                high=i.high, n_pairs=len(data[true][0])))
    return pd.DataFrame(out)


def across_seeds(scores: pd.DataFrame, rows: list[tuple[str, int]], **kw) -> pd.DataFrame:
    """Rows with several seeds: nll, share and rel_deviation as the mean over seeds, with the interval
    over seeds (`intervals.over_seeds`, valid at 2-5 seeds) and the seed spread (sd of the per-seed
    estimates) beside it."""
    out, present = [], set(scores["arm"])
    by_row: dict[str, list[int]] = {}
    for row, seed in rows:
        by_row.setdefault(row, []).append(seed)
    statistics = {"nll": lambda m: m["row"], "share": lambda m: (m["base"] - m["row"]) / (m["base"] - m["full"]),
                  "rel_deviation": lambda m: (m["row"] - m["full"]) / m["full"]}
    for row, seeds in by_row.items():
        seeds = [s for s in seeds if {layout.arm(row, s), layout.arm("full", s)} <= present]
        if len(seeds) < 2 or "base" not in present:
            continue
        for task in TASKS:
            data = [dict(zip(("row", "base", "full"), intervals.arms(
                scores, [layout.arm(row, s), "base", layout.arm("full", s)], task=task).values())) for s in seeds]
            if row == "full":
                data = [dict(d, full=d["row"]) for d in data]
            for quantity, f in statistics.items():
                i = intervals.hierarchical(f, data, **kw)
                out.append(dict(row=row, seed=-1, task=task, quantity=quantity, estimate=i.estimate,
                                low=i.low, high=i.high, n_pairs=len(data[0]["row"][0]), n_seeds=len(seeds),
                                seed_sd=i.seed_sd))
    return pd.DataFrame(out)


def _interval(row) -> intervals.Interval:
    return intervals.Interval(row["estimate"], row["low"], row["high"])


def fmt(row, percent: bool = False) -> str:
    f = (lambda x: f"{x:.1%}") if percent else (lambda x: f"{x:.3f}")
    return f"{f(row['estimate'])} [{f(row['low'])}, {f(row['high'])}]"


# what an interval allows, in one word: the long sentences below and the headline table's cells
# (`evidence`) are both worded from these, so they cannot disagree
WITHIN, BEYOND, ABOVE, BELOW, UNRESOLVED, TOO_FEW = "within", "beyond", "above", "below", "not resolved", "too few pairs"


def bar_call(row) -> str:
    """The paper's yardstick on one relative deviation: WITHIN the bar (the whole interval at most
    BAR worse), BEYOND it (the whole interval worse), UNRESOLVED, or TOO_FEW pairs to say."""
    i = _interval(row)
    if row["n_pairs"] < MIN_PAIRS:
        return TOO_FEW
    return WITHIN if i.high <= BAR else BEYOND if i.low > BAR else UNRESOLVED


def difference_call(row) -> str:
    """A paired difference: ABOVE 0 or BELOW 0 when its interval excludes 0, else UNRESOLVED (or TOO_FEW)."""
    i = _interval(row)
    if row["n_pairs"] < MIN_PAIRS:
        return TOO_FEW
    return ABOVE if i.low > 0 else BELOW if i.high < 0 else UNRESOLVED


def within_bar(row) -> str:
    """`bar_call` in a sentence; unresolved ones say how many pairs would resolve them."""
    call = bar_call(row)
    if call == TOO_FEW:
        return _too_few(row)
    if call == WITHIN:
        return f"within {BAR:.0%} of full fine-tuning (at most {BAR:.0%} worse)"
    if call == BEYOND:
        return f"more than {BAR:.0%} worse than full fine-tuning"
    return f"not resolved against the {BAR:.0%} bar at {_at(row)}" + _resolving(row, BAR)


def difference_words(row, better: str, worse: str) -> str:
    """A paired difference stated only when its interval excludes 0 (and rests on enough pairs)."""
    call = difference_call(row)
    if call == TOO_FEW:
        return _too_few(row)
    if call == ABOVE:
        return better
    if call == BELOW:
        return worse
    return f"not resolved at {_at(row)}" + _resolving(row, 0.0)


def _seeds(row) -> int:
    n = row.get("n_seeds", 1) if hasattr(row, "get") else 1
    return int(n) if n == n and n else 1


def _at(row) -> str:
    return f"{int(row['n_pairs'])} pairs" + (f" and {_seeds(row)} seeds" if _seeds(row) > 1 else "")


def _resolving(row, margin: float) -> str:
    """What would resolve an unresolved interval. An interval over several seeds (`intervals.over_seeds`,
    with its pair and seed parts): more pairs where the pairs set most of its width (counted from the
    pair part alone), more seeds where the seeds do. One seed: pairs, the half-width scaled as 1/sqrt(n)."""
    n_pairs = int(row["n_pairs"])
    pair_half = row.get("pair_half", float("nan")) if hasattr(row, "get") else float("nan")
    if _seeds(row) < 2 or not np.isfinite(pair_half):
        need = intervals.pairs_to_resolve(_interval(row), n_pairs, margin)
        if need is None or need > 100 * n_pairs:
            return " (the difference is too small to resolve with any practical number of pairs)"
        return f" (about {need} pairs would resolve it at this spread)"
    what, need = intervals.to_resolve(row["estimate"], pair_half, row["seed_half"], n_pairs, _seeds(row), margin)
    if what == "pairs":
        if need > 100 * n_pairs:
            return " (the difference is too small to resolve with any practical number of pairs)"
        return f" (about {need} pairs would resolve it at this spread; the pairs set most of its width)"
    if what == "seeds":
        return (" (more seeds would resolve it, not more pairs: the spread between seeds sets most of its width"
                + (f"; about {need} seeds at this spread)" if need else "; more than 50 seeds at this spread)"))
    return " (the estimate sits on the line: no number of pairs or seeds would resolve it)"


def _too_few(row) -> str:
    return (f"not resolved: {int(row['n_pairs'])} pairs are too few for a bootstrap interval to be trusted "
            f"(cogprobe states findings from {MIN_PAIRS} pairs up)")


def ends_sentence(rows: pd.DataFrame, k: int, of: str = "the gain", **kw) -> str:
    """Gain retained with k blocks reverted from each end (with intervals), and which end holds more of
    the gain, stated only when the paired difference excludes 0. `rows`: one task and checkpoint of a
    revert sweep with per-example scores (or their conditional-gain view, `of` saying so)."""
    at = {d: rows[(rows["direction"] == d) & (rows["k"] == k)] for d in ("input", "output")}
    if any(r.empty for r in at.values()):
        return f"k = {k} was not swept from both ends"
    if "example_nll" not in rows.columns or any(r["example_nll"].isna().any() for r in at.values()):
        return (f"with k = {k} blocks reverted, {at['input']['share'].iloc[0]:.0%} of {of} remains "
                f"(input end) and {at['output']['share'].iloc[0]:.0%} (output end); no per-example scores, "
                "so no intervals")
    first = at["input"].iloc[0]
    tokens = np.asarray(first["example_tokens"], float)
    data = {"ref": (np.asarray(first["reference_example_nll"], float), tokens),
            "ck": (np.asarray(first["checkpoint_example_nll"], float), tokens),
            **{d: (np.asarray(r.iloc[0]["example_nll"], float), tokens) for d, r in at.items()}}
    kept = {d: intervals.paired(lambda m, d=d: (m["ref"] - m[d]) / (m["ref"] - m["ck"]), data, **kw) for d in at}
    diff = intervals.paired(lambda m: (m["output"] - m["input"]) / (m["ref"] - m["ck"]), data, **kw)
    row = dict(estimate=diff.estimate, low=diff.low, high=diff.high, n_pairs=len(tokens))
    # diff = kept(input) - kept(output): positive when reverting the first k leaves more of the gain,
    # i.e. when the last k blocks hold more of it
    which = difference_words(row, f"the last {k} blocks hold more of {of} than the first {k}",
                             f"the first {k} blocks hold more of {of} than the last {k}")
    pct = lambda i: f"{i.estimate:.0%} [{i.low:.0%}, {i.high:.0%}]"  # noqa: E731
    return (f"with {k} blocks reverted, {pct(kept['input'])} of {of} remains from the input end and "
            f"{pct(kept['output'])} from the output end: {which}")
