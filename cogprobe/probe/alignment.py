"""Where the new language meets the pivot: cross-lingual alignment per block.

Each sentence of an evaluation set's pairs is read alone (no template; the
tokenizer's own leading special tokens, if any, are fed but not pooled) and its
residual stream after each block is mean-pooled over the sentence's tokens. On
those pooled vectors, per block (`n` pairs, target vectors T, pivot vectors P):

- `retrieval_top1` / `retrieval_mrr`: each target sentence retrieves among all n
  pivot sentences by cosine (direction `target_to_pivot`), and each pivot among
  the targets (`pivot_to_target`); top-1 accuracy and reciprocal rank of the true
  translation. Chance: 1/n and H_n/n.
- `paired_minus_unpaired_cos`: with each language's mean vector subtracted (the
  language offset, and the large dimensions every sentence shares), the cosine of a
  pair minus the mean cosine of the sentence with the other sentences, averaged over
  the two sides (direction `both`). 0 when translations are no closer than strangers.
  Caveat: centring does not rescale, so a block with a massive-activation dimension
  (SmolLM2-135M has one ~230x the mean magnitude in blocks 11-27) has this cosine
  dominated by that one dimension; read it beside retrieval, which ranks.
- `language_probe_acc`: held-out accuracy of a logistic regression (scikit-learn)
  telling target from pivot sentences; two-fold by pair (fit on one half of the
  pairs, score the other, then swap), so both sentences of a pair are always on
  the same side and every pair gets a held-out score. Chance: 0.5.

Every measure is a mean of per-pair scores, so its interval is the paired bootstrap
of `cogprobe.intervals` over pairs: queries are resampled while the candidate pool
stays the whole set. The per-pair scores are kept (`example_scores`, in the set's
pair order) so that the block of peak alignment and its move between checkpoints
get intervals too (`peak_block`, `peak_shift`): every block and checkpoint is
resampled on the same pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cogprobe.core import intervals
from cogprobe.data.corpora import Corpus
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import ALIGNMENT
from cogprobe.data.tasks import BATCH_SIZE, Example, collate, prompt_ids_all
from cogprobe.probe.backends import site_name

COLUMNS = ["checkpoint_step", "block", "measure", "direction", "value", "low", "high", "n_pairs", "example_scores"]
MEASURES = ("retrieval_top1", "retrieval_mrr", "paired_minus_unpaired_cos", "language_probe_acc")
DIRECTIONS = ("target_to_pivot", "pivot_to_target")
PEAK_MEASURE = "retrieval_mrr"   # rank-based (comparable across depths), fewer ties than top-1
MIN_PAIRS = 4                    # two per probe fold


# ------------------------------------------------------------------ inputs

@dataclass
class Sentences:
    """Bare-sentence batches of n pairs: the n target sentences, then the n pivot sentences."""

    batches: list[dict]
    n_pairs: int
    pair_ids: list = field(default_factory=list)


def sentence_batches(tokenizer, pairs: Corpus, batch_size: int = BATCH_SIZE) -> Sentences:
    """Every target and pivot sentence of `pairs` alone, batched; `score_mask` marks the
    sentence's own tokens (the ones pooled), not the leading special tokens."""
    frame = pairs.pairs
    if len(frame) < MIN_PAIRS:
        raise CogprobeError(f"alignment needs at least {MIN_PAIRS} pairs, got {len(frame)}; score more pairs")
    texts = list(frame["target"]) + list(frame["pivot"])
    with_specials = prompt_ids_all(tokenizer, texts)
    plain = tokenizer(texts, add_special_tokens=False).input_ids
    examples = []
    for ids, own in zip(with_specials, plain):
        if not own:
            raise CogprobeError("a sentence of the evaluation set gave no tokens; drop empty sentences")
        examples.append(Example(tuple(ids), len(ids) - len(own)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks = [collate(examples[i:i + batch_size], pad) for i in range(0, len(examples), batch_size)]
    ids = list(frame["pair_id"]) if "pair_id" in frame.columns else list(range(len(frame)))
    return Sentences(chunks, len(frame), ids)


class Pooler:
    """Mean-pooled vectors per block, gathered batch by batch: `add(acts, batch)`, then `vectors()`."""

    def __init__(self, blocks: Sequence[int]):
        self.parts: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}

    def add(self, acts: dict, batch: dict) -> None:
        mask = batch["score_mask"]
        for block, parts in self.parts.items():
            act = acts[site_name(block, "resid")]
            m = mask.to(act.device).unsqueeze(-1).to(torch.float64)
            parts.append(((act.double() * m).sum(1) / m.sum(1)).cpu())

    def vectors(self) -> dict[int, np.ndarray]:
        return {b: torch.cat(p).numpy() for b, p in self.parts.items()}


# ------------------------------------------------------------------ measures (pure functions)

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-300, None)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, n] cosine of each row of a with each row of b."""
    return _unit(np.asarray(a, float)) @ _unit(np.asarray(b, float)).T


def retrieval(target: np.ndarray, pivot: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Per-query top-1 hit and reciprocal rank of the true translation, both directions.

    A tie with the true translation counts against it (rank = 1 + candidates scoring >=
    it, other than itself), so identical vectors everywhere give chance, not 1."""
    sim = cosines(target, pivot)
    out = {}
    for direction, s in zip(DIRECTIONS, (sim, sim.T)):
        true = np.diag(s)[:, None]
        rank = (s >= true).sum(1)  # the true candidate itself is among the >=, so rank >= 1
        out[("retrieval_top1", direction)] = (rank == 1).astype(float)
        out[("retrieval_mrr", direction)] = 1.0 / rank
    return out


def paired_minus_unpaired(target: np.ndarray, pivot: np.ndarray) -> np.ndarray:
    """Per pair: cos(t_i, p_i) minus the mean cosine of t_i with the other p_j and of p_i with
    the other t_j (halved), after each language's mean vector is subtracted."""
    t = np.asarray(target, float) - np.mean(target, 0)
    p = np.asarray(pivot, float) - np.mean(pivot, 0)
    sim = cosines(t, p)
    n = len(sim)
    paired = np.diag(sim)
    rows = (sim.sum(1) - paired) / (n - 1)
    cols = (sim.sum(0) - paired) / (n - 1)
    return paired - (rows + cols) / 2


def probe_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """Held-out correctness of each row under a two-fold logistic-regression probe.

    Groups (pairs) are split in two halves at random (seeded); a probe fit on one half's rows
    predicts the other half's, and the other way round. Features are standardised on the
    fitting half; L2-regularised (C=1), so it stays defined when hidden size exceeds rows."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise CogprobeError("the language-identity probe needs scikit-learn; `pip install scikit-learn`") from None
    ids = np.unique(groups)
    half = np.isin(groups, np.random.default_rng(seed).permutation(ids)[: len(ids) // 2])
    correct = np.empty(len(y), dtype=float)
    for fit in (half, ~half):
        if len(np.unique(y[fit])) < 2:
            raise CogprobeError("a probe fold holds one class only; give both languages' sentences in each pair")
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
        clf.fit(x[fit], y[fit])
        correct[~fit] = clf.predict(x[~fit]) == y[~fit]
    return correct


def language_probe(target: np.ndarray, pivot: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per pair: mean held-out correctness of the probe on its two sentences (0, 0.5 or 1)."""
    n = len(target)
    x = np.concatenate([target, pivot]).astype(float)
    y = np.repeat([1, 0], n)
    pairs = np.tile(np.arange(n), 2)
    correct = probe_accuracy(x, y, pairs, seed)
    return (correct[:n] + correct[n:]) / 2


def measures(target: np.ndarray, pivot: np.ndarray, seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
    """{(measure, direction): per-pair scores} of one block."""
    if len(target) != len(pivot) or len(target) < MIN_PAIRS:
        raise CogprobeError(f"alignment needs as many target as pivot vectors, at least {MIN_PAIRS}; "
                            f"got {len(target)} and {len(pivot)}")
    out = retrieval(target, pivot)
    out[("paired_minus_unpaired_cos", "both")] = paired_minus_unpaired(target, pivot)
    out[("language_probe_acc", "both")] = language_probe(target, pivot, seed)
    return out


def alignment_rows(step: int, vectors: dict[int, np.ndarray], n_pairs: int) -> list[dict]:
    """Tidy rows of every measure at every block, with 95% intervals over pairs.

    `vectors[block]`: [2n, hidden], the n target sentences' pooled vectors then the n pivots'."""
    rows = []
    for block, v in sorted(vectors.items()):
        for (measure, direction), scores in measures(v[:n_pairs], v[n_pairs:]).items():
            ci = intervals.paired(lambda m: m["x"], {"x": (scores, np.ones_like(scores))})
            rows.append(dict(checkpoint_step=int(step), block=int(block), measure=measure, direction=direction,
                             value=ci.estimate, low=ci.low, high=ci.high, n_pairs=int(n_pairs),
                             example_scores=scores.tolist()))
    return rows


# ------------------------------------------------------------------ peak block, from the table

def per_pair(table: pd.DataFrame, step: int, measure: str = PEAK_MEASURE) -> dict[int, np.ndarray]:
    """{block: per-pair score} of one checkpoint, averaged over the measure's directions."""
    rows = table[(table["checkpoint_step"] == step) & (table["measure"] == measure)]
    if rows.empty:
        raise CogprobeError(f"no {measure} rows of step {step} in the alignment table; capture that checkpoint")
    return {int(b): np.mean([np.asarray(s, float) for s in g["example_scores"]], axis=0)
            for b, g in rows.groupby("block")}


def _arms(scores: dict, tag: str) -> dict:
    return {f"{tag}{b}": (s, np.ones_like(s)) for b, s in scores.items()}


def _argmax(m: dict, tag: str, blocks: list[int]):
    return np.asarray(blocks, float)[np.argmax(np.stack([np.asarray(m[f"{tag}{b}"]) for b in blocks]), axis=0)]


def peak_block(table: pd.DataFrame, step: int, measure: str = PEAK_MEASURE, **kw) -> intervals.Interval:
    """The block where `measure` peaks, with the percentile interval of the argmax over pair resamples."""
    scores = per_pair(table, step, measure)
    blocks = sorted(scores)
    return intervals.paired(lambda m: _argmax(m, "b", blocks), _arms(scores, "b"), **kw)


def peak_shift(table: pd.DataFrame, before: int, after: int, measure: str = PEAK_MEASURE,
               **kw) -> intervals.Interval:
    """Peak block at `after` minus peak block at `before`, both on the same resampled pairs."""
    a, b = per_pair(table, before, measure), per_pair(table, after, measure)
    if sorted(a) != sorted(b):
        raise CogprobeError(f"steps {before} and {after} were captured at different blocks; capture the same blocks")
    blocks = sorted(a)
    return intervals.paired(lambda m: _argmax(m, "t", blocks) - _argmax(m, "s", blocks),
                            {**_arms(a, "s"), **_arms(b, "t")}, **kw)


__all__ = ["ALIGNMENT", "COLUMNS", "MEASURES", "PEAK_MEASURE", "Sentences", "sentence_batches", "Pooler",
           "retrieval", "paired_minus_unpaired", "probe_accuracy", "language_probe", "measures",
           "alignment_rows", "per_pair", "peak_block", "peak_shift"]
