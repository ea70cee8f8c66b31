"""Baseline evaluation: perception and production NLL of one model on held-out pairs."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from cogprobe import io
from cogprobe.corpora import load_corpus, split_corpus
from cogprobe.distributed import default_device
from cogprobe.models import load_model
from cogprobe.tasks import TASKS, build_examples, score


def evaluate(model: str | Path, corpus: str | Path = "axolotl", *, split: str = "test", limit: int | None = 128,
             batch_size: int = 8, seed: int = 0, out: Path | None = None, **corpus_kwargs) -> pd.DataFrame:
    """Score both tasks; one row per task (tidy). Writes `scores.csv` into `out` if given."""
    data = getattr(split_corpus(load_corpus(corpus, **corpus_kwargs), seed=seed), split)
    lm, tokenizer = load_model(model)
    lm.to(default_device())
    rows = []
    for task in TASKS:
        examples = build_examples(tokenizer, data, task, limit=limit)
        start = time.perf_counter()
        s = score(lm, examples, batch_size=batch_size)
        rows.append(dict(model=str(model), corpus=str(corpus), target=data.target_name, split=split, task=task,
                         nll=s.nll, n_tokens=s.n_tokens, n_pairs=len(examples),
                         seconds=round(time.perf_counter() - start, 2)))
    table = pd.DataFrame(rows)
    if out is not None:
        io.write_text(Path(out) / "scores.csv", table.to_csv(index=False))
    return table
