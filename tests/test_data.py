"""Training data: whole examples packed into rows, isolated from each other, labels where the loss is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.data.corpora import Corpus, load_corpus, split_corpus
from cogprobe.tuning.text import IGNORE, PackedStream, check_isolation, pack, tokenize
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import build_examples
from helpers import NAH, VERB_NAH, write_corpus
from tiny import FAMILIES, tiny_model, tiny_tokenizer

WEIGHTS = dict(perception=1, production=1, plain=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return load_corpus(write_corpus(tmp_path_factory.mktemp("data") / "corpus.csv"))


def _examples(rows, i):
    """(example index, ids, positions, labels) of every example in row i."""
    for j in np.unique(rows.example[i][rows.example[i] >= 0]):
        at = rows.example[i] == j
        yield j, rows.input_ids[i][at], rows.position_ids[i][at], rows.labels[i][at]


def test_training_text_is_the_task_text_and_ends_with_eos(corpus):
    tok = tiny_tokenizer()
    texts = tokenize(tok, corpus, seq_len=512)
    for task in ("perception", "production"):
        want = build_examples(tok, corpus, task, max_sentence_tokens=64)
        assert [tuple(a[:-1]) for a in texts.ids[task]] == [w.input_ids for w in want]
        assert texts.loss_from[task] == [w.n_prompt for w in want]  # loss on the continuation
    assert all(a[-1] == tok.eos_token_id for kind in texts.ids.values() for a in kind)
    assert tok.decode(texts.ids["plain"][0][:-1]) == corpus.pairs["target"][0]
    assert tokenize(tok, corpus, seq_len=512, loss_on="all").loss_from["production"] == [1] * len(corpus)


def test_examples_longer_than_a_row_are_cut_as_wholes_never_split(corpus):
    tok = tiny_tokenizer()
    full = tokenize(tok, corpus, seq_len=512)
    texts = tokenize(tok, corpus, seq_len=20)
    for kind in ("perception", "production", "plain"):
        assert all(len(a) <= 20 for a in texts.ids[kind])
        assert any(len(a) < len(b) for a, b in zip(texts.ids[kind], full.ids[kind]))  # some were cut
    rows = PackedStream(texts, WEIGHTS, 20, seed=0, pad_id=0).rows(0, 40)
    for i in range(len(rows.input_ids)):
        for j, ids, pos, labels in _examples(rows, i):
            assert (pos == np.arange(len(ids))).all()          # contiguous, positions from 0
            assert ids[-1] == tok.eos_token_id                 # the whole example, EOS included
            assert labels[0] == IGNORE                         # nothing to predict the first token from
    with pytest.raises(CogprobeError, match="raise seq_len"):
        tokenize(tok, corpus, seq_len=4)


def test_labels_are_the_continuation_only(corpus):
    tok = tiny_tokenizer()
    texts = tokenize(tok, corpus, seq_len=64)
    stream = PackedStream(texts, dict(production=1), 64, seed=0, pad_id=0)
    rows = stream.rows(0, 5)
    for i in range(5):
        for _, ids, _, labels in _examples(rows, i):
            scored = tok.decode(ids[labels != IGNORE])
            assert "Spanish:" not in scored and scored.rstrip(tok.eos_token).strip()  # the Nahuatl side
            assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()
    assert (rows.labels[rows.example < 0] == IGNORE).all()    # padding is never a label


def test_packed_rows_are_a_function_of_seed_and_index(corpus):
    texts = tokenize(tiny_tokenizer(), corpus, seq_len=16)
    a = PackedStream(texts, WEIGHTS, 16, seed=3, pad_id=0)
    a.rows(0, 500)  # walk through several epochs first
    fresh = PackedStream(texts, WEIGHTS, 16, seed=3, pad_id=0)
    for field in ("input_ids", "position_ids", "labels"):
        assert (getattr(fresh.rows(400, 7), field) == getattr(a.rows(400, 7), field)).all()
    assert not (PackedStream(texts, WEIGHTS, 16, seed=4, pad_id=0).rows(0, 7).input_ids
                == fresh.rows(0, 7).input_ids).all()
    assert fresh.rows(0, 3).input_ids.shape == (3, 16)


def test_rows_are_packed_and_tokenized_only_as_far_as_asked(corpus, monkeypatch):
    """Lazy packing gives the rows of packing whole epochs at once, and reads only the pairs it packs."""
    from cogprobe.tuning import text as data
    monkeypatch.setattr(data._Epoch, "FIRST", 4)
    monkeypatch.setattr(data, "OPEN_ROWS", 2)   # a window this small corpus can close rows in
    tok = tiny_tokenizer()
    eager = tokenize(tok, corpus, seq_len=48)
    eager.ids  # every pair, every kind, tokenized in one go
    stream = PackedStream(eager, WEIGHTS, 48, seed=1, pad_id=0)
    whole = [pack(eager.get(stream.epoch_examples(e)), 48, 0) for e in range(3)]
    want = {f: np.concatenate([getattr(w, f) for w in whole]) for f in ("input_ids", "labels", "position_ids")}
    lazy = tokenize(tok, corpus, seq_len=48)
    got = PackedStream(lazy, WEIGHTS, 48, seed=1, pad_id=0)
    first = got.rows(0, 2)
    assert len(lazy._memo) < len(corpus)   # two rows did not need every pair
    for f in want:
        assert (getattr(first, f) == want[f][:2]).all()
        assert (getattr(got.rows(0, len(want[f])), f) == want[f]).all()   # across epochs, too
    for k in ("perception", "production", "plain"):   # a pair's tokens do not depend on its batch
        assert all((a == b).all() for a, b in zip(lazy.ids[k], eager.ids[k]))


def test_every_example_of_an_epoch_is_packed_once(corpus):
    texts = tokenize(tiny_tokenizer(), corpus, seq_len=48)
    stream = PackedStream(texts, WEIGHTS, 48, seed=1, pad_id=0)
    rows = stream.epoch_rows(0)
    kinds = stream.epoch_examples(0)
    assert sorted(set(rows.example[rows.example >= 0].tolist())) == list(range(len(kinds)))
    for i in range(len(rows.input_ids)):
        for j, ids, _, _ in _examples(rows, i):
            kind, pair = kinds[j]
            assert (ids == texts.get([(kind, pair)])[0][0]).all()
    assert rows.n_tokens / rows.input_ids.size > 0.8  # first-fit fills rows well


def test_mixture_weights_choose_the_kinds(corpus):
    tok = tiny_tokenizer()
    texts = tokenize(tok, corpus, seq_len=32, kinds=("plain",))
    text = tok.decode(PackedStream(texts, dict(plain=1.0), 32, seed=0, pad_id=0).rows(0, 20).input_ids.flatten())
    assert "Spanish" not in text and "Nahuatl" not in text and "quichiua" in text
    mixed = tokenize(tok, corpus, seq_len=32)
    text = tok.decode(PackedStream(mixed, dict(production=1.0), 32, seed=0, pad_id=0).rows(0, 20).input_ids.flatten())
    assert text.count("Spanish:") > 5 and "Nahuatl:" in text


def test_pivot_only_text_has_no_word_of_the_new_language_and_leaves_other_mixtures_alone(corpus):
    """The pivot kind (the pivot-only control) reads the pivot side alone; at weight 0 (every run before
    it existed) the stream is row for row what it was."""
    tok = tiny_tokenizer()
    texts = tokenize(tok, corpus, seq_len=32)
    assert tok.decode(texts.ids["pivot"][0][:-1]) == corpus.pairs["pivot"][0]
    rows = PackedStream(texts, dict(pivot=1.0), 32, seed=0, pad_id=0).rows(0, 20)
    text = tok.decode(rows.input_ids.flatten())
    assert not any(w in text for w in (*NAH, *VERB_NAH, "Nahuatl")) and "tortilla" in text
    before = PackedStream(texts, WEIGHTS, 32, seed=3, pad_id=0).rows(0, 40)
    now = PackedStream(texts, dict(WEIGHTS, pivot=0.0), 32, seed=3, pad_id=0).rows(0, 40)
    assert all((getattr(before, f) == getattr(now, f)).all() for f in ("input_ids", "labels", "example"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_examples_do_not_see_each_other(family):
    """The loss of a packed row equals the losses of its examples run alone."""
    model = tiny_model(family)
    check_isolation(model)
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 300, (n,), generator=g).numpy(), lf) for n, lf in ((5, 2), (7, 1), (6, 3))]
    rows = pack(examples, 24, pad_id=0)
    assert len(rows.input_ids) == 1
    packed = model(**rows.batch(), use_cache=False).logits[0]
    at = 0
    for ids, _ in examples:
        alone = model(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0]
        assert torch.allclose(packed[at:at + len(ids)], alone, atol=1e-5)
        at += len(ids)


def test_check_isolation_refuses_a_model_that_mixes_examples():
    class Leaky(torch.nn.Module):  # position ids ignored, causal over the whole row
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return type("Out", (), {"logits": self.emb(input_ids).cumsum(1)})

    with pytest.raises(CogprobeError, match="attend to each other"):
        check_isolation(Leaky())


@pytest.mark.slow
def test_real_corpus_every_continuation_token_sees_its_whole_source():
    """On the embedded tokenizer and axolotl: 100% of loss tokens of translation examples share a row
    with their example's whole prompt (the source sentence, as the example holds it)."""
    from transformers import AutoTokenizer
    from cogprobe.models.loading import embedded_dir
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    train = split_corpus(load_corpus("axolotl")).train
    sub = Corpus("axolotl:train", train.pairs.iloc[:2000], train.pivot_name, train.target_name)
    texts = tokenize(tok, sub, seq_len=128, max_sentence_tokens=64)
    stream = PackedStream(texts, WEIGHTS, 128, seed=0, pad_id=tok.eos_token_id)
    rows, kinds = stream.epoch_rows(0), stream.epoch_examples(0)
    seen = total = 0
    for i in range(len(rows.input_ids)):
        for j, ids, pos, labels in _examples(rows, i):
            kind, pair = kinds[j]
            if kind == "plain":
                continue
            n_labels = int((labels != IGNORE).sum())
            want, loss_from = texts.get([(kind, pair)])[0]
            whole = pos[0] == 0 and (ids == want).all() and (labels[:loss_from] == IGNORE).all()
            seen, total = seen + whole * n_labels, total + n_labels
    assert total > 10_000 and seen == total
