"""The evidence study's headline, written out: does CogSym land within 3% of full fine-tuning, beat
its same-size controls, and does the derived budget beat the fixed rule? On every language given.

`write(studies, out)` puts into the folder `out` (the scripts in analyses/ pass figures/):
  evidence.csv         the comparisons (tidy: language, row, other, task, quantity, estimate, low,
                       high, n_pairs, n_seeds, n_draws),
  evidence_rows.csv    every row's own numbers (test NLL, share of full fine-tuning's gain, relative
                       deviation, chrF and its relative deviation, conditional gain; the base
                       model's conditional gain too, with n_seeds 0), same columns,
  evidence_cost.csv    the wall time of each part of each language's study, and its machines,
  evidence_status.csv  per language, the runs compared of those planned (a study still running is
                       published as far as it got, and says so first),
  evidence.md          a table per language, the sentences the intervals allow, the wall times;
and `figures(studies, out)` the figures beside them. The numbers come from `evidence_tables`; this
module words them. A finding is worded only as far as its interval goes (`verdicts`): a difference
whose interval holds 0 is "not resolved", with the number of pairs that would resolve it. The
package writes where it is told, so the scripts and a notebook choose the folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.core import layout
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import TASKS
from cogprobe.plots.style import publish
from cogprobe.plots.sweeps import specialization_curves
from cogprobe.study import verdicts
from cogprobe.study.comparisons import COMPARISONS, RANDOM
from cogprobe.study.config import StudyConfig
from cogprobe.study.evidence_tables import (CHRF, COLUMNS, QUESTIONS, blocks_per_seed, cost, own_rows, read,
                                            rows_of, setting, status, study_table)
from cogprobe.study.figures import same_size_rows, same_size_shares, share_curves
from cogprobe.study.rows import kind

BAR = f"{verdicts.BAR:.0%}"   # the paper's bar, as every sentence here words it
# each comparison as the yes-or-no question the headline table answers (as far as its interval allows)
HEADLINE = {(c.row, c.other, c.quantity): c.question for c in COMPARISONS}
ANSWER = {verdicts.WITHIN: "yes", verdicts.BEYOND: "no", verdicts.ABOVE: "yes", verdicts.BELOW: "no",
          verdicts.UNRESOLVED: "not resolved", verdicts.TOO_FEW: "too few pairs"}
PERCENT = ("share", "rel_deviation", "chrf_rel_deviation", "share_minus")
# the paper's claims the headline can test, as (row, other): what it says, under which reading; each is
# read off the relative-deviation cells of `found` with the same calls as the headline table, so the two
# agree. CogSym's is counted on the two matched readings only (`comparisons.toml`): the unmatched
# cogsym/full also measures freezing the ends, which the paper's rule does not say. The LoRA pair is
# matched (adapters on blocks only in both).
CLAIM = "tuning only the outermost 25% of blocks (CogSym) lands within 2-3% of full fine-tuning"
PAPER = {("cogsym", "blocks"): f"{CLAIM}; matched reading 1, embeddings and head frozen in both "
                               "(CogSym against every block)",
         ("cogsym-ends", "full"): f"{CLAIM}; matched reading 2, embeddings and head trained in both "
                                  "(CogSym-ends against full fine-tuning)",
         ("cogsym-lora", "lora"): "CogSym yields consistent performance with LoRA (read here: CogSym-LoRA "
                                   f"within {BAR} of LoRA on every block; both train adapters on blocks only, "
                                   "so the pair differs in its blocks alone)"}
UNMATCHED = ("cogsym", "full")
METRIC = {"rel_deviation": "NLL", "chrf_rel_deviation": "chrF"}
SIDE = {verdicts.WITHIN: f"agrees (within {BAR})",
        verdicts.BEYOND: f"goes against it (more than {BAR} worse)",
        verdicts.UNRESOLVED: f"does not decide (the interval straddles {BAR})",
        verdicts.TOO_FEW: "has too few pairs to say"}


def parse_studies(specs: list[str]) -> list[tuple[str, Path]]:
    """(language, study folder) of each LANGUAGE=STUDY_DIR, each folder a study (it has study.json)."""
    out = []
    for spec in specs:
        language, _, folder = spec.partition("=")
        if not folder:
            raise CogprobeError(f"{spec!r}: write LANGUAGE=STUDY_DIR, e.g. nahuatl=analyses/evidence/axolotl")
        if not (Path(folder) / layout.STUDY).is_file():
            raise CogprobeError(f"{folder}: no study.json there; start it with "
                                f"`cogprobe run --preset standard --out {folder}`")
        out.append((language, Path(folder)))
    return out


def write(studies: list[tuple[str, Path]], out: Path) -> list[Path]:
    """The tables and evidence.md of `studies` ((language, study folder), in the order given) in `out`."""
    found, own, tables, costs, head, settings, sizes = [], [], [], [], [], [], []
    for language, folder in studies:
        study = read(folder)
        head.append(status(language, folder, study))
        settings.append(setting(language, folder))
        costs += cost(language, folder, StudyConfig.read(folder).seed_list())
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
    out = Path(out)
    found = pd.DataFrame(found, columns=COLUMNS)
    io.write_text(out / "evidence.csv", found.to_csv(index=False))
    own = pd.concat(own, ignore_index=True) if own else pd.DataFrame(columns=COLUMNS)
    io.write_text(out / "evidence_rows.csv", own.to_csv(index=False))
    costs = pd.DataFrame(costs)
    io.write_text(out / "evidence_cost.csv", costs.to_csv(index=False))
    io.write_text(out / "evidence_status.csv", pd.DataFrame(head).to_csv(index=False))
    planned = planned_questions([StudyConfig.read(folder) for _, folder in studies])
    headline = [t for t in [headline_table(found, planned), budget_note(sizes), against_the_paper(found, settings)]
                if t]
    lines = [status_line(s) for s in head] + headline + tables + sentences(found) + [cost_table(costs)]
    io.write_text(out / "evidence.md", "\n\n".join(lines) + "\n")
    return [out / f"evidence{part}" for part in (".csv", "_rows.csv", "_cost.csv", "_status.csv", ".md")]


def last_checkpoint_reverts(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Revert rows of the last swept checkpoint (the probe run's end point)."""
    revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"].astype(bool)]
    return revert[revert["checkpoint_step"] == revert["checkpoint_step"].max()]


def figures(studies: list[tuple[str, Path]], out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """The evidence figures in `out`, each PNG with the CSV of its numbers beside it:
    evidence_share_curves (each row's dev NLL gain as a share of full fine-tuning's final one, against
    step, mean over seeds; a panel row per language), evidence_specialization_<language> (the study's
    probe run, the `blocks` run of the first seed, at its last checkpoint, 95% paired-bootstrap bands
    over its dev pairs) and evidence_same_size (CogSym against the sets of its size, each one's share of
    full fine-tuning's test-NLL gain, read from `out`/evidence_rows.csv, so `write` runs first). A study
    still running gives the figures of what it has, and `log` says what is not there yet."""
    out, curves, drawn = Path(out), [], []
    for language, folder in studies:
        if (folder / layout.DEV_CURVES).is_file():
            curves.append(study_table(folder, layout.DEV_CURVES).assign(language=language))
        else:
            log(f"{language}: no run compared yet, so no share curves (the study is still running)")
        if "probe" in io.read_json(folder / layout.STUDY).get(layout.STAGE_SECONDS, {}):   # sweeps whole
            sweeps = last_checkpoint_reverts(study_table(folder, layout.SWEEPS))
            drawn.append(publish(specialization_curves(sweeps), sweeps, out / f"evidence_specialization_{language}"))
        else:
            log(f"{language}: not probed yet, so no specialization curves (the study is still running)")
    if curves:
        curves = pd.concat(curves, ignore_index=True)
        drawn.append(publish(share_curves(curves), curves, out / "evidence_share_curves"))
    rows = out / "evidence_rows.csv"
    if rows.is_file():
        rows = pd.read_csv(rows)
        sets = same_size_rows(rows[rows["language"].isin([language for language, _ in studies])])
        if not sets.empty:
            drawn.append(publish(same_size_shares(sets), sets, out / "evidence_same_size"))
    else:
        log(f"no {rows}, so no same-size figure: write the evidence tables first")
    return drawn


def status_line(s) -> str:
    """The status in words; a study still running is published with this line first, so no reader
    takes what it has for the whole."""
    line = f"**{s['language']}**: {s['compared']} of {s['planned']} runs compared ({s['rows']} rows x seeds {s['seeds']})"
    if s["compared"] == s["planned"]:
        return line + "."
    return line + ("; **in progress**: every number below rests on the runs compared so far (a comparison "
                   "on the seeds that have both of its rows).")


def sentences(rows: pd.DataFrame) -> list[str]:
    """The headline in words, per language and task, each only as far as its interval allows."""
    lines = []
    for language, g in rows.groupby("language", sort=False):
        for task in TASKS:
            t = g[g["task"] == task]
            said = []
            for _, r in t.iterrows():
                other = f"{r['other']} sets" if r["other"] == RANDOM else r["other"]
                if np.isnan(r["estimate"]):
                    words = f"not defined ({other}'s chrF is 0 on these sentences)"
                elif r["quantity"] in ("rel_deviation", "chrf_rel_deviation"):
                    words = verdicts.within_bar(r).replace("full fine-tuning", other)
                else:
                    words = verdicts.difference_words(r, f"{r['row']} keeps more of the gain than {other}",
                                                      f"{r['row']} keeps less of the gain than {other}")
                fewer = f", on {int(r['n_seeds'])} seed(s)" if r["n_seeds"] < t["n_seeds"].max() else ""
                drawn = (f" ({int(r['n_draws'])} draws per seed pooled, each seed its own sets: see the row table)"
                         if r["other"] == RANDOM else "")
                said.append(f"{r['row']} vs {other}{drawn} ({r['quantity'].replace('_', ' ')} {cell(r, r['quantity'])}"
                            f"{fewer}): {words}")
            if said:
                lines.append(f"**{language}, {task}** (n = {int(t['n_pairs'].max())} test pairs, chrF on "
                             f"{_chrf_pairs(t)}, {int(t['n_seeds'].max())} seed(s)):\n"
                             + "\n".join(f"- {s}" for s in said))
    return lines


def planned_questions(configs: list[StudyConfig]) -> set[tuple[str, str]]:
    """The (row, other) questions of the headline that some study plans both rows of (a random draw is
    of kind random): a question no study asks is left out of its table, not printed empty."""
    kinds = [{kind(r) for r in config.row_list()} for config in configs]
    return {(r, o) for r, o, _ in QUESTIONS if any({r, o} <= rows for rows in kinds)}


def headline_table(found: pd.DataFrame, asked: set[tuple[str, str]] | None = None) -> str:
    """Markdown: one line per HEADLINE question, one column per (language, task); each cell the answer
    its interval allows (yes, no, not resolved) and the estimate [interval], "" where not yet compared.
    `asked`: the (row, other) pairs to print (default every one: a study still running shows what is to come)."""
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
            fewer = (f", {int(r['n_seeds'])} of {int(seeds[lang])} seeds" if r["n_seeds"] < seeds[lang]
                     else ", one seed" if seeds[lang] == 1 else "")
            out.append("n/a" if np.isnan(r["estimate"]) else f"{ANSWER[call]}: {cell(r, quantity)}{fewer}")
        if asked is None or (row, other) in asked:
            lines.append(f"| {question} | " + " | ".join(out) + " |")
    pairs = {lang: int(g["n_pairs"].max()) for lang, g in found[~found["quantity"].isin(CHRF)].groupby("language")}
    return "\n".join([
        "Headline: each question answered only as far as its 95% interval goes (yes, no, or not resolved), "
        "then the estimate [interval] (each seed's own estimate), the mean over "
        + ", ".join(f"{seeds[lang]} seed(s) and {pairs.get(lang, 0)} test pairs for {lang}" for lang in seeds.index)
        + ". " + _seed_sentence(int(seeds.min()), int(seeds.max())) + " "
        f"Relative deviations: positive is worse than the reference, {BAR} the paper's bar; \"keeps more of "
        "the gain\": the difference of the two rows' shares of full fine-tuning's NLL gain. \"Matched\": the two "
        "rows differ in their blocks only (the embeddings and head frozen in both, or trained in both); the "
        "unmatched line differs in the ends as well and is not counted against the paper. Every comparison "
        "in words, with what would resolve it, follows the tables.", ""] + lines)


def _seed_sentence(fewest: int, most: int) -> str:
    """What the intervals hold: at one seed the test pairs' error alone (what these runs did, not what
    another seed would do); from two seeds up the seeds' spread as well, at a tested coverage."""
    several = ("The interval is valid at this seed count: the test pairs' bootstrap error and a t-interval over "
               "the seeds' own estimates, combined (`intervals.over_seeds`; its coverage is tested at 2, 3 and 5 "
               "seeds); at 2 seeds the t-quantile is 12.7, so wherever the seeds disagree the interval is wide, and "
               "more seeds, not more pairs, would narrow it.")
    one = ("Where a column has one seed (\"one seed\"), its interval holds the test pairs' bootstrap error "
           "alone: it says what these runs did, not what another seed would do, since the spread between "
           "seeds is not known from one; the study's further seeds decide.")
    return several if fewest > 1 else one if most == 1 else f"{one} {several}"


def against_the_paper(found: pd.DataFrame, settings: list[str]) -> str:
    """Markdown: per claim of the paper, which (language, task, metric) cells of this study agree with
    it, go against it, or do not decide, by their intervals; `settings` says what was run (model,
    steps), since the paper's own setting is not known to us and a disagreement holds for this one."""
    claims = []
    unmatched = found[(found["row"] == UNMATCHED[0]) & (found["other"] == UNMATCHED[1])
                      & found["quantity"].isin(METRIC)]
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
    if len(unmatched):
        claims.append(f"- Not counted: the unmatched {UNMATCHED[0]} against {UNMATCHED[1]} (in the table above), "
                      "whose gap holds the cost of freezing the embeddings and head as well as the blocks'.")
    return "\n".join([f"**Against the paper** ({'; '.join(settings)}; the paper's models, languages, steps and "
                      "metrics are not known to us, so a cell that goes against it says the claim does not carry "
                      "to this setting, not that its own numbers are wrong):", *claims])


def _by_row(compare: pd.DataFrame) -> pd.DataFrame:
    """One line per row, its blocks named per seed where its seeds trained different ones (a random draw
    is drawn from the seed: `random-1` is a different set on each seed)."""
    first = compare.drop_duplicates("row").set_index("row")
    return first.assign(blocks=[blocks_per_seed(compare, row) for row in first.index])



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
        vals = [cell(cells.loc[(row, t, q)], q) if (row, t, q) in cells.index else "" for q, t in heads]
        lines.append(f"| {row} | {first.loc[row, 'blocks']} | {_millions(first.loc[row, 'trainable_params'])} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def _base_gain(own: pd.DataFrame) -> str:
    base = own[(own["row"] == "base") & (own["quantity"] == "conditional_gain")]
    return ", ".join(f"{r['task']} {verdicts.fmt(r)}" for _, r in base.iterrows()) or "not scored"


def cell(r, quantity: str) -> str:
    """estimate [low, high], and each seed's own estimate in parentheses where there are several."""
    if np.isnan(r["estimate"]):
        return "n/a"
    f = ((lambda x: f"{x:.1f}") if quantity == "chrf" else (lambda x: f"{x:.1%}") if quantity in PERCENT
         else (lambda x: f"{x:.3f}"))
    text = f"{f(r['estimate'])} [{f(r['low'])}, {f(r['high'])}]"
    per_seed = r.get("per_seed")
    if isinstance(per_seed, str) and ";" in per_seed:
        text += " (" + ", ".join(f(float(v)) for v in per_seed.split(";")) + ")"
    return text


def cost_table(costs: pd.DataFrame) -> str:
    lines = ["Wall time (hours; `figures/evidence_cost.csv`), and the machines each part ran on:", "",
             "| language | part | hours | runs | machines | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.language} | {r.part} | {r.hours:.2f} | {r.runs} | {r.machines} | {r.note} |"
              for r in costs.itertuples()]
    totals = costs.groupby("language", sort=False)["hours"].sum()
    lines += ["", "In all (every part above; work lost to an interruption is not counted): "
              + "; ".join(f"{language} {hours:.1f} h" for language, hours in totals.items()) + "."]
    return "\n".join(lines)
