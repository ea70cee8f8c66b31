"""Baseline evaluation: perception and production NLL of one model on an `EvalSet`, with the control.

Each task is scored beside its shuffled-source control, so the table shows the
conditional gain (how much of the model's prediction uses the source sentence).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import intervals
from cogprobe.core import io
from cogprobe.core.distributed import default_device
from cogprobe.core.knob import knob
from cogprobe.data.evalset import SPLITS, EvalSet, Sample
from cogprobe.models.loading import EMBEDDED, load_model
from cogprobe.data.tasks import BATCH_SIZE, CONTROLS, TASKS, score, with_conditional_gain

SCORED = (*TASKS, *CONTROLS)


@dataclass(frozen=True)
class EvalOptions(Sample):
    """`cogprobe eval`'s options: a model, and a larger test sample of a corpus (there is no run to
    take the corpus from)."""
    model: str = knob(EMBEDDED, f"{EMBEDDED}, an HF model folder or a .gguf file")
    corpus: str = knob(EvalSet.corpus, "elotl name (axolotl, tsunkua) or a CSV/TSV/JSONL path")
    split: str = knob("test", "split scored (dev for decisions, test for final numbers)", choices=SPLITS)
    pairs: int = knob(128, "pairs sampled (stratified by document; 0 = every pair that fits)", flags=("--limit",))
    batch_size: int = knob(BATCH_SIZE, "pairs per forward pass")


def evaluate(model: str | Path, evalset: EvalSet, *, batch_size: int = BATCH_SIZE,
             out: Path | None = None) -> pd.DataFrame:
    """Score every task and control; one row per task (tidy) with 95% bootstrap intervals (the
    conditional gain's paired over the same pairs), the evaluation set in `attrs`.

    Writes `scores.csv` (and the set beside it in `scores.json`) into `out` if given."""
    lm, tokenizer = load_model(model)
    lm.to(default_device())
    examples = evalset.examples(tokenizer, SCORED)
    rows, arms = [], {}
    for task, ex in examples.items():
        start = time.perf_counter()
        s = score(lm, ex, batch_size=batch_size)
        arms[task] = (np.array(s.example_nll), np.array(s.example_tokens, dtype=float))
        nll = intervals.nll(arms, task)
        rows.append(dict(model=str(model), corpus=evalset.corpus, split=evalset.split, task=task,
                         nll=s.nll, nll_low=nll.low, nll_high=nll.high, n_tokens=s.n_tokens, n_pairs=len(ex),
                         seconds=round(time.perf_counter() - start, 2)))
    table = with_conditional_gain(pd.DataFrame(rows))
    for control, task in CONTROLS.items():  # its interval: shuffled and true scored on the same pairs
        gain = intervals.difference(arms, control, task)
        table.loc[table["task"] == task, ["conditional_gain_low", "conditional_gain_high"]] = gain.low, gain.high
    table.attrs["evalset"] = dict(evalset.to_dict(), **evalset.report(tokenizer),
                                  dropped=dict(evalset.splits().train.dropped))
    if out is not None:
        io.write_json(Path(out) / "scores.json", table.attrs["evalset"])
        io.write_text(Path(out) / "scores.csv", table.to_csv(index=False))
    return table
