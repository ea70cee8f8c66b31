"""Is the probe run now on disk the one a study probed? Scores each of its checkpoints on the probe
set and compares with the unablated rows (k = 0) of the study's sweeps.parquet.

Why: a study retrains its probe run when the machine that held it is lost, and training here is
not bit-reproducible, so the curves and the budget set may come from a sibling of that run.

    python analyses/probe_run_drift.py analyses/evidence/axolotl
"""
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.data.tasks import score
from cogprobe.core.layout import SWEEPS, arm, row_run
from cogprobe.study.pipeline import evaluation_sets
from cogprobe.study.config import StudyConfig
from cogprobe.data.tasks import TASKS


def drift(out: Path) -> pd.DataFrame:
    """One row per (checkpoint, task): mean NLL now and as probed, and the largest per-pair gap."""
    config = StudyConfig.read(out)
    ckpts = Checkpoints.open(row_run(out, config.probe_row, config.seed_list()[0]))
    sweeps = io.read_parquet(out / SWEEPS)
    unablated = sweeps[sweeps["k"] == 0].drop_duplicates(["checkpoint_step", "task"])
    unablated = unablated.set_index(["checkpoint_step", "task"])
    rows = []
    for step in ckpts.steps:
        model, tok = ckpts.load(step)
        for task, examples in evaluation_sets(config)["probe"].examples(tok, TASKS).items():
            now, then = score(model, examples), unablated.loc[(step, task)]
            gap = np.abs(np.asarray(now.example_nll) - np.asarray(then["checkpoint_example_nll"])).max()
            rows.append(dict(step=step, task=task, nll_now=now.nll, nll_probed=then["nll_checkpoint"],
                             max_pair_gap=gap))
    return pd.DataFrame(rows)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    config = StudyConfig.read(out)
    print(f"{arm(config.probe_row, config.seed_list()[0])} of {out}: now vs as probed (probe set)")
    print(drift(out).to_string(index=False, float_format=lambda v: f"{v:.6g}"))
