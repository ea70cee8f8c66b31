"""The pivot-only control of a study: what a row gains from tuning on text with no word of the new
language, subtracted from its gain on the real task (rows `ROW@pivot`, `cogprobe/study/rows.py`).

A row's test gain (NLL base - NLL row) holds more than the language: repair of the 4-bit weights'
rounding, the prompt format, the pivot language's own text. `ROW@pivot` tunes ROW's parameters at
ROW's learning rate, steps and packed rows on the pivot side of the same training pairs alone, so
its gain is the part that needs no word of the new language. Per row that has its control, task
and seed (and pooled over seeds where there are several), on the same test pairs:

  gain          NLL base - NLL row
  pivot_gain    NLL base - NLL row@pivot: the language-independent part
  net_gain      NLL row@pivot - NLL row = gain - pivot_gain: what the new language's text added
  pivot_part    pivot_gain / gain
  share         the row's share of full fine-tuning's gain, (NLL base - NLL row) / (NLL base - NLL full)
  net_share     the same with both gains net of their controls (needs full@pivot):
                (NLL row@pivot - NLL row) / (NLL full@pivot - NLL full)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cogprobe.core import intervals, io
from cogprobe.core.layout import COMPARE, RUNS, SCORES, STUDY, TRAIN_LOG, arm, arm_at
from cogprobe.data.tasks import TASKS
from cogprobe.study import verdicts
from cogprobe.study.rows import PIVOT_ONLY, controlled, label

STATISTICS = {
    "gain": lambda m: m["base"] - m["row"],
    "pivot_gain": lambda m: m["base"] - m["pivot"],
    "net_gain": lambda m: m["pivot"] - m["row"],
    "pivot_part": lambda m: (m["base"] - m["pivot"]) / (m["base"] - m["row"]),
    "share": lambda m: (m["base"] - m["row"]) / (m["base"] - m["full"]),
    "net_share": lambda m: (m["pivot"] - m["row"]) / (m["full_pivot"] - m["full"]),
}


def _units(scores: pd.DataFrame, row: str, seed: int, task: str, step: int) -> dict:
    """{role: (nll sums, token counts)} of one seed's arms on the same test pairs (roles: row, pivot,
    base, full and, where it was run, full_pivot); with `step` (the study's `pivot_steps`) the row and
    full fine-tuning as scored at that step, where their controls stopped."""
    at = (lambda r: arm_at(r, seed, step)) if step else (lambda r: arm(r, seed))  # noqa: E731
    roles = {"row": at(row), "pivot": arm(row + PIVOT_ONLY, seed), "base": "base",
             "full": at("full"), "full_pivot": arm("full" + PIVOT_ONLY, seed)}
    present = set(scores["arm"])
    names = [n for n in dict.fromkeys(roles.values()) if n in present]
    data = intervals.arms(scores, names, task=task)
    return {role: data[name] for role, name in roles.items() if name in data}


def subtracted(out: Path, **kw) -> pd.DataFrame | None:
    """One line per (row, seed, task, quantity) for every row whose pivot-only control was compared
    (seed -1: the mean over its seeds, with `intervals.hierarchical`); None where no row has one."""
    if not (out / COMPARE).is_file() or not (out / SCORES).is_file():
        return None
    compare, scores = io.read_parquet(out / COMPARE), io.read_parquet(out / SCORES)
    step = pivot_step(out)
    done = set(zip(compare["row"], compare["seed"].astype(int)))
    scored = set(scores["arm"])
    seeds_of: dict[str, list[int]] = {}
    for row, seed in sorted(done):
        if controlled(row) == row and (row + PIVOT_ONLY, seed) in done and ("full", seed) in done \
                and (not step or {arm_at(row, seed, step), arm_at("full", seed, step)} <= scored):
            seeds_of.setdefault(row, []).append(seed)
    lines = []
    for row, seeds in seeds_of.items():
        for task in TASKS:
            units = [_units(scores, row, s, task, step) for s in seeds]
            names = [q for q in STATISTICS if not (row == "full" and "share" in q)   # 100% by definition
                     and (q != "net_share" or all("full_pivot" in u for u in units))]
            for q in names:
                for s, u in zip(seeds, units):
                    lines.append(_line(row, s, task, q, intervals.paired(STATISTICS[q], u, **kw), len(u["base"][0])))
                if len(seeds) > 1:
                    lines.append(_line(row, -1, task, q, intervals.hierarchical(STATISTICS[q], units, **kw),
                                       len(units[0]["base"][0])))
    return pd.DataFrame(lines) if lines else None


def pivot_step(out: Path) -> int:
    """The step the study's pivot-only controls stopped at and are read at (`pivot_steps`; 0: the end)."""
    return int(io.read_json(Path(out) / STUDY).get("pivot_steps") or 0)


def _line(row: str, seed: int, task: str, quantity: str, i: intervals.Interval, n: int) -> dict:
    over = isinstance(i, intervals.SeedInterval)
    return dict(row=row, seed=seed, task=task, quantity=quantity, estimate=i.estimate, low=i.low, high=i.high,
                n_pairs=n, n_seeds=len(i.per_seed) if over else 1,
                per_seed=";".join(f"{v:.6g}" for v in i.per_seed) if over else "",
                pair_half=i.pair_half if over else float("nan"), seed_half=i.seed_half if over else float("nan"))


def report_blocks(out: Path) -> list[tuple]:
    """The report's section: per row with a pivot-only control and task, its gain, the control's, what
    the new language added and the share of full fine-tuning's gain before and after the subtraction."""
    found = subtracted(out)
    if found is None:
        return []
    first = found[found["seed"] >= 0].groupby("row")["seed"].min()   # one seed: its own lines
    pooled = set(found.loc[found["seed"] == -1, "row"])
    shown = found[(found["seed"] == -1) | (~found["row"].isin(pooled) & (found["seed"] == found["row"].map(first)))]
    cells = []
    for (row, task), g in shown.groupby(["row", "task"], sort=False):
        got = {r["quantity"]: r for _, r in g.iterrows()}
        net = got["net_gain"]
        cells.append(dict(row=label(row, out), task=task, seeds=int(net["n_seeds"]),
                          **{q: _cell(got[q], q) if q in got else "" for q in STATISTICS},
                          tokens=_tokens(out, row, int(g["seed"].max()) if (g["seed"] >= 0).any() else None),
                          reading=verdicts.difference_words(
                              net, "the new language's text adds to the gain",
                              "pivot-only text gains more than the real task")))
    step = pivot_step(out)
    how = (f"learning rate and packed rows, for the first {step} steps of ROW's schedule (ROW and full "
           f"fine-tuning are read as scored at step {step}), " if step else "learning rate, steps and packed rows ")
    text = (f"Each `ROW{PIVOT_ONLY}` tuned ROW's parameters at ROW's {how}on the pivot side of the same training pairs as plain text, no word of the new language. On the same "
            "test pairs (nats per token; 95% intervals, pooled over seeds with `intervals.over_seeds` where "
            "there are several): gain = NLL base - NLL row; pivot_gain = NLL base - NLL row@pivot, the part "
            "that needs no word of the new language (repair of the weights' rounding, the format, the pivot's "
            "own text); net_gain = gain - pivot_gain; pivot_part = pivot_gain / gain; share = the row's share "
            "of full fine-tuning's gain; net_share = the same with both gains net of their controls "
            "(needs full@pivot); tokens = the real tokens the row and its control trained on (the same steps of "
            "as many packed rows; the translation examples train on their translated side, pivot text on every "
            "token). The reading is worded from net_gain's interval.")
    return [("h2", "Pivot-only control: the gain the new language does not explain"), ("p", text),
            ("table", pd.DataFrame(cells))]


def _tokens(out: Path, row: str, seed: int | None) -> str:
    """Real (non-padding) tokens the row and its control trained on, from their train logs (one seed's;
    the same rows of the same length, packed from examples of other lengths). runs/ is never committed:
    where the logs are gone (a study continued on another machine) the cell says so, not blank."""
    seeds = [seed] if seed is not None else sorted({int(s) for s in io.read_parquet(out / COMPARE)["seed"]})
    logs = [out / RUNS / arm(r, seeds[0]) / TRAIN_LOG for r in (row, row + PIVOT_ONLY)]
    if not all(log.is_file() for log in logs):
        return "logs not on disk"
    step = pivot_step(out) or float("inf")   # the row's tokens up to where it is read
    return " / ".join(f"{int(t.loc[t['step'] <= step, 'tokens'].max()):,}"
                      for t in (io.read_parquet(log) for log in logs))


def _cell(r, quantity: str) -> str:
    """estimate [low, high], each seed's estimate in parentheses where there are several."""
    percent = quantity in ("pivot_part", "share", "net_share")
    f = (lambda x: f"{x:.1%}") if percent else (lambda x: f"{x:.3f}")
    seeds = [f(float(v)) for v in r["per_seed"].split(";")] if r["per_seed"] else []
    return verdicts.fmt(r, percent) + (f" ({', '.join(seeds)})" if seeds else "")
