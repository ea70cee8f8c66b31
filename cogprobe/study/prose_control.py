"""The quantisation control of a study: every arm's NLL on held-out English prose, and its change
from the base model's (`prose_passages`; the passages: `cogprobe.data.prose`).

The embedded model's blocks are 4-bit, so a tuned row can lower its test NLL by repairing rounding
or by adapting to the text format as well as by learning the language. English prose is neither
language, and no row trains on it: a row whose English NLL falls after tuning gained something
the new language does not explain (repair or format), one whose English NLL rises forgot.

Table `prose.parquet`: one row per (arm, passage), the per-example schema of `scores.parquet` plus
`passage_set`. Every arm of a study is scored on one set: when the set changes (another
`prose_passages`, tokenizer or Python), `stale` names the arms to score again, and an arm whose
weights are gone loses its rows rather than keep a score of another set.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cogprobe.core import intervals, io
from cogprobe.core.layout import BASELINE, COMPARE, PROSE, arm, arm_at, row_run
from cogprobe.data.prose import PASSAGE_TOKENS, TASK, cut_passages, score_passages
from cogprobe.models.loading import load_model
from cogprobe.study import verdicts
from cogprobe.study.rows import label
from cogprobe.tuning.checkpoints import CHECKPOINTS

FALL, RISE = "repair or format", "forgetting"   # what a resolved change reads as


def score_arm(model, tokenizer, prose_passages: int, name: str, out: Path) -> None:
    """Score one arm's model on the study's passages into prose.parquet (replacing its earlier rows)."""
    if prose_passages:
        io.replace_rows(out / PROSE, score_passages(model, tokenizer, prose_passages).assign(arm=name))


def drop_arm(out: Path, name: str) -> None:
    """Remove an arm's rows: its weights are gone, so it cannot be scored on the study's set."""
    if (out / PROSE).is_file():
        table = io.read_parquet(out / PROSE)
        io.write_parquet(out / PROSE, table[table["arm"] != name])


def scored_arms(out: Path) -> dict[str, tuple[str | None, int | None]]:
    """{arm: (row, seed)} of the arms a study has scored: the base model (row None), then each compared run."""
    arms = {"base": (None, None)} if (out / BASELINE).is_file() else {}
    if (out / COMPARE).is_file():
        table = io.read_parquet(out / COMPARE)
        arms.update({arm(r, int(s)): (r, int(s)) for r, s in zip(table["row"], table["seed"])})
    return arms


def stale(prose_passages: int, model: str, out: Path) -> dict[str, tuple[str | None, int | None]]:
    """The scored arms whose English rows are missing or of another passage set, that can be scored
    again (the base model, or a run whose weights are kept) or hold rows of another set to drop."""
    arms = scored_arms(out)
    if not prose_passages or not arms:
        return {}
    _, tokenizer = load_model(model)
    want = cut_passages(tokenizer, prose_passages).passage_set
    have = (io.read_parquet(out / PROSE).groupby("arm")["passage_set"].agg(lambda s: set(s))
            if (out / PROSE).is_file() else pd.Series(dtype=object))
    found = {}
    for name, (row, seed) in arms.items():
        mine = have.get(name)
        if mine == {want}:
            continue
        if mine is not None or row is None or (row_run(out, row, seed) / CHECKPOINTS).is_dir():
            found[name] = (row, seed)
    return found


# --- the numbers ------------------------------------------------------------------------------------


def changes(out: Path, step: int | None = None, **kw) -> pd.DataFrame | None:
    """One line per (row, seed) and, for rows with several seeds, their mean (seed -1): English NLL and
    its change from the base model's, on the same passages, with 95% intervals (paired bootstrap over
    passages; over seeds `intervals.hierarchical`, valid at 2-5 seeds). None without English scores.
    `step`: the runs as scored at that earlier step (`compare_steps`; arms `row-sSEED@STEP`)."""
    name = (lambda row, seed: arm_at(row, seed, step)) if step else arm   # noqa: E731
    if not (out / PROSE).is_file() or not (out / COMPARE).is_file():
        return None
    table = io.read_parquet(out / PROSE)
    if "base" not in set(table["arm"]):
        return None
    table = table[table["passage_set"] == table.loc[table["arm"] == "base", "passage_set"].iloc[0]]
    compare = io.read_parquet(out / COMPARE)
    present, by_row = set(table["arm"]), {}
    for row, seed in zip(compare["row"], compare["seed"]):
        if name(row, int(seed)) in present:
            by_row.setdefault(row, []).append(int(seed))
    lines = []
    for row, seeds in by_row.items():
        per_seed = [intervals.arms(table, [name(row, s), "base"], task=TASK) for s in seeds]
        for s, data in zip(seeds, per_seed):
            lines.append(_line(row, s, intervals.nll(data, name(row, s), **kw),
                               intervals.difference(data, name(row, s), "base", **kw), len(data["base"][0])))
        if len(seeds) > 1:
            units = [dict(zip(("row", "base"), d.values())) for d in per_seed]
            lines.append(_line(row, -1, intervals.hierarchical(lambda m: m["row"], units, **kw),
                               intervals.hierarchical(lambda m: m["row"] - m["base"], units, **kw),
                               len(units[0]["base"][0])))
    base = intervals.arms(table, ["base"], task=TASK)
    return pd.DataFrame(lines).assign(base_nll=intervals.nll(base, "base", **kw).estimate)


def _line(row: str, seed: int, nll: intervals.Interval, change: intervals.Interval, n: int) -> dict:
    over = isinstance(change, intervals.SeedInterval)
    return dict(row=row, seed=seed, nll=nll.estimate, nll_low=nll.low, nll_high=nll.high,
                change=change.estimate, change_low=change.low, change_high=change.high, n_passages=n,
                n_seeds=len(change.per_seed) if over else 1, per_seed=change.per_seed if over else (),
                pair_half=change.pair_half if over else float("nan"),
                seed_half=change.seed_half if over else float("nan"))


def reading(line) -> str:
    """A change in words, as far as its interval goes: a fall reads as repair or format adaptation, a
    rise as forgetting; otherwise not resolved, with what would resolve it."""
    row = dict(estimate=line["change"], low=line["change_low"], high=line["change_high"], n_pairs=line["n_passages"])
    call = verdicts.difference_call(row)
    if call == verdicts.BELOW:
        return f"lower: {FALL}"
    if call == verdicts.ABOVE:
        return f"higher: {RISE}"
    if call == verdicts.TOO_FEW:
        return f"not resolved: {int(line['n_passages'])} passages are too few (findings from {verdicts.MIN_PAIRS} up)"
    if line["n_seeds"] > 1:
        what, need = intervals.to_resolve(line["change"], line["pair_half"], line["seed_half"],
                                          int(line["n_passages"]), int(line["n_seeds"]))
    else:
        what, need = "passages", intervals.pairs_to_resolve(intervals.Interval(row["estimate"], row["low"],
                                                                                 row["high"]), int(line["n_passages"]))
    if what == "seeds":
        return ("not resolved (more seeds would resolve it, not more passages: "
                + (f"about {need} at this spread)" if need else "more than 50 at this spread)"))
    if need is None or what == "none":
        return "not resolved (the change sits at 0)"
    return f"not resolved (about {need} passages would resolve it)"


# --- the report -------------------------------------------------------------------------------------


def report_blocks(out: Path, prose_passages: int, step: int | None = None) -> list[tuple]:
    """The report's section: the base model's English NLL, then per row (pooled over its seeds where it
    has several) its change with the interval and the reading; the arms with no English score named.
    `step`: the same for the runs as scored at that earlier step."""
    found = changes(out, step)
    title = "English prose: the quantisation control" + (f", the runs at step {step}" if step else "")
    if found is None or found.empty:
        return [] if not prose_passages else [("h2", title), (
            "p", "No English scores yet (prose.parquet holds no base model and tuned run on one passage set).")]
    pooled = set(found.loc[found["seed"] == -1, "row"])
    shown = found[(found["seed"] == -1) | ~found["row"].isin(pooled)]
    cells = [dict(row=label(r["row"], out), seeds=(f"{r['n_seeds']} pooled" if r["seed"] == -1 else str(r["seed"])),
                  english_nll=f"{r['nll']:.3f} [{r['nll_low']:.3f}, {r['nll_high']:.3f}]",
                  change=f"{r['change']:+.4f} [{r['change_low']:+.4f}, {r['change_high']:+.4f}]"
                         + (f" ({', '.join(f'{v:+.4f}' for v in r['per_seed'])})" if r["seed"] == -1 else ""),
                  relative=f"{r['change'] / r['base_nll']:+.2%}", reading=reading(r)) for _, r in shown.iterrows()]
    n, base = int(found["n_passages"].iloc[0]), found["base_nll"].iloc[0]
    missing = sorted(set(scored_arms(out)) - set(io.read_parquet(out / PROSE)["arm"]))
    text = (f"Every arm scored {n} passages of {PASSAGE_TOKENS} tokens of English prose (Python's "
            "pydoc_data.topics, evenly spaced over its running text; no row trains on English), the first token "
            f"of each passage as context only. Base model: {base:.3f} nats per token. change = NLL row - NLL base "
            "on the same passages, nats per token, with its 95% interval (paired bootstrap over passages; rows "
            "with several seeds: the mean over seeds with the interval of `intervals.over_seeds`, each seed's "
            f"change in parentheses). A fall reads as {FALL}: a gain the new language does not explain (repair "
            "of the weights' rounding where they are quantised, as the embedded model's 4-bit blocks are, or "
            f"adaptation to the text format), which a row's gain on the translation tasks may hold too; a rise "
            f"reads as {RISE}.")
    if missing:
        text += f" No English score (their weights were gone when the control was asked for): {', '.join(missing)}."
    return [("h2", title), ("p", text), ("table", pd.DataFrame(cells))]

