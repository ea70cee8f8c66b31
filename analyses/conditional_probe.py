"""Where the source-dependent gain lives after 400 steps: the probe run of a committed evidence study,
trained again, swept with the shuffled-source controls.

    python analyses/conditional_probe.py analyses/evidence/tsunkua runs/conditional-tsunkua

Why: the evidence studies swept their probe run (the first seed's `blocks` row) without the
controls, so their curves locate the total gain, most of which does not depend on the source
(issue 39 item 4). Their weights are not kept. This trains the same run again from the study's
own record (its config, the learning rate it chose on dev, its length, one thread as it ran),
sweeps the last checkpoint on the study's dev pairs at its k's with the tasks and their controls,
and checks the task rows against the study's committed sweep: equal rows mean the same model.
Then it states both readings at the report's k's and draws the conditional-share curves.
Resumable: rerun the same command (training resumes, a finished sweep is kept).

Writes OUT/conditional.md, figures/evidence_conditional_<corpus>.png and .csv.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pandas as pd
from _common import publish

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import SWEEPS
from cogprobe.core.intervals import sweep_intervals
from cogprobe.data.tasks import CONTROLS, TASKS
from cogprobe.models.layersets import parse_range_list, to_string
from cogprobe.plots.sweeps import specialization_curves
from cogprobe.probe.conditional import GAINS, conditional_rows
from cogprobe.probe.folders import sweep_run
from cogprobe.probe.options import SweepOptions
from cogprobe.selection.options import TAU
from cogprobe.selection.rules import select_curves
from cogprobe.study import verdicts
from cogprobe.study.config import StudyConfig
from cogprobe.study.pipeline import chosen_lr, evaluation_sets, run_length, train_config
from cogprobe.study.report import conditional_findings, probe_ks
from cogprobe.tuning.loop import train

KEYS = ["task", "direction", "k"]


def main(study: Path, out: Path) -> None:
    config = StudyConfig.read(study)
    row, seed = config.probe_row, config.seed_list()[0]
    steps = run_length(config, study, row, seed)   # the study's recorded length (it trains no full run here)
    lr = chosen_lr(config, study, row)
    cfg = train_config(config, out, row, seed, lr=lr, steps=steps)
    cfg = dataclasses.replace(cfg, save_steps=f"0,{steps}", progress=True)   # only the last one is swept
    print(f"{row} seed {seed}: {steps} steps at lr {lr:g}, {config.threads} thread(s) -> {cfg.out}", flush=True)
    train(cfg)
    ks = tuple(parse_range_list(config.sweep_ks, 10**6)) if config.sweep_ks else None
    table = sweep_run(cfg.out, SweepOptions(ks=ks, tasks=(*TASKS, *CONTROLS)), evalset=evaluation_sets(config)["probe"],
                      out=out, steps=[steps], progress=True)
    last = table[(table["checkpoint_step"] == steps) & (table["mode"] == "revert") & ~table["ends"]]
    same = reproduced(last, io.read_parquet(study / SWEEPS), steps)
    lines = [f"# The source-dependent gain of {study.name}'s probe run ({row}, seed {seed}, step {steps})", "",
             f"`python analyses/conditional_probe.py {study} {out}`. {same}", ""]
    for task in TASKS:
        rows = last[last["task"] == task]
        lines += [f"{task.capitalize()}, the total gain: " + "; ".join(verdicts.ends_sentence(rows, k)
                                                                      for k in probe_ks(rows["k"])) + ".", "",
                  conditional_findings(last, task, steps), "", source_share(last, task), ""]
    lines += [selections(last), ""]
    io.write_text(out / "conditional.md", "\n".join(lines))
    print("\n".join(lines))
    view = sweep_intervals(conditional_rows(last))
    publish(specialization_curves(last, gain="conditional"),
            view[[*KEYS, "nll", "nll_reference", "nll_checkpoint", "share", "share_low", "share_high"]],
            f"evidence_conditional_{study.name}")


def reproduced(mine: pd.DataFrame, committed: pd.DataFrame, step: int) -> str:
    """Whether the task rows equal the study's own sweep of this step: the same model, trained again."""
    theirs = committed[(committed["checkpoint_step"] == step) & (committed["mode"] == "revert") & ~committed["ends"]]
    both = mine[mine["task"].isin(TASKS)].merge(theirs, on=KEYS, suffixes=("", "_study"))
    if both.empty:
        return "The study's sweep has no rows of this step to check the run against."
    gap = float((both["nll"] - both["nll_study"]).abs().max())
    return (f"Checked against the study's committed sweep: {len(both)} task rows, largest NLL difference "
            f"{gap:.2e} nats/token" + (" (the same model)." if gap == 0 else
                                       " (not the same bits: read these as a run of the same recipe)."))


def selections(rows: pd.DataFrame) -> str:
    """The curves rule (`keep`, tau 0.8) on each reading: the set each gain would give, or why none."""
    said = []
    for gain in GAINS:
        try:
            s = select_curves(rows, tau=TAU, criterion="keep", gain=gain)
            said.append(f"on the {gain} gain, blocks {to_string(s.layers)} (k_in = {s.k_in}, k_out = {s.k_out})")
        except CogprobeError as e:
            said.append(f"on the {gain} gain, no set: {e}")
    return f"The curves rule (criterion keep, tau {TAU}): " + "; ".join(said) + "."


def source_share(rows: pd.DataFrame, task: str) -> str:
    """How much of the checkpoint's NLL gain over the base depends on the source (k = 0 rows)."""
    at = rows[(rows["k"] == 0) & (rows["direction"] == "input")].set_index("task")
    gain = at.loc[task, "nll_reference"] - at.loc[task, "nll_checkpoint"]
    kept = at.loc[f"{task}-shuffled", "nll_reference"] - at.loc[f"{task}-shuffled", "nll_checkpoint"]
    return (f"Of the {task} NLL gain ({gain:.3f} nats/token), {kept / gain:.0%} remains with shuffled sources "
            f"({kept:.3f}): the source-dependent part is {gain - kept:.3f} nats/token.")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[2].strip())
    main(Path(sys.argv[1]), Path(sys.argv[2]))
