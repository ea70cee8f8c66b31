"""Training text: both translation directions and plain target text, packed as whole examples.

Every training pair becomes one example of a kind drawn from the mixture:
  - perception: the perception task's prompt + continuation (target -> pivot),
  - production: the production task's prompt + continuation (pivot -> target),
  - plain: the target sentence alone,
  - pivot: the pivot sentence alone (weight 0 by default: alone, it is the pivot-only control, text
    with no word of the new language),
each followed by EOS. A kind of weight 0 draws nothing and leaves the other kinds' draws as they
were (the kinds are drawn by one inverse-CDF draw per pair, and a last kind of weight 0 moves no
boundary), so runs from before `pivot` existed read the same rows. The two directions are tokenized by `tasks.build_examples`
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

from cogprobe.data.corpora import Corpus
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import build_examples, cut_texts

KINDS = ("perception", "production", "plain", "pivot")   # a new kind goes last (see the docstring)
PLAIN = {"plain": "target", "pivot": "pivot"}   # the plain-text kinds and the side each reads
LOSS_ON = ("continuation", "all")   # the first is the default
MAX_SENTENCE_TOKENS = 64   # a training pair longer than this on a side is cut as a whole
OPEN_ROWS = 32    # first-fit looks back this many rows: near-optimal filling at linear cost
IGNORE = -100     # the label transformers' loss skips


class TrainingTexts:
    """Token ids of every pair in every kind, tokenized when first asked for: `get` gives
    (ids, loss_from) of each (kind, pair), where `ids` ends with EOS and fits one row and
    `loss_from` is the first position whose token is a label.

    Why lazy: a run reads only the pairs its steps reach, each as the one kind drawn for it;
    tokenizing the whole train split in every kind cost ~15 s at the start of every run on
    axolotl, longer than a quick study's row trains. A pair's tokens do not depend on which
    other pairs are tokenized with it, so the order of asking changes nothing."""

    def __init__(self, tokenizer, corpus: Corpus, *, seq_len: int, max_sentence_tokens: int = MAX_SENTENCE_TOKENS,
                 kinds: tuple[str, ...] = KINDS, loss_on: str = LOSS_ON[0]):
        if loss_on not in LOSS_ON:
            raise CogprobeError(f"loss_on={loss_on!r}: use one of {', '.join(LOSS_ON)}")
        if tokenizer.eos_token_id is None:
            raise CogprobeError("the tokenizer has no EOS token; training examples end with EOS, "
                                "so set tokenizer.eos_token in the model folder")
        self.tokenizer, self.corpus, self.kinds, self.loss_on = tokenizer, corpus, tuple(kinds), loss_on
        self.seq_len, self.cap = seq_len, max_sentence_tokens
        self._memo: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        if len(corpus):
            self.get([(kind, 0) for kind in self.kinds])  # a seq_len too short fails here, not mid-run

    @property
    def n_pairs(self) -> int:
        return len(self.corpus)

    def get(self, wanted: list[tuple[str, int]]) -> list[tuple[np.ndarray, int]]:
        """(ids, loss_from) of each (kind, pair index); what is missing is tokenized in one call per kind."""
        for kind in KINDS:
            todo = sorted({i for k, i in wanted if k == kind and (k, i) not in self._memo})
            if todo:
                self._memo.update(zip(((kind, i) for i in todo), self._tokenize(kind, todo)))
        return [self._memo[w] for w in wanted]

    @property
    def ids(self) -> dict[str, list[np.ndarray]]:
        """Every pair's ids in every kind (tokenizes them all; an unasked kind gets empty arrays)."""
        return {k: [ids for ids, _ in self._all(k)] for k in KINDS}

    @property
    def loss_from(self) -> dict[str, list[int]]:
        return {k: [lf for _, lf in self._all(k)] for k in KINDS}

    def _all(self, kind: str) -> list[tuple[np.ndarray, int]]:
        return self.get([(kind, i) for i in range(self.n_pairs)])

    def _tokenize(self, kind: str, idx: list[int]) -> list[tuple[np.ndarray, int]]:
        if kind not in self.kinds:  # never drawn (weight 0)
            return [(np.zeros(0, dtype=np.int64), 1)] * len(idx)
        eos = self.tokenizer.eos_token_id
        part = Corpus(self.corpus.name, self.corpus.pairs.iloc[idx], self.corpus.pivot_name, self.corpus.target_name)
        if kind in PLAIN:
            ids = _plain(self.tokenizer, list(part.pairs[PLAIN[kind]]), self.cap, self.seq_len, eos)
            return [(a, 1) for a in ids]
        examples = _fitted(self.tokenizer, part, kind, self.cap, self.seq_len)
        return [(np.array(e.input_ids + (eos,), dtype=np.int64),
                 max(1, e.n_prompt) if self.loss_on == "continuation" else 1) for e in examples]


def tokenize(tokenizer, corpus: Corpus, *, seq_len: int, max_sentence_tokens: int = MAX_SENTENCE_TOKENS,
             kinds: tuple[str, ...] = KINDS, loss_on: str = LOSS_ON[0]) -> TrainingTexts:
    """The corpus' training texts in the asked kinds, tokenized as they are read (see `TrainingTexts`)."""
    return TrainingTexts(tokenizer, corpus, seq_len=seq_len, max_sentence_tokens=max_sentence_tokens,
                         kinds=kinds, loss_on=loss_on)


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
        self._sizes: list[int] = []     # rows of each epoch packed to its end, in order
        self._cache: _Epoch | None = None

    def epoch_examples(self, e: int) -> list[tuple[str, int]]:
        """(kind, pair index) of each example of epoch e, in packing order."""
        rng = np.random.default_rng([self.seed, e])
        n = self.texts.n_pairs
        order = rng.permutation(n)
        kinds = rng.choice(len(KINDS), size=n, p=self.p)
        return [(KINDS[k], int(i)) for i, k in zip(order, kinds)]

    def epoch_rows(self, e: int) -> Rows:
        """Every row of epoch e (packs and tokenizes the whole epoch)."""
        epoch = self._epoch(e)
        epoch.reach(None)
        return epoch.rows

    def _epoch(self, e: int) -> _Epoch:
        """Epoch e's packer (the last one asked for is kept)."""
        if self._cache is None or self._cache.index != e:
            self._cache = _Epoch(e, self.epoch_examples(e), self.texts, self.seq_len, self.pad_id)
        return self._cache

    def _locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of a global row index, packing only as far as the row."""
        e = first = 0
        while True:
            if e == len(self._sizes):
                epoch = self._epoch(e)
                epoch.reach(row - first)
                if not epoch.finished:
                    return e, row - first
                self._sizes.append(len(epoch.rows.input_ids))
            if row < first + self._sizes[e]:
                return e, row - first
            first, e = first + self._sizes[e], e + 1

    def rows(self, start: int, count: int) -> Rows:
        """Rows [start, start + count) of the stream."""
        parts = []
        for row in range(start, start + count):
            e, i = self._locate(row)
            epoch = self._epoch(e)
            epoch.reach(i)
            parts.append((epoch.rows, i))
        return Rows(*(np.stack([getattr(r, f)[i] for r, i in parts])
                      for f in ("input_ids", "position_ids", "labels", "example")))


class _Epoch:
    """One epoch's rows, packed as far as asked for.

    First-fit is online (an example's place depends only on the examples before it), so
    packing a prefix of the epoch gives a row its final contents once it has left the
    window of open rows; the prefix grows geometrically, so packing all of it costs O(n),
    and only the examples packed so far are tokenized."""

    FIRST = 512   # examples packed first: a quick run's rows, with room to spare

    def __init__(self, index: int, order: list[tuple[str, int]], texts: TrainingTexts, seq_len: int, pad_id: int):
        self.index, self.order, self.texts, self.seq_len, self.pad_id = index, order, texts, seq_len, pad_id
        self.packed = 0
        self.rows = pack([], seq_len, pad_id)

    @property
    def finished(self) -> bool:
        return self.packed == len(self.order)

    def final_rows(self) -> int:
        """Rows whose contents no later example can change."""
        n = len(self.rows.input_ids)
        return n if self.finished else n - min(OPEN_ROWS, n)

    def reach(self, row: int | None) -> None:
        """Pack until `row` is final or the epoch is packed (None: to the end)."""
        while not self.finished and (row is None or self.final_rows() <= row):
            self.packed = min(len(self.order), max(self.FIRST, 2 * self.packed))
            self.rows = pack(self.texts.get(self.order[:self.packed]), self.seq_len, self.pad_id)


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

