"""Held-out English prose (the quantisation control): fixed passages, scored as the model's own loss."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import cogprobe
from cogprobe.core.errors import CogprobeError
from cogprobe.data.prose import PASSAGE_TOKENS, cut_passages, prose_text, score_passages
from cogprobe.study.prose_control import reading
from tiny import save_tiny, tiny_model, tiny_tokenizer


def test_the_text_is_running_prose_and_the_passages_are_fixed():
    text = prose_text()
    assert len(text.split()) > 30_000   # pydoc_data.topics' running text (~40k words on CPython 3.11)
    assert not any(line[:1].isspace() for line in text.split("\n"))   # no code or grammar blocks
    tok = tiny_tokenizer()
    a, b = cut_passages(tok, 16), cut_passages(tok, 16)
    assert a == b and len(set(a.index)) == 16 and all(len(ids) == PASSAGE_TOKENS for ids in a.ids)
    assert a.index[0] == 0 and a.index[-1] > a.available // 2        # spread over the whole text
    assert cut_passages(tok, 17).passage_set != a.passage_set
    assert cut_passages(tok, 16, 64).passage_set != a.passage_set
    with pytest.raises(CogprobeError, match=f"holds {a.available} passages of {PASSAGE_TOKENS} tokens"):
        cut_passages(tok, a.available + 1)
    with pytest.raises(CogprobeError, match="at least 2 tokens"):
        cut_passages(tok, 4, 1)


def test_the_prose_is_tokenized_once_per_tokenizer_and_never_shared_between_two():
    from cogprobe.data import prose
    tok = tiny_tokenizer()
    stream = prose.token_stream(tok)
    assert prose.token_stream(tiny_tokenizer()) is stream   # the same definition: tokenized once
    assert stream == tok(prose_text(), add_special_tokens=False).input_ids
    other = tiny_tokenizer()
    other.add_tokens([" the"])   # another definition: its own ids
    assert prose.token_stream(other) == other(prose_text(), add_special_tokens=False).input_ids != stream
    assert cut_passages(other, 4).passage_set != cut_passages(tok, 4).passage_set


def test_a_passage_scores_as_the_model_s_own_language_modelling_loss():
    model, tok = tiny_model(), tiny_tokenizer()
    rows = score_passages(model, tok, 5, batch_size=2)
    assert list(rows.columns) == ["task", "pair_id", "nll_sum", "n_tokens", "passage_set"]
    ids = torch.tensor([cut_passages(tok, 5).ids[3]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()   # mean over tokens 1..T-1, as here
    assert rows["n_tokens"].iloc[3] == PASSAGE_TOKENS - 1
    assert rows["nll_sum"].iloc[3] / rows["n_tokens"].iloc[3] == pytest.approx(loss, rel=1e-5)


def test_prose_nll_is_public_and_gives_its_interval(tmp_path):
    folder = save_tiny(tmp_path / "model", "llama")
    table = cogprobe.prose_nll(folder, passages=8)
    row = table.iloc[0]
    assert row["nll_low"] <= row["nll"] <= row["nll_high"] and row["n_passages"] == 8
    per = pd.DataFrame(table.attrs["passages"])
    assert row["nll"] == pytest.approx(per["nll_sum"].sum() / per["n_tokens"].sum())


@pytest.mark.parametrize("low,high,seeds,want", [
    (-0.03, -0.01, 1, "lower: repair or format"), (0.01, 0.03, 1, "higher: forgetting"),
    (-0.01, 0.02, 1, "not resolved (about"), (-0.01, 0.02, 2, "not resolved (more seeds")])
def test_a_change_is_read_only_as_far_as_its_interval_goes(low, high, seeds, want):
    line = dict(change=(low + high) / 2, change_low=low, change_high=high, n_passages=32, n_seeds=seeds,
                pair_half=0.001, seed_half=(high - low) / 2)
    assert reading(line).startswith(want)
    assert reading(dict(line, n_passages=8)).startswith("not resolved: 8 passages are too few")
