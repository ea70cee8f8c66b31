"""The evidence study's headline: does CogSym land within 3% of full fine-tuning, beat its same-size
controls, and does the derived budget beat the fixed rule? On every language given, over its seeds.

    python analyses/evidence.py nahuatl=analyses/evidence/axolotl otomi=analyses/evidence/tsunkua

Reads each study folder of `cogprobe run --preset standard` (its tables; no weights needed) and writes
  figures/evidence.csv       the comparisons (tidy: language, row, other, task, quantity, estimate,
                             low, high, n_pairs, n_seeds, n_draws),
  figures/evidence_rows.csv  every row's own numbers (test NLL, share of full fine-tuning's gain,
                             relative deviation, chrF and its relative deviation, conditional gain;
                             the base model's conditional gain too, with n_seeds 0), same columns,
  figures/evidence_cost.csv  the wall time of each part of each language's study, and its machines,
  figures/evidence_status.csv  per language, the runs compared of those planned (a study still
                             running is published as far as it got, and says so first),
  figures/evidence.md        a table per language, the sentences the intervals allow, the wall times.
Every quantity is the mean over the study's seeds with a two-stage bootstrap interval (seeds, then
the shared test pairs: `intervals.hierarchical`, `translate.chrf_over_seeds` for chrF); with one
seed, the paired bootstrap over pairs. The random same-size sets are read as a distribution: CogSym
against each draw, and against all draws pooled (every (seed, draw) a unit of the outer resample).
A finding is worded only as far as its interval goes (`verdicts`): a difference whose interval
holds 0 is "not resolved", with the number of pairs that would resolve it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from _common import FIGURES, table

from cogprobe.tuning import devcurve
from cogprobe.core import intervals
from cogprobe.core import io
from cogprobe.core import layout
from cogprobe.tuning import plateau
from cogprobe.study import verdicts
from cogprobe.core.intervals import Interval
from cogprobe.study.rows import kind
from cogprobe.study.config import StudyConfig
from cogprobe.data.tasks import TASKS
from cogprobe.tuning.config import warmup_steps
from cogprobe.data.translate import chrf_over_seeds, sentence_stats

RANDOM = "random"   # `other` of the pooled comparison against every random draw
# (row, other, quantity): what the headline compares. share_minus: share(row) - share(other) of full
# fine-tuning's gain, paired; rel_deviation: (NLL row - NLL other) / NLL other, the paper's yardstick;
# chrf_rel_deviation: (chrF other - chrF row) / chrF other (positive: the row is worse, as for NLL).
# Each is put as the yes-or-no question the headline table answers (as far as its interval allows)
BAR = f"{verdicts.BAR:.0%}"   # the paper's bar, as every sentence here words it
HEADLINE = {("cogsym", "full", "rel_deviation"): f"CogSym within {BAR} of full fine-tuning, test NLL",
            ("cogsym", "full", "chrf_rel_deviation"): f"CogSym within {BAR} of full fine-tuning, chrF",
            ("cogsym-lora", "lora", "rel_deviation"): f"CogSym-LoRA within {BAR} of LoRA on every block, test NLL",
            ("cogsym-lora", "lora", "chrf_rel_deviation"): f"CogSym-LoRA within {BAR} of LoRA on every block, chrF",
            ("cogsym-lora-matched", "lora", "rel_deviation"):
                f"CogSym-LoRA at all-block LoRA's parameter count within {BAR} of it, test NLL",
            ("cogsym", "blocks", "share_minus"): "CogSym keeps more of the gain than every block (ends frozen in both)",
            ("cogsym", "middle", "share_minus"): "CogSym keeps more of the gain than the middle set of its size",
            ("cogsym", "bottom", "share_minus"): "CogSym keeps more of the gain than the bottom set of its size",
            ("cogsym", "top", "share_minus"): "CogSym keeps more of the gain than the top set of its size",
            ("cogsym", RANDOM, "share_minus"): "CogSym keeps more of the gain than random sets of its size (draws pooled)",
            ("budget", "cogsym", "share_minus"): "The derived budget keeps more of the gain than CogSym",
            ("cogsym-ends", "cogsym", "share_minus"): "Training embeddings and head as well adds to CogSym"}
QUESTIONS = list(HEADLINE)
ANSWER = {verdicts.WITHIN: "yes", verdicts.BEYOND: "no", verdicts.ABOVE: "yes", verdicts.BELOW: "no",
          verdicts.UNRESOLVED: "not resolved", verdicts.TOO_FEW: "too few pairs"}
OWN = ["nll", "share", "rel_deviation", "chrf", "chrf_rel_deviation"]   # each row's own numbers, vs full
COLUMNS = ["language", "row", "other", "task", "quantity", "estimate", "low", "high", "n_pairs", "n_seeds",
           "n_draws"]
CHRF = ("chrf", "chrf_rel_deviation")
PERCENT = ("share", "rel_deviation", "chrf_rel_deviation", "share_minus")


def statistic(quantity: str):
    """The quantity as a function of {name: mean NLL or chrF} with names row, other, base, full."""
    return {"nll": lambda m: m["row"], "chrf": lambda m: m["row"],
            "share": lambda m: (m["base"] - m["row"]) / (m["base"] - m["full"]),
            "rel_deviation": lambda m: (m["row"] - m["other"]) / m["other"],
            "chrf_rel_deviation": lambda m: (m["other"] - m["row"]) / np.where(m["other"] > 0, m["other"], np.nan),
            "share_minus": lambda m: ((m["base"] - m["row"]) - (m["base"] - m["other"])) / (m["base"] - m["full"]),
            }[quantity]


def units(seeds: list[int], row: str, other: str, draws: list[str]) -> list[dict]:
    """One {name: arm} per unit of the outer resample: per seed, and per (seed, draw) against `random`."""
    return [{"row": layout.arm(row, s), "other": layout.arm(o, s), "base": "base", "full": layout.arm("full", s)}
            for s in seeds for o in (draws if other == RANDOM else [other])]


def interval(study: dict, quantity: str, task: str, names: list[dict]) -> tuple[Interval, int] | None:
    """The mean over units of one quantity with its interval, and the pairs it rests on (None if
    an arm is missing). NLL quantities read scores.parquet, chrF ones translations.parquet."""
    f = statistic(quantity)
    if quantity in CHRF:
        data = []
        for unit in names:
            stats = sentence_stats(study["translations"], list(dict.fromkeys(unit.values())), task)
            if not set(unit.values()) <= set(stats):
                return None
            data.append({k: stats[v] for k, v in unit.items()})
        return chrf_over_seeds(f, data), len(data[0]["row"])
    if not {a for unit in names for a in unit.values()} <= set(study["scores"]["arm"]):
        return None
    data = []
    for unit in names:
        got = intervals.arms(study["scores"], list(dict.fromkeys(unit.values())), task=task)
        data.append({k: got[v] for k, v in unit.items()})
    found = intervals.hierarchical(f, data) if len(data) > 1 else intervals.paired(f, data[0])
    return found, len(data[0]["row"][0])


def read(study: Path) -> dict | None:
    """The study's tables, or None while no run of it is compared yet."""
    if not (study / layout.COMPARE).is_file():
        return None
    compare = table(study, layout.COMPARE)
    return dict(scores=table(study, layout.SCORES), translations=table(study, layout.TRANSLATIONS),
                compare=compare, seeds=sorted(int(s) for s in compare["seed"].unique()),
                draws=sorted({r for r in compare["row"] if kind(r) == "random"}))


def status(language: str, folder: Path, study: dict | None) -> dict:
    """How far the study has got: the runs compared of those its config plans."""
    config = StudyConfig.read(folder)
    planned = [layout.arm(r, s) for s in config.seed_list() for r in config.row_list()]
    compared = set() if study is None else {layout.arm(r, s) for r, s in zip(study["compare"]["row"],
                                                                                   study["compare"]["seed"])}
    return dict(language=language, compared=sum(a in compared for a in planned), planned=len(planned),
                rows=len(config.row_list()), seeds=config.seeds)


def setting(language: str, folder: Path) -> str:
    """What one language's study ran, in words: its model, the steps of every run and why that many
    (with `converge`: where full fine-tuning's dev NLL met the plateau rule, or the cap it had not)."""
    config = StudyConfig.read(folder)
    steps = io.read_json(folder / layout.STUDY).get(layout.RUN_LENGTH, config.steps)
    words = f"{language}: {config.model}, {steps} steps per run"
    curves = folder / layout.DEV_CURVES
    if not config.converge or not curves.is_file():
        return words
    full = table(folder, layout.DEV_CURVES)
    curve = devcurve.mean_nll(full[full["arm"] == layout.arm("full", config.seed_list()[0])])
    if not curve or curve[-1][0] != steps:
        return words
    last = plateau.check(curve, config.plateau_window, config.plateau_min_improvement,   # as `train` judged it
                         warmup_steps(config.warmup, config.steps))
    if last.converged:
        return f"{words}, where full fine-tuning's dev NLL plateaued"
    if last.reference_step is None:   # too few evaluations for the rule to judge
        return words
    return (f"{words}, the cap: full fine-tuning's best dev NLL still fell {last.improvement:.1%} over the last "
            f"{config.plateau_window:.0%} of its steps ({plateau.best(curve, last.reference_step):.3f} at step "
            f"{last.reference_step}, {last.best_nll:.3f} at {steps}), above the {config.plateau_min_improvement:.0%} "
            "plateau bar")


def status_line(s) -> str:
    """The status in words; a study still running is published with this line first, so no reader
    takes what it has for the whole."""
    line = f"**{s['language']}**: {s['compared']} of {s['planned']} runs compared ({s['rows']} rows x seeds {s['seeds']})"
    if s["compared"] == s["planned"]:
        return line + "."
    return line + ("; **in progress**: every number below rests on the runs compared so far (a comparison "
                   "on the seeds that have both of its rows).")


def rows_of(language: str, study: dict, asked: list[tuple[str, str, str]]) -> list[dict]:
    """One record per (row, other, quantity, task) of `asked`, over the seeds that have every arm of it
    (all seeds once the study is done; fewer while it runs, and `n_seeds` says how many)."""
    out = []
    have = set(study["scores"]["arm"])
    for row, other, quantity in asked:
        theirs = ([RANDOM] + study["draws"]) if other == RANDOM else [other]
        for o in theirs:
            n_draws = len(study["draws"]) if o == RANDOM else 1
            seeds = [s for s in study["seeds"] if (us := units([s], row, o, study["draws"]))   # no draw yet: none
                     and {a for u in us for a in u.values()} <= have]
            if not seeds:
                continue
            for task in TASKS:
                found = interval(study, quantity, task, units(seeds, row, o, study["draws"]))
                if found is not None:
                    i, n = found
                    out.append(dict(language=language, row=row, other=o, task=task, quantity=quantity,
                                    estimate=i.estimate, low=i.low, high=i.high, n_pairs=n,
                                    n_seeds=len(seeds), n_draws=n_draws))
    return out


def own_rows(language: str, study: dict) -> list[dict]:
    names = list(dict.fromkeys(study["compare"]["row"]))
    return (rows_of(language, study, [(r, "full", q) for r in names for q in OWN if not (r == "full" and "dev" in q)])
            + conditional_gains(language, study))


def conditional_gains(language: str, study: dict) -> list[dict]:
    """Per row (and the base model) and task: test NLL with a shuffled source minus with the true one
    (same pairs), i.e. how much the model reads the source it translates; mean over the row's seeds."""
    scores = study["scores"]
    keyed = scores.assign(arm=scores["arm"] + "|" + scores["task"])   # one arm per (run, task or control)
    present = set(keyed["arm"])
    out = []
    for row in ["base", *dict.fromkeys(study["compare"]["row"])]:
        for task in TASKS:
            runs = ["base"] if row == "base" else [layout.arm(row, s) for s in study["seeds"]]
            runs = [a for a in runs if {f"{a}|{task}", f"{a}|{task}-shuffled"} <= present]
            if not runs:
                continue
            data = [dict(zip(("true", "shuffled"), intervals.arms(
                keyed, [f"{a}|{task}", f"{a}|{task}-shuffled"]).values())) for a in runs]
            gain = lambda m: m["shuffled"] - m["true"]  # noqa: E731
            i = intervals.hierarchical(gain, data) if len(data) > 1 else intervals.paired(gain, data[0])
            out.append(dict(language=language, row=row, other="", task=task, quantity="conditional_gain",
                            estimate=i.estimate, low=i.low, high=i.high, n_pairs=len(data[0]["true"][0]),
                            n_seeds=len(runs) if row != "base" else 0, n_draws=1))
    return out


def sentences(rows: pd.DataFrame) -> list[str]:
    """The headline in words, per language and task, each only as far as its interval allows."""
    lines = []
    for language, g in rows.groupby("language", sort=False):
        for task in TASKS:
            t = g[g["task"] == task]
            said = []
            for _, r in t.iterrows():
                other = f"{r['other']} sets ({int(r['n_draws'])} draws pooled)" if r["other"] == RANDOM else r["other"]
                if np.isnan(r["estimate"]):
                    words = f"not defined ({other}'s chrF is 0 on these sentences)"
                elif r["quantity"] in ("rel_deviation", "chrf_rel_deviation"):
                    words = verdicts.within_bar(r).replace("full fine-tuning", other)
                else:
                    words = verdicts.difference_words(r, f"{r['row']} keeps more of the gain than {other}",
                                                      f"{r['row']} keeps less of the gain than {other}")
                fewer = f", on {int(r['n_seeds'])} seed(s)" if r["n_seeds"] < t["n_seeds"].max() else ""
                said.append(f"{r['row']} vs {other} ({r['quantity'].replace('_', ' ')} {_cell(r, r['quantity'])}"
                            f"{fewer}): {words}")
            if said:
                lines.append(f"**{language}, {task}** (n = {int(t['n_pairs'].max())} test pairs, chrF on "
                             f"{_chrf_pairs(t)}, {int(t['n_seeds'].max())} seed(s)):\n"
                             + "\n".join(f"- {s}" for s in said))
    return lines


def headline_table(found: pd.DataFrame) -> str:
    """Markdown: one line per HEADLINE question, one column per (language, task); each cell the answer
    its interval allows (yes, no, not resolved) and the estimate [interval], "" where not yet compared."""
    columns = list(dict.fromkeys(zip(found["language"], found["task"])))
    if not columns:
        return ""
    cells = found.set_index(["row", "other", "quantity", "language", "task"])
    seeds = found.groupby("language")["n_seeds"].max()
    lines = ["| question | " + " | ".join(f"{lang} {task}" for lang, task in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for (row, other, quantity), question in HEADLINE.items():
        out = []
        for lang, task in columns:
            if (row, other, quantity, lang, task) not in cells.index:
                out.append("")
                continue
            r = cells.loc[(row, other, quantity, lang, task)]
            call = verdicts.bar_call(r) if "rel_deviation" in quantity else verdicts.difference_call(r)
            fewer = f", {int(r['n_seeds'])} of {int(seeds[lang])} seeds" if r["n_seeds"] < seeds[lang] else ""
            out.append("n/a" if np.isnan(r["estimate"]) else f"{ANSWER[call]}: {_cell(r, quantity)}{fewer}")
        lines.append(f"| {question} | " + " | ".join(out) + " |")
    pairs = {lang: int(g["n_pairs"].max()) for lang, g in found[~found["quantity"].isin(CHRF)].groupby("language")}
    return "\n".join([
        "Headline: each question answered only as far as its 95% interval goes (yes, no, or not resolved), "
        "then the estimate [interval], the mean over "
        + ", ".join(f"{seeds[lang]} seed(s) and {pairs.get(lang, 0)} test pairs for {lang}" for lang in seeds.index)
        + f". Relative deviations: positive is worse than the reference, {BAR} the paper's bar; \"keeps more of "
        "the gain\": the difference of the two rows' shares of full fine-tuning's NLL gain. Every comparison "
        "in words, with the pairs that would resolve it, follows the tables.", ""] + lines)


# the paper's two claims the headline can test, as (row, other): what it says; each is read off the
# relative-deviation cells of `found` with the same calls as the headline table, so the two agree
PAPER = {("cogsym", "full"): "tuning only the outermost 25% of blocks (CogSym) lands within 2-3% of full fine-tuning",
         ("cogsym-lora", "lora"): "CogSym yields consistent performance with LoRA (read here: CogSym-LoRA "
                                   f"within {BAR} of LoRA on every block)"}
METRIC = {"rel_deviation": "NLL", "chrf_rel_deviation": "chrF"}
SIDE = {verdicts.WITHIN: f"agrees (within {BAR})",
        verdicts.BEYOND: f"goes against it (more than {BAR} worse)",
        verdicts.UNRESOLVED: f"does not decide (the interval straddles {BAR})",
        verdicts.TOO_FEW: "has too few pairs to say"}


def against_the_paper(found: pd.DataFrame, settings: list[str]) -> str:
    """Markdown: per claim of the paper, which (language, task, metric) cells of this study agree with
    it, go against it, or do not decide, by their intervals; `settings` says what was run (model,
    steps), since the paper's own setting is not known to us and a disagreement holds for this one."""
    claims = []
    for (row, other), claim in PAPER.items():
        mine = found[(found["row"] == row) & (found["other"] == other) & found["quantity"].isin(METRIC)]
        if mine.empty:
            continue
        cells: dict[str, list[str]] = {}
        for _, r in mine.iterrows():
            cells.setdefault(verdicts.bar_call(r), []).append(f"{r['language']} {r['task']} {METRIC[r['quantity']]}")
        said = "; ".join(f"{SIDE[call]} in {len(where)} of {len(mine)}: {', '.join(where)}"
                         for call, where in sorted(cells.items(), key=lambda kv: list(SIDE).index(kv[0])))
        claims.append(f"- The paper: {claim}. This study {said}.")
    if not claims:
        return ""
    return "\n".join([f"**Against the paper** ({'; '.join(settings)}; the paper's models, languages, steps and "
                      "metrics are not known to us, so a cell that goes against it says the claim does not carry "
                      "to this setting, not that its own numbers are wrong):", *claims])


def _by_row(compare: pd.DataFrame) -> pd.DataFrame:
    """One line per row (its first seed's): a row's blocks and trainable parameters are the same on every seed."""
    return compare.drop_duplicates("row").set_index("row")


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def budget_sizes(language: str, compare: pd.DataFrame) -> str:
    """The budget set and CogSym's, each with its trainable parameters: the budget rule picks its own
    size, and a bigger set can keep more of the gain by its size alone."""
    first = _by_row(compare)
    if not {"budget", "cogsym"} <= set(first.index):
        return ""
    if first.loc["budget", "trainable_params"] == first.loc["cogsym", "trainable_params"]:
        return ""   # a set of CogSym's size: the same-size controls are its controls too
    return f"{language} " + " against ".join(
        f"{row} {first.loc[row, 'blocks']} ({_millions(first.loc[row, 'trainable_params'])} trainable)"
        for row in ("budget", "cogsym"))


def budget_note(sizes: list[str]) -> str:
    sizes = [s for s in sizes if s]
    if not sizes:
        return ""
    return ("**The budget line compares two rules, each at the size it picks**: " + "; ".join(sizes)
            + ". No control of the budget's size was run, so whether its blocks are better chosen than other "
            "blocks of that count is not tested here.")


def _chrf_pairs(t: pd.DataFrame) -> str:
    chrf = t[t["quantity"].isin(CHRF)]
    return f"{int(chrf['n_pairs'].iloc[0])} sentences" if len(chrf) else "no sentences"


def row_table(own: pd.DataFrame, compare: pd.DataFrame, quantities: list[str]) -> str:
    """Markdown: one line per row with its blocks, trainable parameters and `quantities` per task
    (mean over seeds, interval in brackets; n/a where undefined, e.g. a deviation from a chrF of 0)."""
    cells = own.set_index(["row", "task", "quantity"])
    first = _by_row(compare)
    heads = [(q, t) for q in quantities for t in TASKS]
    lines = ["| row | blocks | trainable | " + " | ".join(f"{t} {q.replace('_', ' ')}" for q, t in heads) + " |",
             "|---|---|---|" + "---|" * len(heads)]
    for row in [r for r in dict.fromkeys(own["row"]) if r in first.index]:   # the base model has its own line
        vals = [_cell(cells.loc[(row, t, q)], q) if (row, t, q) in cells.index else "" for q, t in heads]
        lines.append(f"| {row} | {first.loc[row, 'blocks']} | {_millions(first.loc[row, 'trainable_params'])} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def _base_gain(own: pd.DataFrame) -> str:
    base = own[(own["row"] == "base") & (own["quantity"] == "conditional_gain")]
    return ", ".join(f"{r['task']} {verdicts.fmt(r)}" for _, r in base.iterrows()) or "not scored"


def _cell(r, quantity: str) -> str:
    if np.isnan(r["estimate"]):
        return "n/a"
    if quantity == "chrf":
        return f"{r['estimate']:.1f} [{r['low']:.1f}, {r['high']:.1f}]"
    return verdicts.fmt(r, percent=quantity in PERCENT)


def cost(language: str, folder: Path, seeds: list[int]) -> list[dict]:
    """Wall hours per part of one language's study: the learning-rate trials (each trial's own time,
    `lr_search.parquet`), what is done once (baseline, probe, select, report), and each seed's runs
    (its tune and compare stages), the one-off re-scoring of chrF when its set changed mid-study
    (`chrf` stages), with the machines they ran on (`runfolder.machine`, recorded per
    stage since 2026-11-29; "not recorded" before). A stage's time is that of the invocation that
    finished it (work lost to an interruption is not counted), or for a run resumed after one, the
    time its log holds (`logged_training`); trials recorded before their times
    were kept are counted at the mean of those that were, and said so."""
    record = io.read_json(folder / layout.STUDY)
    seconds, machines = record.get("stage_seconds", {}), record.get(layout.STAGE_MACHINES, {})
    where = lambda stages: "; ".join(sorted({machines.get(k, "not recorded") for k in stages}))  # noqa: E731
    out = []
    trials = table(folder, layout.LR_SEARCH) if (folder / layout.LR_SEARCH).is_file() else pd.DataFrame()
    if len(trials):
        timed = trials["seconds"].dropna() if "seconds" in trials else pd.Series(dtype=float)
        hours = timed.mean() * len(trials) / 3600 if len(timed) else float("nan")
        out.append(dict(language=language, part="learning-rate trials", hours=hours, runs=len(trials),
                        machines=where([k for k in seconds if k.startswith("choose lr")]),
                        note="" if len(timed) == len(trials) else
                        f"{len(trials) - len(timed)} of {len(trials)} trials untimed, counted at the mean of the rest"))
    once = [k for k in seconds if k in ("baseline", "probe", "select", "report")]
    out.append(dict(language=language, part="once (baseline, probe, select, report)",
                    hours=sum(seconds[k] for k in once) / 3600, runs=0, machines=where(once), note=""))
    rescored = [k for k in seconds if k.startswith("chrf ")]
    if rescored:
        out.append(dict(language=language, part="chrF scored again on the NLL pairs (once)",
                        hours=sum(seconds[k] for k in rescored) / 3600, runs=len(rescored) - ("chrf base" in seconds),
                        machines=where(rescored), note="the runs compared before chrf_pairs changed, and the base model"))
    logged = logged_training(folder, record.get(layout.RUN_LENGTH, record.get("steps")))
    for seed in seeds:
        mine = [k for k in seconds if k.startswith(("tune ", "compare ")) and k.endswith(f"-s{seed}")]
        took = {k: max(seconds[k], logged.get(k.removeprefix("tune "), 0.0)) for k in mine}
        resumed = sum(took[k] > seconds[k] for k in mine)
        out.append(dict(language=language, part=f"seed {seed}", hours=sum(took.values()) / 3600,
                        runs=sum(k.startswith("tune ") for k in mine), machines=where(mine),
                        note=f"{resumed} resumed runs counted from their logs" if resumed else ""))
    return out


def logged_training(folder: Path, steps: int | None) -> dict[str, float]:
    """Seconds each compared run spent on its `steps` and dev evaluations, over every session it ran
    in (`sec_per_step` x steps, from its log, plus its dev curve's `seconds`): a run resumed after an
    interruption has a tune stage that timed only its last part, and this is what it cost."""
    if steps is None or not (folder / layout.COMPARE).is_file():
        return {}
    compare = table(folder, layout.COMPARE)
    if "sec_per_step" not in compare:
        return {}
    dev = table(folder, layout.DEV_CURVES) if (folder / layout.DEV_CURVES).is_file() else pd.DataFrame()
    evals = dev.groupby("arm")["seconds"].sum() if {"arm", "seconds"} <= set(dev.columns) else pd.Series(dtype=float)
    return {layout.arm(r.row, r.seed): r.sec_per_step * steps + float(evals.get(layout.arm(r.row, r.seed), 0.0))
            for r in compare.itertuples()}


def cost_table(costs: pd.DataFrame) -> str:
    lines = ["Wall time (hours; `figures/evidence_cost.csv`), and the machines each part ran on:", "",
             "| language | part | hours | runs | machines | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.language} | {r.part} | {r.hours:.2f} | {r.runs} | {r.machines} | {r.note} |"
              for r in costs.itertuples()]
    totals = costs.groupby("language", sort=False)["hours"].sum()
    lines += ["", "In all (every part above; work lost to an interruption is not counted): "
              + "; ".join(f"{language} {hours:.1f} h" for language, hours in totals.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", help="LANGUAGE=STUDY_DIR, a folder of `cogprobe run --preset standard`")
    a = p.parse_args()
    found, own, tables, costs, head, settings, sizes = [], [], [], [], [], [], []
    for spec in a.studies:
        language, _, folder = spec.partition("=")
        if not folder:
            p.error(f"{spec!r}: write LANGUAGE=STUDY_DIR, e.g. nahuatl=analyses/evidence/axolotl")
        if not (Path(folder) / layout.STUDY).is_file():
            p.error(f"{folder}: no study.json there; start it with `cogprobe run --preset standard --out {folder}`")
        study = read(Path(folder))
        head.append(status(language, Path(folder), study))
        settings.append(setting(language, Path(folder)))
        costs += cost(language, Path(folder), StudyConfig.read(folder).seed_list())
        if study is None:
            continue
        found += rows_of(language, study, QUESTIONS)
        mine = pd.DataFrame(own_rows(language, study), columns=COLUMNS)
        own.append(mine)
        sizes.append(budget_sizes(language, study["compare"]))
        tables.append(f"**{language}**, test NLL (mean over the seeds that have the row and full fine-tuning; "
                      f"`n_seeds` in figures/evidence_rows.csv). Conditional gain: NLL with a shuffled source "
                      f"minus NLL with the true one, in nats (how much a model reads the source; the base "
                      f"model's: {_base_gain(mine)}):\n\n"
                      + row_table(mine, study["compare"], ["nll", "share", "rel_deviation", "conditional_gain"]))
        tables.append(f"**{language}**, chrF on test (same seeds):\n\n"
                      + row_table(mine, study["compare"], ["chrf", "chrf_rel_deviation"]))
    found = pd.DataFrame(found, columns=COLUMNS)
    io.write_text(FIGURES / "evidence.csv", found.to_csv(index=False))
    own = pd.concat(own, ignore_index=True) if own else pd.DataFrame(columns=COLUMNS)
    io.write_text(FIGURES / "evidence_rows.csv", own.to_csv(index=False))
    costs = pd.DataFrame(costs)
    io.write_text(FIGURES / "evidence_cost.csv", costs.to_csv(index=False))
    io.write_text(FIGURES / "evidence_status.csv", pd.DataFrame(head).to_csv(index=False))
    headline = [t for t in [headline_table(found), budget_note(sizes), against_the_paper(found, settings)] if t]
    lines = [status_line(s) for s in head] + headline + tables + sentences(found) + [cost_table(costs)]
    io.write_text(FIGURES / "evidence.md", "\n\n".join(lines) + "\n")
    print(FIGURES / "evidence.csv")


if __name__ == "__main__":
    main()
