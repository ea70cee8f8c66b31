import numpy as np
import pandas as pd
import pytest
import torch

import cogprobe  # noqa: F401  (offline env before transformers)
from cogprobe.probe import alignment as al
from cogprobe.probe.capture import capture, capture_with_alignment
from cogprobe.data.corpora import Corpus
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import batches
from helpers import perturbed_block as perturbed, text_examples as examples
from tiny import TEXT, tiny_model, tiny_tokenizer

N, HIDDEN, BLOCKS, MEET = 64, 24, 5, 2


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(seed=0, meet=MEET):
    """{block: [2N, hidden]}: target then pivot vectors, identical pairs at `meet`, independent noise elsewhere."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in range(BLOCKS):
        t = rng.normal(size=(N, HIDDEN))
        out[b] = np.concatenate([t, t if b == meet else rng.normal(size=(N, HIDDEN))])
    return out


def test_retrieval_is_perfect_where_pairs_meet_and_chance_elsewhere():
    rows = pd.DataFrame(al.alignment_rows(0, planted(), N))
    top1 = rows[rows.measure == "retrieval_top1"]
    assert set(top1.direction) == {"target_to_pivot", "pivot_to_target"}
    for _, r in top1.iterrows():
        if r.block == MEET:
            assert r.value == 1.0 and r.low == 1.0
        else:  # chance is 1/N, about one hit: 7 or more has probability < 1e-4
            assert r.value < 7 / N
    chance_mrr = (1 / np.arange(1, N + 1)).sum() / N
    for _, r in rows[(rows.measure == "retrieval_mrr") & (rows.block != MEET)].iterrows():
        assert r.low <= chance_mrr <= r.high
    pmu = rows[rows.measure == "paired_minus_unpaired_cos"].set_index("block")
    assert pmu.loc[MEET, "low"] > 0.9
    assert all(pmu.loc[b, "low"] < 0 < pmu.loc[b, "high"] for b in range(BLOCKS) if b != MEET)
    mrr = rows[rows.measure == "retrieval_mrr"].groupby("block")["value"].mean()
    assert mrr.idxmax() == MEET and mrr[MEET] == 1.0


def test_identical_vectors_everywhere_are_not_retrieval():
    v = np.ones((N, HIDDEN))
    got = al.retrieval(v, v)
    assert got[("retrieval_top1", "target_to_pivot")].sum() == 0  # every candidate ties: rank N
    assert got[("retrieval_mrr", "pivot_to_target")] == pytest.approx(np.full(N, 1 / N))


def test_probe_separates_two_clusters_and_is_at_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(N, HIDDEN)) + 3.0
    pivot = rng.normal(size=(N, HIDDEN)) - 3.0
    assert al.language_probe(target, pivot).mean() == 1.0
    x, y = np.concatenate([target, pivot]), np.repeat([1, 0], N)
    groups = np.tile(np.arange(N), 2)
    accs = []
    for seed in range(5):
        shuffled = np.random.default_rng(100 + seed).permutation(y)
        correct = al.probe_accuracy(x, shuffled, groups, seed)
        ci = al.intervals.paired(lambda m: m["x"], {"x": (correct, np.ones_like(correct))})
        assert ci.low <= 0.5 <= ci.high
        accs.append(correct.mean())
    assert abs(np.mean(accs) - 0.5) < 0.1


def test_peak_block_and_its_shift_have_intervals():
    table = pd.DataFrame(al.alignment_rows(0, planted(), N) + al.alignment_rows(8, planted(1), N))
    peak = al.peak_block(table, 0)
    assert (peak.estimate, peak.low, peak.high) == (MEET, MEET, MEET)
    shift = al.peak_shift(table, 0, 8)
    assert shift.estimate == 0 and not shift.excludes(0)
    table = pd.concat([table, pd.DataFrame(al.alignment_rows(16, planted(2, meet=MEET + 1), N))])
    assert al.peak_shift(table, 0, 16).estimate == 1 and al.peak_shift(table, 0, 16).excludes(0)


def test_bad_inputs_fail_clearly():
    with pytest.raises(CogprobeError, match="at least 4"):
        al.measures(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(CogprobeError, match="no retrieval_mrr rows of step 5"):
        al.peak_block(pd.DataFrame(al.alignment_rows(0, planted(), N)), 5)


# ---------------------------------------------------------------- capture and backends

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_pairs(n=8):
    lines = (TEXT * 3)[:2 * n]
    return Corpus("tiny", pd.DataFrame({"pair_id": range(n), "target": lines[:n], "pivot": lines[n:2 * n],
                                        "document": ["d"] * n}), "Spanish", "Nahuatl")


def test_sentences_are_read_alone_and_pooled_over_their_own_tokens(tok):
    model = tiny_model("llama")
    sents = al.sentence_batches(tok, tiny_pairs(), batch_size=3)
    assert sents.n_pairs == 8 and sum(len(b["input_ids"]) for b in sents.batches) == 16
    _, table = capture_with_alignment([(0, model)], {}, sents, layers=[1, 4])
    assert sorted(table.block.unique()) == [1, 4] and (table.n_pairs == 8).all()
    # the pooled vector of the first target sentence equals the mean of its block output run alone
    from cogprobe.probe.backends import run_with_sites
    ids = tok(tiny_pairs().pairs["target"][0]).input_ids
    one = run_with_sites(model, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))},
                         [1], ["resid"])["blocks.1.resid"][0].double().mean(0)
    pool = al.Pooler([1])
    for b in sents.batches:
        pool.add(run_with_sites(model, b, [1], ["resid"]), b)
    torch.testing.assert_close(torch.from_numpy(pool.vectors()[1][0]), one, atol=1e-5, rtol=0)


def test_alignment_leaves_the_activation_table_unchanged(tok):
    model = tiny_model("llama")
    tasks = {"perception": list(batches(examples(tok), 2, 0))}
    want = capture([(0, model), (5, perturbed(model))], tasks)
    got, table = capture_with_alignment([(0, model), (5, perturbed(model))], tasks,
                                        al.sentence_batches(tok, tiny_pairs()))
    pd.testing.assert_frame_equal(got, want)
    assert set(table.checkpoint_step) == {0, 5} and set(table.measure) == set(al.MEASURES)
    with pytest.raises(CogprobeError, match="add 'resid'"):
        capture_with_alignment([(0, model)], tasks, al.sentence_batches(tok, tiny_pairs()), sites=("mlp",))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("backend", ["nnsight", "transformerlens"])
def test_alignment_does_not_depend_on_the_backend(family, backend, tok):
    model = tiny_model(family)
    ckpt = perturbed(model)
    sents = al.sentence_batches(tok, tiny_pairs())
    _, want = capture_with_alignment([(0, model), (5, ckpt)], {}, sents)
    _, got = capture_with_alignment([(0, model, tok), (5, ckpt, tok)], {}, sents, backend=backend)
    pd.testing.assert_frame_equal(got.drop(columns="example_scores"), want.drop(columns="example_scores"),
                                  atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.stack(got.example_scores), np.stack(want.example_scores), atol=1e-6)


# ---------------------------------------------------------------- run folders, figures, report

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cogprobe.tuning.loop import TrainConfig, train
    from helpers import write_corpus
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("align")
    return train(TrainConfig(model=save_tiny(root / "llama", "llama"), corpus=write_corpus(root / "corpus.csv"),
                             out=root / "run", strategy="full", steps=2, batch_size=4, seq_len=24, lr=1e-2,
                             warmup=0, save_steps="0,2", threads=1, progress=False))


def test_capture_run_writes_alignment_and_fills_in_a_missing_table(tiny_run, tmp_path):
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import capture_run
    evalset = EvalSet.for_run(tiny_run, n=6, split_dev=0.2)
    said = []
    acts = capture_run(tiny_run, evalset=evalset, out=tmp_path, batch_size=4, alignment=False, log=said.append)
    assert not (tmp_path / al.ALIGNMENT).exists()
    capture_run(tiny_run, evalset=evalset, out=tmp_path, batch_size=4, log=said.append)  # alignment only
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "activations.parquet"), acts)
    table = pd.read_parquet(tmp_path / al.ALIGNMENT)
    assert set(table.checkpoint_step) == {0, 2} and (table.n_pairs == 6).all()
    assert any(m.startswith("capture: step 2 (torch backend): tasks 0.0 s, alignment") for m in said)
    capture_run(tiny_run, evalset=evalset, out=tmp_path, batch_size=4, log=said.append)
    assert "already in activations.parquet and alignment.parquet" in said[-1]
    small = EvalSet.for_run(tiny_run, n=3)
    capture_run(tiny_run, evalset=small, out=tmp_path / "small", batch_size=4, log=said.append)
    assert any("alignment left out" in m for m in said) and not (tmp_path / "small" / al.ALIGNMENT).exists()


def planted_table(steps=(0, 16)) -> pd.DataFrame:
    return pd.DataFrame([r for i, s in enumerate(steps) for r in al.alignment_rows(s, planted(i, MEET + i), N)])


def test_figures_draw_from_the_tables(tmp_path):
    from cogprobe.plots import alignment as alignment_plots
    from cogprobe.study import figures
    from helpers import synthetic_sweeps
    table = planted_table()
    fig = alignment_plots.alignment_heatmaps(table)
    assert len([a for a in fig.axes if a.get_title()]) == 3  # top-1 both ways, and the cosine
    fig = alignment_plots.alignment_curves(table)
    assert len([a for a in fig.axes if a.get_visible() and a.get_title()]) == 6
    sweeps = synthetic_sweeps(steps=(0, 16), n=BLOCKS)
    fig = alignment_plots.alignment_vs_specialization(table, sweeps)
    assert "step 16" in fig.get_suptitle()
    with pytest.raises(CogprobeError, match="no checkpoint is in both"):
        alignment_plots.alignment_vs_specialization(table, synthetic_sweeps(steps=(4, 20), n=BLOCKS))
    from cogprobe.core.io import write_parquet
    write_parquet(tmp_path / "alignment.parquet", table)
    write_parquet(tmp_path / "sweeps.parquet", sweeps)
    names = {p.name for p in figures.plot_run(tmp_path, dpi=30)}
    assert {"alignment_heatmaps.png", "alignment_curves.png", "alignment_vs_specialization.png"} <= names


def test_report_section_words_the_move_by_its_interval(tmp_path):
    from cogprobe.core.io import write_parquet
    from cogprobe.study.report import where_languages_meet
    write_parquet(tmp_path / "alignment.parquet", planted_table())
    blocks = where_languages_meet(tmp_path, [])
    assert blocks[0] == ("h2", "Where the languages meet")
    peaks = blocks[2][1]
    assert peaks["peak block"].tolist() == [MEET, MEET + 1] and peaks["95% interval"].iloc[0] == f"[{MEET}, {MEET}]"
    assert blocks[3][1].startswith("Fine-tuning moved the meeting point: peak block at step 16 minus at step 0: +1")
    write_parquet(tmp_path / "alignment.parquet", pd.DataFrame(
        al.alignment_rows(0, planted(0), N) + al.alignment_rows(16, planted(1), N)))
    assert where_languages_meet(tmp_path, [])[3][1].startswith("These pairs do not show")
    assert where_languages_meet(tmp_path / "none", []) == []
