"""One evaluation set for every scoring path: sampled, stratified, whole pairs, with the control."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.core.errors import CogprobeError
from cogprobe.data.evalset import EvalSet, stratified_sample
from cogprobe.probe.evaluate import evaluate
from cogprobe.models.loading import load_model
from cogprobe.probe.folders import sweep_run
from cogprobe.data.tasks import CONTROLS, TASKS, derangement, score, sentence_lengths, with_conditional_gain
from cogprobe.tuning.loop import TrainConfig, train
from helpers import write_corpus
from tiny import save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    model, corpus = save_tiny(root / "model", "llama"), write_corpus(root / "corpus.csv")
    cfg = TrainConfig(model=model, corpus=corpus, out=root / "run", strategy="full", steps=2, batch_size=2,
                      seq_len=48, lr=1e-2, warmup=0, save_steps="0,2", threads=1, progress=False,
                      dev=8, test=8)
    return dict(model=model, corpus=corpus, run=train(cfg))


def test_stratified_sample_gives_each_document_its_share():
    pairs = pd.DataFrame({"document": ["a"] * 60 + ["b"] * 30 + ["c"] * 10, "pivot": range(100)})
    for seed in range(5):
        s = stratified_sample(pairs, 20, seed)
        assert s["document"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
        assert s.index.is_monotonic_increasing
    assert not stratified_sample(pairs, 20, 0).equals(stratified_sample(pairs, 20, 1))
    odd = stratified_sample(pairs, 7, 0)["document"].value_counts()  # 4.2, 2.1, 0.7: c gets the last one
    assert odd.to_dict() == {"a": 4, "b": 2, "c": 1}


@pytest.mark.slow
def test_axolotl_sample_is_stratified_whole_and_not_a_prefix():
    from transformers import AutoTokenizer
    from cogprobe.models.loading import embedded_dir
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    e = EvalSet(corpus="axolotl", split="test", n=64, max_sentence_tokens=32)
    pairs, report = e.pairs(tok).pairs, e.report(tok)
    assert len(pairs) == 64 and report["sampled"] == 64 and report["dropped_long"] > 100
    assert max(sentence_lengths(tok, list(pairs["pivot"])) + sentence_lengths(tok, list(pairs["target"]))) <= 32
    test = e.splits().test.pairs
    fits = test[[max(a, b) <= 32 for a, b in zip(sentence_lengths(tok, list(test["pivot"])),
                                                  sentence_lengths(tok, list(test["target"])))]]
    share = fits["document"].value_counts(normalize=True)
    got = pairs["document"].value_counts()
    assert all(abs(got.get(d, 0) - 64 * p) < 1 for d, p in share.items())
    assert list(pairs["pair_id"]) != list(fits["pair_id"][:64])
    smaller = dataclasses.replace(e, n=32).pairs(tok).pairs
    assert list(smaller["pair_id"]) != list(pairs["pair_id"][:32])


def test_controls_keep_continuations_and_move_every_source(run):
    tok = tiny_tokenizer()
    e = EvalSet.for_run(run["run"], split="test", n=6)
    ex = e.examples(tok, (*TASKS, *CONTROLS))
    for control, task in CONTROLS.items():
        true, shuffled = ex[task], ex[control]
        assert [t.input_ids[t.n_prompt:] for t in true] == [s.input_ids[s.n_prompt:] for s in shuffled]
        assert all(t.input_ids[:t.n_prompt] != s.input_ids[:s.n_prompt] for t, s in zip(true, shuffled))
    for n in (2, 5, 31):
        assert all(i != j for i, j in enumerate(derangement(n, 0))) and sorted(derangement(n, 0)) == list(range(n))
    with pytest.raises(CogprobeError, match="at least 2 pairs"):
        derangement(1, 0)


def test_every_scoring_path_gives_the_same_nll(run, tmp_path):
    e = EvalSet.for_run(run["run"], split="dev", n=6)
    table = evaluate(run["model"], e).set_index("task")
    model, tok = load_model(run["model"])
    direct = {t: score(model, x).nll for t, x in e.examples(tok, (*TASKS, *CONTROLS)).items()}
    sweeps = sweep_run(run["run"], ks=[0], tasks=(*TASKS, *CONTROLS), evalset=e, out=tmp_path, log=lambda _: None)
    at_base = sweeps[(sweeps["checkpoint_step"] == 0) & (sweeps["direction"] == "input")].set_index("task")
    for task in (*TASKS, *CONTROLS):
        assert table.loc[task, "nll"] == pytest.approx(direct[task], abs=1e-6)
        assert at_base.loc[task, "nll"] == pytest.approx(direct[task], abs=1e-4)
    assert table.attrs["evalset"]["sampled"] == 6 and set(table.attrs["evalset"]["overlap"].values()) == {0}


def test_a_dev_sweep_refuses_to_mix_with_a_test_sweep(run, tmp_path):
    dev = EvalSet.for_run(run["run"], split="dev", n=4)
    sweep_run(run["run"], ks=[0, 6], evalset=dev, out=tmp_path, log=lambda _: None)
    test = dataclasses.replace(dev, split="test")
    with pytest.raises(CogprobeError, match=r"another evaluation set \(differs in split\)"):
        sweep_run(run["run"], ks=[0, 6], evalset=test, out=tmp_path, log=lambda _: None)


def test_bad_sets_fail_in_one_line(run):
    tok = tiny_tokenizer()
    with pytest.raises(CogprobeError, match="fewer than n=50"):
        EvalSet.for_run(run["run"], n=50).pairs(tok)
    with pytest.raises(CogprobeError, match="raise it"):
        EvalSet.for_run(run["run"], max_sentence_tokens=1).pairs(tok)
    with pytest.raises(CogprobeError, match="split 'val'"):
        EvalSet(split="val")
    assert EvalSet(n=0).n is None


def test_conditional_gain_matches_rows_on_keys():
    t = pd.DataFrame({"task": ["perception", "perception-shuffled", "perception", "perception-shuffled"],
                      "k": [0, 0, 1, 1], "nll": [2.0, 3.0, 2.5, 2.75]})
    got = with_conditional_gain(t, ("k",))
    assert got["conditional_gain"].tolist()[::2] == [1.0, 0.25] and got["conditional_gain"][1::2].isna().all()


@pytest.mark.slow
def test_base_model_uses_the_source_on_both_tasks():
    """The embedded model scores a continuation better after its own source than after another's."""
    e = EvalSet(corpus="axolotl", split="dev", n=32, max_sentence_tokens=32)
    table = evaluate("smollm2-135m", e).set_index("task")
    for task in TASKS:
        assert table.loc[task, "conditional_gain"] > 0.1
        assert table.loc[f"{task}-shuffled", "nll"] > table.loc[task, "nll"]
    assert np.isfinite(table["nll"]).all()
