from __future__ import annotations

import cogprobe  # noqa: F401  (sets the offline variables before transformers loads)
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors

from cogprobe.data.corpora import Corpus
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import (TASKS, Template, batches, build_examples, collate,
                            nll_at_scored, score, scored_positions)
from tiny import tiny_model, tiny_tokenizer

PAIRS = [
    ("el hombre hace las tortillas", "in tlacatl quichiua in tlaxcalli"),
    ("la casa es grande y el agua está fría", "in calli huei auh in atl itztic"),
    ("Y así, cuando hizo su ofrenda de fuego, se sienta delante de los demás.",
     "Auh in ye yuhqui in on tlenamacac niman ye ic teixpan on motlalia ce tlacatl."),
    ("agua", "atl"),
    ("¿Si es jade, si es oro?", "¿In chalchihuitl, teocuitlatl?"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    pairs = pd.DataFrame(PAIRS, columns=["pivot", "target"]).assign(document="")
    return Corpus("toy", pairs, "Spanish", "Nahuatl")


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("task", TASKS)
def test_scored_positions_are_the_continuation(tok, corpus, task):
    examples = build_examples(tok, corpus, task)
    assert len(examples) == len(PAIRS)
    for e, (pivot, target) in zip(examples, PAIRS):
        scored, side = (pivot, "Spanish") if task == "perception" else (target, "Nahuatl")
        assert list(e.input_ids[e.n_prompt:]) == _ids(tok, " " + scored)
        assert tok.decode(e.input_ids[:e.n_prompt]).endswith(f"\n{side}:")
    batch = collate(examples, pad_id=0)
    pred_mask, targets = scored_positions(batch)
    assert targets.tolist() == [t for e in examples for t in e.input_ids[e.n_prompt:]]
    assert pred_mask.sum() == batch["score_mask"].sum() == len(targets)
    for i, e in enumerate(examples):
        assert batch["score_mask"][i].nonzero().flatten().tolist() == list(
            range(e.n_prompt, len(e.input_ids)))
        assert pred_mask[i].nonzero().flatten().tolist() == list(
            range(e.n_prompt - 1, len(e.input_ids) - 1))
        assert batch["attention_mask"][i].sum() == len(e.input_ids)


def test_truncation_bounds_lengths(tok, corpus):
    full = build_examples(tok, corpus, "production", max_sentence_tokens=512)
    cut = build_examples(tok, corpus, "production", max_sentence_tokens=4)
    long = max(range(len(PAIRS)), key=lambda i: len(full[i].input_ids))
    assert len(cut[long].input_ids) < len(full[long].input_ids)
    label = len(_ids(tok, "Spanish: ")) + len(_ids(tok, "\nNahuatl:"))
    for e in cut:
        assert 1 <= len(e.input_ids) - e.n_prompt <= 4 + 2
        assert e.n_prompt <= label + 4 + 2
    # sentences short enough are left exactly as they are
    assert full[3].input_ids == cut[3].input_ids


def test_limit_and_bad_arguments(tok, corpus):
    assert len(build_examples(tok, corpus, "perception", limit=2)) == 2
    with pytest.raises(CogprobeError, match="unknown task 'percept'.*perception, production"):
        build_examples(tok, corpus, "percept")
    bad = {"production": Template("{source}: {pivot}\n{target_name}:", " {target}")}
    with pytest.raises(CogprobeError, match="unknown template field.*source"):
        build_examples(tok, corpus, "production", templates=bad)
    broken = {"production": Template("{pivot", " {target}")}
    with pytest.raises(CogprobeError, match="malformed"):
        build_examples(tok, corpus, "production", templates=broken)


def test_template_override(tok, corpus):
    mine = {"production": Template("Translate to {target_name}: {pivot} =>", " {target}")}
    examples = build_examples(tok, corpus, "production", templates=mine)
    e, (pivot, target) = examples[0], PAIRS[0]
    assert list(e.input_ids[:e.n_prompt]) == _ids(tok, f"Translate to Nahuatl: {pivot} =>")
    assert list(e.input_ids[e.n_prompt:]) == _ids(tok, " " + target)
    # the other task keeps its default template
    assert build_examples(tok, corpus, "perception", templates=mine) == build_examples(
        tok, corpus, "perception")


def test_prompt_keeps_leading_specials_only(corpus):
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    e = build_examples(tok, corpus, "production")[0]
    prompt = _ids(tok, f"Spanish: {PAIRS[0][0]}\nNahuatl:")
    assert list(e.input_ids) == [0] + prompt + _ids(tok, " " + PAIRS[0][1])
    assert e.n_prompt == 1 + len(prompt)


def test_batches_in_order(tok, corpus):
    examples = build_examples(tok, corpus, "perception")
    got = list(batches(examples, 2, pad_id=7))
    assert [len(b["input_ids"]) for b in got] == [2, 2, 1]
    rows = [(row, mask) for b in got for row, mask in zip(b["input_ids"], b["attention_mask"])]
    for (row, mask), e in zip(rows, examples):
        assert row[mask.bool()].tolist() == list(e.input_ids)
        assert (row[~mask.bool()] == 7).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_score_invariant_to_batching_and_padding(tok, corpus, family):
    model = tiny_model(family)
    examples = build_examples(tok, corpus, "production") + build_examples(tok, corpus, "perception")
    scores = [score(model, examples, batch_size=b) for b in (1, 3, 8)]
    # one extra, much longer example forces heavy padding on every other one
    padded = examples + [build_examples(tok, corpus, "production", max_sentence_tokens=512)[2]]
    alone = score(model, padded[-1:], batch_size=1)
    both = score(model, padded, batch_size=len(padded))
    base = scores[0]
    assert base.n_tokens == sum(len(e.input_ids) - e.n_prompt for e in examples)
    for s in scores[1:]:
        assert s.n_tokens == base.n_tokens
        assert s.nll == pytest.approx(base.nll, abs=1e-5)
    assert both.nll_sum - alone.nll_sum == pytest.approx(base.nll_sum, abs=1e-4)
    assert 3 < base.nll < 8  # random init over a 384-token vocabulary: about ln(384) = 5.95


def test_score_matches_manual_nll(tok, corpus):
    model = tiny_model("llama", seed=3)
    e = build_examples(tok, corpus, "perception")[2]
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    manual = -sum(logp[t - 1, e.input_ids[t]] for t in range(e.n_prompt, len(e.input_ids)))
    s = score(model, [e])
    assert s.n_tokens == len(e.input_ids) - e.n_prompt
    assert s.nll_sum == pytest.approx(float(manual), abs=1e-4)
    assert s.nll == pytest.approx(float(manual) / s.n_tokens, abs=1e-6)


def test_nll_at_scored_is_cross_entropy():
    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    total, n = nll_at_scored(logits, targets)
    assert n == 7 and isinstance(total, float)
    assert total == pytest.approx(float(F.cross_entropy(logits, targets, reduction="sum")), 1e-6)


def test_score_rejects_nothing():
    with pytest.raises(CogprobeError, match="no examples"):
        score(tiny_model("gpt2"), [])
