"""Training text: both translation directions and plain target text, packed.

Every training pair becomes one example of a kind drawn from the mixture:
  - perception: the perception task's prompt + continuation (target -> pivot),
  - production: the production task's prompt + continuation (pivot -> target),
  - plain: the target sentence alone,
each followed by EOS. The two directions are tokenized by `tasks.build_examples`
itself, so at the same sentence cut training text is token for token what the
evaluation scores (the study trains at a longer cut than it scores, see
`StudyConfig.train_max_sentence_tokens`).

Packing: epoch e shuffles the pairs and draws each pair's kind with a generator
seeded by (seed, e), concatenates the examples and cuts the stream into rows of
`seq_len` tokens (the tail shorter than a row is dropped). Row i of the endless
stream is therefore a pure function of (seed, i): the batch of a step never
depends on what ran before it, which is what makes `--resume` exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cogprobe.corpora import Corpus
from cogprobe.errors import CogprobeError
from cogprobe.tasks import build_examples

KINDS = ("perception", "production", "plain")


@dataclass(frozen=True)
class Examples:
    """Token ids of every pair in every kind: `ids[kind][i]` ends with EOS."""

    ids: dict[str, list[np.ndarray]]

    @property
    def n_pairs(self) -> int:
        return len(self.ids[KINDS[0]])


def tokenize(tokenizer, corpus: Corpus, *, max_sentence_tokens: int = 64,
             kinds: tuple[str, ...] = KINDS) -> Examples:
    """Tokenize each pair as each asked kind (a kind not asked gets no ids)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CogprobeError("the tokenizer has no EOS token; training examples end with EOS, "
                            "so set tokenizer.eos_token in the model folder")
    ids: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    for kind in kinds:
        if kind == "plain":
            ids[kind] = _plain(tokenizer, list(corpus.pairs["target"]), max_sentence_tokens, eos)
        else:
            examples = build_examples(tokenizer, corpus, kind, max_sentence_tokens=max_sentence_tokens)
            ids[kind] = [np.array(e.input_ids + (eos,), dtype=np.int64) for e in examples]
    n = len(corpus)
    for kind in KINDS:  # unasked kinds: placeholders, never drawn (weight 0)
        ids[kind] = ids[kind] or [np.zeros(0, dtype=np.int64)] * n
    return Examples(ids)


def _plain(tokenizer, texts: list[str], max_tokens: int, eos: int) -> list[np.ndarray]:
    """Each sentence cut to `max_tokens`, after the specials the tokenizer puts before text (BOS)."""
    prefix = _special_prefix(tokenizer)
    batch = tokenizer(texts, add_special_tokens=False).input_ids  # one call: the fast tokenizer batches
    return [np.array(prefix + ids[:max_tokens] + [eos], dtype=np.int64) for ids in batch]


def _special_prefix(tokenizer) -> list[int]:
    full = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return list(full[:start])


class PackedStream:
    """An endless stream of packed rows; `rows(start, count)` is a function of (seed, start)."""

    def __init__(self, examples: Examples, weights: dict[str, float], seq_len: int, seed: int):
        total = sum(weights.get(k, 0.0) for k in KINDS)
        self.p = np.array([weights.get(k, 0.0) / total for k in KINDS])
        self.examples, self.seq_len, self.seed = examples, seq_len, seed
        self._starts = [0]          # first row index of each epoch built so far
        self._cache: tuple[int, np.ndarray] | None = None
        if len(self._epoch(0)) == 0:
            raise CogprobeError(f"the training split gives fewer than seq_len={seq_len} tokens; "
                                "lower seq_len or use a larger corpus")

    def _epoch(self, e: int) -> np.ndarray:
        """The rows of epoch e, shape [n_rows, seq_len] (built once, the last one cached)."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, e])
        n = self.examples.n_pairs
        order = rng.permutation(n)
        kinds = rng.choice(len(KINDS), size=n, p=self.p)
        stream = np.concatenate([self.examples.ids[KINDS[k]][i] for i, k in zip(order, kinds)])
        n_rows = len(stream) // self.seq_len
        rows = stream[: n_rows * self.seq_len].reshape(n_rows, self.seq_len)
        self._cache = (e, rows)
        return rows

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of a global row index; builds epochs up to it once."""
        while len(self._starts) < 2 or self._starts[-1] <= row:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e)))
        e = int(np.searchsorted(self._starts, row, side="right")) - 1
        return e, row - self._starts[e]

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of the stream as a LongTensor [count, seq_len]."""
        out = []
        for row in range(start, start + count):
            e, i = self._locate(row)
            out.append(self._epoch(e)[i])
        return torch.from_numpy(np.stack(out))
