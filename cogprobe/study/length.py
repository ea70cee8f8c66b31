"""Whether a study's comparisons move with the length of its runs: the converged study's reading.

A study with `compare_steps` (the converged preset: 400) scores every run on test at that earlier
step as well as at its end (`compare_steps.parquet`, arms `row-sSEED@STEP` in scores.parquet). The
same comparisons are then asked at both points (`evidence_tables.read_at` lays the earlier step out
as the end), and for each NLL comparison the change from the earlier step to the end comes with its
own interval: per seed, the comparison at the end minus at the step, on the same test pairs, over
the seeds as every interval here (`intervals.hierarchical`). That change is the bias a cap at the
earlier step puts on the comparison: positive rel_deviation change, the row falls further behind
its reference as the runs go on (the cap flattered it).

`readings` gives tidy records (the evidence COLUMNS with `language` naming the reading, e.g.
"otomi at 400" and "otomi at the end (1200 steps)"), `changes` the change records, and `write` the
markdown and CSVs (`analyses/converged.py`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import io, layout
from cogprobe.data.tasks import TASKS
from cogprobe.study import pivot_control, prose_control, report, verdicts
from cogprobe.study.config import StudyConfig
from cogprobe.study.evidence import headline_table, planned_questions
from cogprobe.study.evidence_tables import (QUESTIONS, interval, read, read_at, record, rows_of, statistic,
                                            study_table, units)
from cogprobe.study.comparisons import RANDOM

CHANGED = ("rel_deviation", "share_minus")   # the NLL quantities whose change is asked
CHANGE_COLUMNS = ["language", "row", "other", "task", "quantity", "step", "end_step", "estimate", "low", "high",
                  "n_pairs", "n_seeds", "per_seed", "pair_half", "seed_half"]


def end_step(folder: Path) -> int:
    """The steps every run of the study trained (where the plateau stopped full fine-tuning, or the cap)."""
    return int(io.read_json(Path(folder) / layout.STUDY).get(layout.RUN_LENGTH, StudyConfig.read(folder).steps))


def readings(language: str, folder: Path) -> pd.DataFrame:
    """Every comparison of the headline at each earlier step and at the end, one record each."""
    folder, found = Path(folder), []
    for step in StudyConfig.read(folder).compare_step_list():
        study = read_at(folder, step)
        if study is not None:
            found += rows_of(f"{language} at {step}", study, QUESTIONS)
    study = read(folder)
    if study is not None:
        found += rows_of(f"{language} at the end ({end_step(folder)} steps)", study, QUESTIONS)
    return pd.DataFrame(found)


def changes(language: str, folder: Path) -> pd.DataFrame:
    """For each NLL comparison with a fixed other row: its value at the end minus at each earlier step,
    per seed on the same test pairs, with the interval over seeds; the seeds that have every arm."""
    folder, out = Path(folder), []
    study = read(folder)
    if study is None:
        return pd.DataFrame(columns=CHANGE_COLUMNS)
    have, end = set(study["scores"]["arm"]), end_step(folder)
    for step in StudyConfig.read(folder).compare_step_list():
        for row, other, quantity in QUESTIONS:
            if quantity not in CHANGED or other == RANDOM:
                continue
            names = [_both(u, step) for u in units(study["seeds"], row, other, [])]
            names = [u for u in names if {a for k, a in u.items() if k != "seed"} <= have]
            if not names:
                continue
            for task in TASKS:
                found = _change(study, quantity, task, names)
                out.append(dict(language=language, row=row, other=other, task=task, quantity=quantity, step=step,
                                end_step=end, n_pairs=found[1], **record(found[0], len(names))))
    return pd.DataFrame(out, columns=CHANGE_COLUMNS)


def _both(unit: dict, step: int) -> dict:
    """A unit's arms at the end and, suffixed `_at`, at `step` (the base model is the same at both)."""
    at = {f"{k}_at": f"{a}@{step}" for k, a in unit.items() if k not in ("seed", "base")}
    return {**unit, **at}


def _change(study: dict, quantity: str, task: str, names: list[dict]):
    """(interval of the comparison at the end minus at the step, pairs), over the units' seeds."""
    f = statistic(quantity)

    def change(m: dict) -> np.ndarray:
        then = {k: m[f"{k}_at"] if k != "base" else m[k] for k in ("row", "other", "base", "full")}
        return f(m) - f(then)
    return interval(study, quantity, task, names, f=change)


def change_words(r) -> str:
    """One change in words, only as far as its interval goes."""
    span = f"{r['estimate']:+.1%} [{r['low']:+.1%}, {r['high']:+.1%}]"
    if r["n_pairs"] < verdicts.MIN_PAIRS or not np.isfinite(r["low"]):
        return f"{span}: too few pairs to state (cogprobe states findings from {verdicts.MIN_PAIRS} pairs up)"
    what = ("falls further behind" if r["quantity"] == "rel_deviation" else "keeps less of the gain")
    if r["low"] > 0 and r["quantity"] == "rel_deviation" or r["high"] < 0 and r["quantity"] == "share_minus":
        return f"{span}: {r['row']} {what} {r['other']} from step {r['step']} to the end (the cap flattered it)"
    if r["high"] < 0 and r["quantity"] == "rel_deviation" or r["low"] > 0 and r["quantity"] == "share_minus":
        return f"{span}: {r['row']} gains on {r['other']} from step {r['step']} to the end (the cap held it back)"
    return f"{span}: not resolved, the interval holds 0"


def status(folder: Path) -> str:
    """Which seeds of each row are compared, of those the study plans: the seed counts behind every
    cell below, said first, as the study fills in over sessions."""
    config, folder = StudyConfig.read(folder), Path(folder)
    compare = study_table(folder, layout.COMPARE) if (folder / layout.COMPARE).is_file() else None
    done = {row: [] if compare is None else sorted(int(s) for s in compare.loc[compare["row"] == row, "seed"])
            for row in config.row_list()}
    rows = "; ".join(f"{row} {', '.join(map(str, seeds)) or 'none'}" for row, seeds in done.items())
    left = sum(len(config.seed_list()) - len(seeds) for seeds in done.values())
    return (f"Compared so far, the seeds of each row ({len(config.seed_list())} planned for each, "
            f"{config.seeds}): {rows}." + (f" {left} runs to go (the study resumes)." if left else " Complete."))


def write(language: str, folder: Path, out: Path) -> list[Path]:
    """converged.md (what is compared so far, the headline at each reading side by side, the changes
    in words, the English prose at each reading, then any pivot-only controls' table),
    converged.csv and converged_changes.csv in `out`."""
    found, moved = readings(language, folder), changes(language, folder)
    folder, out = Path(folder), Path(out)
    io.write_text(out / "converged.csv", found.to_csv(index=False))
    io.write_text(out / "converged_changes.csv", moved.to_csv(index=False))
    table = headline_table(found, planned_questions([StudyConfig.read(folder)])) if len(found) else \
        "No comparison of the headline has both its rows compared yet."
    lines = [status(folder), table]
    if len(moved):
        lines.append("From the earlier step to the end, per seed on the same test pairs (the end minus the step; "
                     f"{verdicts.BAR:.0%} is the paper's bar for the deviations themselves, not for their change):\n"
                     + "\n".join(f"- {r['row']} vs {r['other']}, {r['task']}, {r['quantity'].replace('_', ' ')}: "
                                 f"{change_words(r)} ({int(r['n_seeds'])} seed(s), {int(r['n_pairs'])} pairs)"
                                 for _, r in moved.iterrows()))
    passages = StudyConfig.read(folder).prose_passages   # the English prose at each reading, then the controls
    for step in [*StudyConfig.read(folder).compare_step_list(), None]:
        english = prose_control.report_blocks(folder, passages, step) if (folder / layout.COMPARE).is_file() else []
        if english:
            lines.append(report.markdown(english).strip())
    control = pivot_control.report_blocks(folder)   # the gain no word of the language explains, at its step
    if control:
        lines.append(report.markdown(control).strip())
    io.write_text(out / "converged.md", "\n\n".join(lines) + "\n")
    return [out / name for name in ("converged.md", "converged.csv", "converged_changes.csv")]
