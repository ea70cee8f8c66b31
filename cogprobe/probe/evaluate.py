"""Baseline evaluation: perception and production NLL of one model on an `EvalSet`, with the control.

Each task is scored beside its shuffled-source control, so the table shows the
conditional gain (how much of the model's prediction uses the source sentence).

A model too big for the memory it may use is scored block by block (`--engine streamed`, or `auto`
where the model does not fit `--max-memory`): the streamed engine (`probe.streamed`) with the
model's own configuration, no block reverted, reads each block once per group of batches from its
safetensors files. The numbers are the in-memory ones, bit for bit in float32 (the same blocks
called with the arguments the decoder passes them, on the same batches). Only NLL is scored here;
greedy translation and chrF (`data.translate`: the study's baseline and comparisons) need the whole
model for every generated token, and stay in memory.
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
from cogprobe.core.memory import process_peak
from cogprobe.data.evalset import SPLITS, EvalSet, Sample
from cogprobe.data.tasks import BATCH_SIZE, CONTROLS, TASKS, score, with_conditional_gain
from cogprobe.models.loading import EMBEDDED
from cogprobe.probe.engine import largest_batch
from cogprobe.probe.fit import check_files, check_precision, pick, skeleton_for
from cogprobe.probe.options import AUTO, DTYPES, EXACT_ENGINES, dtype_knob, max_memory_knob
from cogprobe.probe.sweep import checkpoint_config
from cogprobe.tuning.checkpoints import Checkpoints

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
    engine: str = knob(AUTO, "memory (load the model whole), streamed (its blocks read from the safetensors files "
                       "one at a time: the same numbers, memory that does not grow with depth), auto (memory where "
                       "the model fits --max-memory, else streamed)", choices=EXACT_ENGINES)
    dtype: str = dtype_knob()
    max_memory: str | None = max_memory_knob()


def evaluate(model: str | Path, evalset: EvalSet, *, batch_size: int = BATCH_SIZE, out: Path | None = None,
             engine: str = EvalOptions.engine, dtype: str = EvalOptions.dtype,
             max_memory: str | int | None = EvalOptions.max_memory) -> pd.DataFrame:
    """Score every task and control; one row per task (tidy) with 95% bootstrap intervals (the
    conditional gain's paired over the same pairs), the evaluation set in `attrs`, and how it was
    computed (engine, precision, peak memory, the engines' needs) in attrs["computed"].

    Writes `scores.csv` (and the set and the computed record beside it in `scores.json`) into `out`
    if given. `engine`, `dtype`, `max_memory`: see `EvalOptions`."""
    ckpts = Checkpoints.of_model(model).to(default_device(), DTYPES[dtype])
    check_precision(ckpts.device, ckpts.dtype)
    skeleton = skeleton_for(engine, ckpts)
    tokenizer = ckpts.reference_tokenizer() if skeleton is not None else ckpts.reference()[1]
    examples = evalset.examples(tokenizer, SCORED)
    start = time.perf_counter()
    arms, seconds, fit = _scores(ckpts, skeleton, examples, engine, batch_size, max_memory)
    table = _table(model, evalset, arms, seconds)
    table.attrs["evalset"] = dict(evalset.to_dict(), **evalset.report(tokenizer),
                                  dropped=dict(evalset.splits().train.dropped))
    table.attrs["computed"] = dict(engine=fit.engine if fit else "memory", dtype=dtype, device=str(ckpts.device),
                                   seconds=round(time.perf_counter() - start, 1),
                                   peak_bytes=process_peak(ckpts.device), fit=fit.record() if fit else None)
    if out is not None:
        io.write_json(Path(out) / "scores.json", dict(table.attrs["evalset"], computed=table.attrs["computed"]))
        io.write_text(Path(out) / "scores.csv", table.to_csv(index=False))
    return table


def _scores(ckpts: Checkpoints, skeleton, examples, engine: str, batch_size: int, max_memory):
    """({task: (per-example NLL sums, token counts)}, {task: seconds}, `Fit` or None): in memory one
    task at a time, or streamed in one layer-major pass over every task (each block read once per
    group of batches, so no task has seconds of its own: NaN)."""
    runner, fit = None, None
    if skeleton is not None:
        engine, fit, runner = pick(engine, ckpts, skeleton, max_memory=max_memory, models=1,
                                   batch_tokens=largest_batch(examples, batch_size))
    if runner is not None:
        check_files(ckpts, skeleton)
        own = checkpoint_config(skeleton.n)
        totals = runner.evaluate(runner.reference, [own], examples, batch_size=batch_size)
        return {task: totals[(task, own)] for task in examples}, {}, fit
    lm = ckpts.reference()[0]
    arms, seconds = {}, {}
    for task, ex in examples.items():
        start = time.perf_counter()
        s = score(lm, ex, batch_size=batch_size)
        arms[task] = (np.array(s.example_nll), np.array(s.example_tokens))
        seconds[task] = round(time.perf_counter() - start, 2)
    return arms, seconds, fit


def _table(model, evalset: EvalSet, arms: dict, seconds: dict) -> pd.DataFrame:
    """One row per task: the NLL per token (a ratio of sums) and its interval, and each task's
    conditional gain over its shuffled-source control with the paired interval."""
    counted = {task: (sums, counts.astype(float)) for task, (sums, counts) in arms.items()}
    rows = []
    for task, (sums, counts) in arms.items():
        nll = intervals.nll(counted, task)
        total, n = float(sums.sum()), int(counts.sum())
        rows.append(dict(model=str(model), corpus=evalset.corpus, split=evalset.split, task=task,
                         nll=total / n, nll_low=nll.low, nll_high=nll.high, n_tokens=n, n_pairs=len(sums),
                         seconds=seconds.get(task, float("nan"))))
    table = with_conditional_gain(pd.DataFrame(rows))
    for control, task in CONTROLS.items():  # its interval: shuffled and true scored on the same pairs
        gain = intervals.difference(counted, control, task)
        table.loc[table["task"] == task, ["conditional_gain_low", "conditional_gain_high"]] = gain.low, gain.high
    return table
