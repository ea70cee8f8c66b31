"""The evidence study's headline: does CogSym land within 3% of full fine-tuning, beat its same-size
controls, and does the derived budget beat the fixed rule? On every language given, over its seeds.

    python analyses/evidence.py nahuatl=analyses/evidence/axolotl otomi=analyses/evidence/tsunkua

Reads each study folder of `cogprobe run --preset standard` (its tables; no weights needed) and writes
figures/evidence.csv (tidy: language, row, other, task, quantity, estimate, low, high, n_pairs,
n_seeds) and figures/evidence.md (the sentences the intervals allow, and the table behind them).
Every quantity is the mean over the study's seeds with a two-stage bootstrap interval (seeds, then
the shared test pairs: `intervals.hierarchical`); with one seed, the paired bootstrap over pairs.
A finding is worded only as far as its interval goes (`verdicts`): a difference whose interval
holds 0 is "not resolved", with the number of pairs that would resolve it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from _common import FIGURES, table

from cogprobe import intervals, io, layout, verdicts
from cogprobe.rows import kind
from cogprobe.tasks import TASKS

# (row, other, quantity): what the headline compares. share_minus: share(row) - share(other) of full
# fine-tuning's gain, paired; rel_deviation: (NLL row - NLL other) / NLL other, the paper's yardstick
QUESTIONS = [("cogsym", "full", "rel_deviation"), ("cogsym-lora", "lora", "rel_deviation"),
             ("cogsym", "blocks", "share_minus"), ("cogsym", "middle", "share_minus"),
             ("cogsym", "bottom", "share_minus"), ("cogsym", "top", "share_minus"),
             ("cogsym", "random", "share_minus"), ("budget", "cogsym", "share_minus"),
             ("cogsym-ends", "cogsym", "share_minus")]
COLUMNS = ["language", "row", "other", "task", "quantity", "estimate", "low", "high", "n_pairs", "n_seeds"]


def statistic(quantity: str):
    if quantity == "rel_deviation":
        return lambda m: (m["row"] - m["other"]) / m["other"]
    return lambda m: ((m["base"] - m["row"]) - (m["base"] - m["other"])) / (m["base"] - m["full"])


def one(scores: pd.DataFrame, seeds: list[int], row: str, other: str, quantity: str, task: str) -> dict | None:
    """The mean over seeds of one comparison, with its interval (None if a seed lacks an arm)."""
    present = set(scores["arm"])
    data = []
    for seed in seeds:
        names = {"row": layout.arm(row, seed), "other": layout.arm(other, seed), "base": "base",
                 "full": layout.arm("full", seed)}
        if not set(names.values()) <= present:
            return None
        got = intervals.arms(scores, list(dict.fromkeys(names.values())), task=task)
        data.append({k: got[v] for k, v in names.items()})
    f = statistic(quantity)
    i = intervals.hierarchical(f, data) if len(data) > 1 else intervals.paired(f, data[0])
    return dict(row=row, other=other, task=task, quantity=quantity, estimate=i.estimate, low=i.low, high=i.high,
                n_pairs=len(data[0]["row"][0]), n_seeds=len(data))


def rows_of(language: str, study: Path) -> list[dict]:
    scores, compare = table(study, layout.SCORES), table(study, layout.COMPARE)
    seeds = sorted(int(s) for s in compare["seed"].unique())
    draws = sorted({r for r in compare["row"] if kind(r) == "random"})
    out = []
    for row, other, quantity in QUESTIONS:
        for theirs in (draws if other == "random" else [other]):
            for task in TASKS:
                found = one(scores, seeds, row, theirs, quantity, task)
                if found is not None:
                    out.append(dict(language=language, **found))
    return out


def sentences(rows: pd.DataFrame) -> list[str]:
    """The headline in words, per language and task, each only as far as its interval allows."""
    lines = []
    for language, g in rows.groupby("language", sort=False):
        for task in TASKS:
            t = g[g["task"] == task].set_index(["row", "other", "quantity"])
            said = []
            for (row, other, quantity), r in t.iterrows():
                if quantity == "rel_deviation":
                    words = verdicts.within_bar(r).replace("full fine-tuning", other)
                else:
                    words = verdicts.difference_words(r, f"{row} keeps more of the gain than {other}",
                                                      f"{row} keeps less of the gain than {other}")
                said.append(f"{row} vs {other} ({quantity.replace('_', ' ')} {verdicts.fmt(r)}): {words}")
            lines.append(f"**{language}, {task}** (n = {int(g['n_pairs'].iloc[0])} test pairs, "
                         f"{int(g['n_seeds'].iloc[0])} seed(s)):\n" + "\n".join(f"- {s}" for s in said))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", help="LANGUAGE=STUDY_DIR, a folder of `cogprobe run --preset standard`")
    a = p.parse_args()
    rows = []
    for spec in a.studies:
        language, _, folder = spec.partition("=")
        if not folder:
            p.error(f"{spec!r}: write LANGUAGE=STUDY_DIR, e.g. nahuatl=analyses/evidence/axolotl")
        rows += rows_of(language, Path(folder))
    rows = pd.DataFrame(rows, columns=COLUMNS)
    io.write_text(FIGURES / "evidence.csv", rows.to_csv(index=False))
    io.write_text(FIGURES / "evidence.md", "\n\n".join(sentences(rows)) + "\n")
    print(FIGURES / "evidence.csv")


if __name__ == "__main__":
    main()
