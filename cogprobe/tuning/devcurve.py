"""The dev curve of a training run: its dev NLL at the evaluation steps, in `dev_curve.parquet`.

`train --eval-steps` scores the run's dev set while it trains, so every run carries its
NLL-vs-step curve, and `--stop-on-plateau` has a curve to read (see `plateau`).

The set is an `EvalSet` like every other score's, the study's kind of dev set: the run's own
corpus, columns and split (`split_seed`, `dev`, `test`, `split_by_document`), split "dev", a
stratified random sample of `dev_pairs` whole pairs (`dev_sample_seed`), pairs with a side
longer than `dev_max_sentence_tokens` left out. It scores the two tasks. Its `to_dict()`, its
sizes and the pair ids (the order of the per-example lists) are written beside the table, in
`dev_curve.parquet.json`, as the probe tables record theirs.

The table, one row per (step, task):
  step, task       the optimizer step (0: the base model) and perception or production
  nll, n_tokens    token-weighted mean NLL (nats per continuation token) and its token count
  n_pairs          pairs scored
  example_nll      each pair's summed nats, in the set's pair order
  example_tokens   each pair's scored tokens (so any interval can be recomputed without scoring)
  seconds          wall seconds of scoring that task (not counted in the train log's `seconds`)

How it scores: in eval mode (dropout off), without gradients, in fp32 whatever `bf16` says (the
weights are fp32; only the training steps autocast), so the step-0 rows are exactly the base
model's `tasks.score`, as `cogprobe eval` and the study's baseline compute it; the mode the model
was in is restored after. Every process scores the same set through the prepared model (so the
collectives of DDP and FSDP stay in step, and every process reads the same curve); only the main
process writes. The table is rewritten atomically after each evaluation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from cogprobe.core import io
from cogprobe.data.evalset import EvalSet
from cogprobe.core.layout import DEV_CURVE, metadata, same
from cogprobe.data.tasks import TASKS, Example, score

COLUMNS = ["step", "task", "nll", "n_tokens", "n_pairs", "example_nll", "example_tokens", "seconds"]


@dataclass(frozen=True)
class DevSet:
    """The evaluation set of a run's dev curve, tokenized once."""
    evalset: EvalSet
    examples: dict[str, list[Example]]   # {task: examples}, in pair order
    record: dict                         # what `dev_curve.parquet.json` holds


def evalset(cfg) -> EvalSet:
    """The dev-curve set of TrainConfig `cfg`: its corpus and split, its eval_* sample."""
    return EvalSet(corpus=str(cfg.corpus), split="dev", n=cfg.dev_pairs, sample_seed=cfg.dev_sample_seed,
                   max_sentence_tokens=cfg.dev_max_sentence_tokens, split_seed=cfg.split_seed,
                   split_dev=cfg.dev, split_test=cfg.test, split_by_document=cfg.split_by_document,
                   pivot_col=cfg.pivot_col, target_col=cfg.target_col, document_col=cfg.document_col)


def prepare(cfg, tokenizer) -> DevSet | None:
    """The run's dev set, sampled and tokenized (a too small dev split fails here, in one line); None
    when `eval_steps` is off."""
    if not cfg.eval_step_list():
        return None
    es = evalset(cfg)
    pair_ids = [int(p) for p in es.pairs(tokenizer).pairs["pair_id"]]
    record = io.jsonable(dict(es.to_dict(), **es.report(tokenizer), pair_ids=pair_ids))
    return DevSet(es, es.examples(tokenizer, TASKS), record)


def write_record(out: Path, dev: DevSet) -> None:
    """Write the set's record beside the table (main process). A resumed run whose curve was scored on
    another set (its corpus file changed in between) is refused: one curve, one set."""
    table, path = Path(out) / DEV_CURVE, metadata(Path(out) / DEV_CURVE)
    if table.is_file() and path.is_file():
        same(dev.record, io.read_json(path), f"{table} was scored on another dev set",
             "pass --overwrite to train again")
    io.write_json(path, dev.record)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dev: DevSet, step: int) -> list[dict]:
    """The table rows of `model` at `step`: every task scored in eval mode and fp32 (see the module)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for task, examples in dev.examples.items():
            t0 = time.perf_counter()
            s = score(model, examples)
            rows.append(dict(step=step, task=task, nll=s.nll, n_tokens=s.n_tokens, n_pairs=len(examples),
                             example_nll=list(s.example_nll), example_tokens=list(s.example_tokens),
                             seconds=time.perf_counter() - t0))
    finally:
        model.train(was_training)
    return rows


def read(out: Path, upto: int | None = None) -> pd.DataFrame:
    """The run's curve rows (up to step `upto`); empty when it has none yet."""
    path = Path(out) / DEV_CURVE
    table = io.read_parquet(path) if path.is_file() else pd.DataFrame(columns=COLUMNS)
    return table if upto is None else table[table["step"] <= upto].reset_index(drop=True)


def mean_nll(rows: pd.DataFrame | list[dict]) -> list[tuple[int, float]]:
    """(step, dev NLL) in step order: the mean over the tasks of each task's token-weighted NLL, the
    number the plateau rule reads."""
    table = pd.DataFrame(rows, columns=COLUMNS) if isinstance(rows, list) else rows
    means = table.groupby("step", sort=True)["nll"].mean()
    return [(int(s), float(m)) for s, m in means.items()]
