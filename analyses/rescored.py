"""Does a run's checkpoint still give the test scores its study recorded? Scores one arm again from
the weights in the study's runs/ and compares each example's NLL with scores.parquet.

    python analyses/rescored.py STUDY ARM      # ARM: row-sSEED (the run's end) or row-sSEED@STEP

Used when a run was trained again after its weights were lost with a machine (a study resumes a
run from scratch when its folder is gone) while some of its scores were recorded from the lost
weights (an earlier `compare_steps` step): exit 0 when every example's NLL is the same, so the two
trainings gave the same weights there, exit 1 with the largest difference per task otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from _common import table

from cogprobe.core.distributed import default_device
from cogprobe.core.layout import SCORES, row_run
from cogprobe.data.tasks import CONTROLS, TASKS, score
from cogprobe.study.config import StudyConfig
from cogprobe.study.pipeline import evaluation_sets
from cogprobe.tuning.checkpoints import Checkpoints


def rescored(study: Path, name: str) -> pd.DataFrame:
    """The arm's examples scored again: task, pair_id, recorded and rescored NLL sums."""
    run_name, _, step = name.partition("@")
    row, seed = run_name.rsplit("-s", 1)
    ckpts = Checkpoints.open(row_run(study, row, int(seed))).to(default_device())
    model, tokenizer = ckpts.load(int(step) if step else ckpts.steps[-1])
    nll = evaluation_sets(StudyConfig.read(study))["nll"]
    pairs = list(nll.pairs(tokenizer).pairs["pair_id"])
    again = pd.concat([pd.DataFrame(dict(task=task, pair_id=pairs, rescored=score(model, ex).example_nll))
                       for task, ex in nll.examples(tokenizer, (*TASKS, *CONTROLS)).items()])
    recorded = table(study, SCORES)
    recorded = recorded[recorded["arm"] == name][["task", "pair_id", "nll_sum"]]
    return recorded.merge(again, on=["task", "pair_id"], how="outer", validate="one_to_one")


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit(f"usage: python {Path(sys.argv[0]).name} STUDY ARM   (ARM: row-sSEED or row-sSEED@STEP)")
    both = rescored(Path(sys.argv[1]), sys.argv[2])
    both["difference"] = (both["rescored"] - both["nll_sum"]).abs()
    summary = both.groupby("task").agg(examples=("pair_id", "size"), missing=("nll_sum", lambda s: s.isna().sum()),
                                       largest_difference=("difference", "max"))
    print(summary.to_string())
    same = summary["missing"].eq(0).all() and both["difference"].eq(0).all()
    print("same scores: the weights reproduce the record" if same else "scores differ: see largest_difference")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
