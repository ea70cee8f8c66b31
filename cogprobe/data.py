"""Training text: both translation directions and plain target text, packed as whole examples.

Every training pair becomes one example of a kind drawn from the mixture:
  - perception: the perception task's prompt + continuation (target -> pivot),
  - production: the production task's prompt + continuation (pivot -> target),
  - plain: the target sentence alone,
each followed by EOS. The two directions are tokenized by `tasks.build_examples`
itself, so training text is token for token what the evaluation scores.

Whole examples: an example is never split across rows. A pair is cut as a whole
(both sides keep the same fraction of their tokens, see `tasks`) to
`max_sentence_tokens`, and further, as a whole, until it fits in one row of
`seq_len`. Rows are filled first-fit (an example goes into the first of the last
`OPEN_ROWS` rows it fits in), and each example restarts its position ids at 0,
which transformers turns into a block-diagonal causal mask: examples in one row
never attend to each other (`check_isolation` verifies it on the model itself).

Loss: `loss_on="continuation"` (the default) trains translation examples on
their scored side (and EOS) only, as TRL's SFTTrainer does with prompt-completion
data: the gradient comes from translating, and the new language is still learned
as text from the plain examples. `loss_on="all"` trains on every token. The first
token of each example is never a label (it has nothing of its own to predict
from).

Determinism: epoch e shuffles the pairs and draws each pair's kind with a
generator seeded by (seed, e), then packs them in that order. Row i of the endless
stream is therefore a pure function of (seed, i): the batch of a step never
depends on what ran before it, which is what makes `--resume` exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cogprobe.corpora import Corpus
from cogprobe.errors import CogprobeError
from cogprobe.tasks import build_examples, cut_texts

KINDS = ("perception", "production", "plain")
LOSS_ON = ("continuation", "all")
OPEN_ROWS = 32    # first-fit looks back this many rows: near-optimal filling at linear cost
IGNORE = -100     # the label transformers' loss skips


@dataclass(frozen=True)
class TrainingTexts:
    """Token ids of every pair in every kind: `ids[kind][i]` ends with EOS and fits one row;
    `loss_from[kind][i]` is the first position whose token is a label."""

    ids: dict[str, list[np.ndarray]]
    loss_from: dict[str, list[int]]

    @property
    def n_pairs(self) -> int:
        return len(self.ids[KINDS[0]])


def tokenize(tokenizer, corpus: Corpus, *, seq_len: int, max_sentence_tokens: int = 64,
             kinds: tuple[str, ...] = KINDS, loss_on: str = "continuation") -> TrainingTexts:
    """Tokenize each pair as each asked kind (a kind not asked gets empty placeholders)."""
    if loss_on not in LOSS_ON:
        raise CogprobeError(f"loss_on={loss_on!r}: use one of {', '.join(LOSS_ON)}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CogprobeError("the tokenizer has no EOS token; training examples end with EOS, "
                            "so set tokenizer.eos_token in the model folder")
    n = len(corpus)
    ids = {k: [np.zeros(0, dtype=np.int64)] * n for k in KINDS}  # unasked kinds: never drawn (weight 0)
    loss_from = {k: [1] * n for k in KINDS}
    for kind in kinds:
        if kind == "plain":
            ids[kind] = _plain(tokenizer, list(corpus.pairs["target"]), max_sentence_tokens, seq_len, eos)
        else:
            examples = _fitted(tokenizer, corpus, kind, max_sentence_tokens, seq_len)
            ids[kind] = [np.array(e.input_ids + (eos,), dtype=np.int64) for e in examples]
            if loss_on == "continuation":
                loss_from[kind] = [max(1, e.n_prompt) for e in examples]
    return TrainingTexts(ids, loss_from)


def _fitted(tokenizer, corpus: Corpus, kind: str, cap: int, seq_len: int) -> list:
    """The kind's examples, each pair cut as a whole until it and its EOS fit in `seq_len`."""
    caps = np.full(len(corpus), cap)
    examples = build_examples(tokenizer, corpus, kind, max_sentence_tokens=cap)
    while True:
        over = np.array([len(e.input_ids) + 1 - seq_len for e in examples])
        todo = np.flatnonzero(over > 0)
        if not len(todo):
            return examples
        if (caps[todo] == 1).any():
            raise CogprobeError(f"seq_len={seq_len} cannot hold even one token of each sentence with the "
                                f"{kind} template; raise seq_len")
        caps[todo] = np.maximum(1, caps[todo] - over[todo])  # the longer side loses at least `over` tokens
        part = Corpus(corpus.name, corpus.pairs.iloc[todo], corpus.pivot_name, corpus.target_name)
        for i, e in zip(todo, build_examples(tokenizer, part, kind, max_sentence_tokens=caps[todo].tolist())):
            examples[i] = e


def _plain(tokenizer, texts: list[str], cap: int, seq_len: int, eos: int) -> list[np.ndarray]:
    """Each sentence cut to `cap` tokens and to what fits a row beside the specials (BOS) and EOS."""
    prefix = _special_prefix(tokenizer)
    room = seq_len - len(prefix) - 1
    if room < 1:
        raise CogprobeError(f"seq_len={seq_len} leaves no room for text; raise seq_len")
    texts = cut_texts(tokenizer, texts, [min(cap, room)] * len(texts))
    batch = tokenizer(texts, add_special_tokens=False).input_ids  # one call: the fast tokenizer batches
    return [np.array(prefix + ids[:room] + [eos], dtype=np.int64) for ids in batch]


def _special_prefix(tokenizer) -> list[int]:
    full = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return list(full[:start])


@dataclass(frozen=True)
class Rows:
    """Packed rows [n, seq_len]: ids, position ids (restarting per example), labels (IGNORE where
    no loss) and `example` (the example's index within its epoch, -1 on padding)."""
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    example: np.ndarray

    def batch(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments (no attention mask: the position ids make one)."""
        return dict(input_ids=torch.from_numpy(self.input_ids), position_ids=torch.from_numpy(self.position_ids),
                    labels=torch.from_numpy(self.labels))

    @property
    def n_tokens(self) -> int:
        return int((self.example >= 0).sum())

    @property
    def n_labels(self) -> int:
        return int((self.labels != IGNORE).sum())


class PackedStream:
    """An endless stream of packed rows; `rows(start, count)` is a function of (seed, start)."""

    def __init__(self, texts: TrainingTexts, weights: dict[str, float], seq_len: int, seed: int, pad_id: int):
        total = sum(weights.get(k, 0.0) for k in KINDS)
        self.p = np.array([weights.get(k, 0.0) / total for k in KINDS])
        self.texts, self.seq_len, self.seed, self.pad_id = texts, seq_len, seed, pad_id
        self._starts = [0]          # first row index of each epoch built so far
        self._cache: tuple[int, Rows] | None = None

    def epoch_examples(self, e: int) -> list[tuple[str, int]]:
        """(kind, pair index) of each example of epoch e, in packing order."""
        rng = np.random.default_rng([self.seed, e])
        n = self.texts.n_pairs
        order = rng.permutation(n)
        kinds = rng.choice(len(KINDS), size=n, p=self.p)
        return [(KINDS[k], int(i)) for i, k in zip(order, kinds)]

    def _epoch(self, e: int) -> Rows:
        """The rows of epoch e (built once, the last one cached)."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        examples = [(self.texts.ids[k][i], self.texts.loss_from[k][i]) for k, i in self.epoch_examples(e)]
        rows = pack(examples, self.seq_len, self.pad_id)
        self._cache = (e, rows)
        return rows

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of a global row index; builds epochs up to it once."""
        while len(self._starts) < 2 or self._starts[-1] <= row:
            e = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch(e).input_ids))
        e = int(np.searchsorted(self._starts, row, side="right")) - 1
        return e, row - self._starts[e]

    def rows(self, start: int, count: int) -> Rows:
        """Rows [start, start + count) of the stream."""
        located = [self._locate(row) for row in range(start, start + count)]
        parts = [(self._epoch(e), i) for e, i in located]
        return Rows(*(np.stack([getattr(r, f)[i] for r, i in parts])
                      for f in ("input_ids", "position_ids", "labels", "example")))


def pack(examples: list[tuple[np.ndarray, int]], seq_len: int, pad_id: int) -> Rows:
    """First-fit packing of whole examples (ids, loss_from) into rows of `seq_len`."""
    placed = _first_fit([len(ids) for ids, _ in examples], seq_len)
    n_rows = max(r for r, _ in placed) + 1 if placed else 0
    ids = np.full((n_rows, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n_rows, seq_len), IGNORE, dtype=np.int64)
    example = np.full((n_rows, seq_len), -1, dtype=np.int64)
    position = np.tile(np.arange(seq_len, dtype=np.int64), (n_rows, 1))
    used = np.zeros(n_rows, dtype=np.int64)
    for j, ((tokens, loss_from), (row, at)) in enumerate(zip(examples, placed)):
        end = at + len(tokens)
        ids[row, at:end] = tokens
        position[row, at:end] = np.arange(len(tokens))
        labels[row, at + loss_from:end] = tokens[loss_from:]
        example[row, at:end] = j
        used[row] = end
    for row, end in enumerate(used):  # padding: a run of its own, positions from 0, never a label
        position[row, end:] = np.arange(seq_len - end)
    return Rows(ids, position, labels, example)


def _first_fit(lengths: list[int], seq_len: int) -> list[tuple[int, int]]:
    """(row, offset) of each example: the first of the last OPEN_ROWS rows with room, else a new row."""
    placed, open_rows, n_rows = [], [], 0  # open_rows: [row, used]
    for length in lengths:
        if length > seq_len:
            raise CogprobeError(f"an example of {length} tokens does not fit seq_len={seq_len}")
        slot = next((r for r in open_rows if r[1] + length <= seq_len), None)
        if slot is None:
            slot, n_rows = [n_rows, 0], n_rows + 1
            open_rows = [*open_rows[-(OPEN_ROWS - 1):], slot]
        placed.append((slot[0], slot[1]))
        slot[1] += length
    return placed


def check_isolation(model, seq_len: int = 12) -> None:
    """Fail unless the model keeps packed examples apart given restarting position ids (transformers
    builds the block-diagonal mask from them; a model that ignores position ids would mix them)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(1, vocab, (1, n), generator=g).to(device) for n in (seq_len // 2, seq_len - seq_len // 2))
    position = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None].to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=position, use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
    model.train(was_training)
    if not torch.isfinite(alone).all():
        return  # a model that computes NaN can't be judged here; training stops at its first NaN loss
    err = float((packed[:, a.shape[1]:] - alone).abs().max())
    if not err <= 1e-3 * max(1.0, float(alone.abs().max())):
        raise CogprobeError(f"{type(model).__name__} lets packed training examples attend to each other "
                            f"(logits differ by {err:.2g}); this model family needs a transformers version "
                            "that builds packed-sequence masks from position ids")

