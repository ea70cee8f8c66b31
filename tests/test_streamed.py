"""The streamed engine gives the in-memory engine's rows bit for bit, reading blocks from the files.

Every comparison is exact (0.0 difference, fp32, same batch order): the same tensors make the same
blocks, called with the same arguments on the same batches; only the order of the work differs.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.core.errors import CogprobeError
from cogprobe.probe.fit import skeleton_of
from cogprobe.probe.sweep import sweep
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.tuning.loop import train
from helpers import config, examples, perturbed
from tiny import LAYERS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
NUMBERS = ["nll", "nll_reference", "nll_checkpoint", "share", "n_tokens"]


def model_folders(tmp_path, family, *, embed=True, shard=None):
    """A reference and two checkpoints of a tiny `family` model, saved as HF folders."""
    ref = tiny_model(family)
    models = [ref, perturbed(ref, embed=embed), perturbed(ref, blocks={1, 4}, seed=2)]
    folders = []
    for i, m in enumerate(models):
        folder = tmp_path / f"{family}-{i}"
        m.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
        tiny_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    return Checkpoints.open(folders)


def both(ckpts, **kw):
    """The same sweep by the in-memory and the streamed engine."""
    ex = examples()
    memory = sweep(ckpts, ex, engine="memory", batch_size=2, **kw)
    streamed = sweep(ckpts, ex, engine="streamed", batch_size=2, **kw)
    return memory, streamed


def assert_same_rows(memory: pd.DataFrame, streamed: pd.DataFrame):
    assert len(memory) == len(streamed) > 0
    pd.testing.assert_frame_equal(memory[NUMBERS], streamed[NUMBERS], check_exact=True)
    for col in ("example_nll", "reference_example_nll", "checkpoint_example_nll", "example_tokens"):
        assert np.array_equal(np.stack(memory[col]), np.stack(streamed[col])), col
    assert memory.attrs["engine"] == "memory" and streamed.attrs["engine"] == "streamed"
    assert set(streamed["engine"]) == {"exact"}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("mode", ["revert", "skip"])
def test_streamed_equals_memory_on_model_folders(tmp_path, family, mode):
    memory, streamed = both(model_folders(tmp_path, family), mode=mode)
    assert len(memory) == 3 * 2 * 2 * (LAYERS + 1)
    assert_same_rows(memory, streamed)


@pytest.mark.parametrize("family", ["llama", "phi"])   # tied and untied embeddings
def test_streamed_equals_memory_with_ends(tmp_path, family):
    memory, streamed = both(model_folders(tmp_path, family), ends=True)
    assert_same_rows(memory, streamed)
    assert streamed["ends"].all()


def test_streamed_equals_memory_on_keep_outer_and_a_sharded_reference(tmp_path):
    ckpts = model_folders(tmp_path, "llama", shard="60KB")
    assert (tmp_path / "llama-0" / "model.safetensors.index.json").is_file()
    memory, streamed = both(ckpts, mode="keep-outer", keep_outer=[(0, 0), (1, 1), (2, 0), (0, 3), (3, 3)])
    assert_same_rows(memory, streamed)


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):  # noqa: F811
    """Own runs of each kind of checkpoint: whole tensors (full, embeddings included), a block
    subset, and LoRA adapters on a block subset."""
    found = {}
    for strategy, layers in {"full": None, "layers": "1,4", "lora-layers": "0,5", "lora": None}.items():
        found[strategy] = train(config(inputs, tmp_path_factory.mktemp(strategy), strategy, layers=layers,
                                       lora_dropout=0.0))
    return found


@pytest.mark.parametrize("strategy", ["full", "layers", "lora-layers", "lora"])
def test_streamed_equals_memory_on_own_runs(runs, strategy):
    ckpts = Checkpoints.open(runs[strategy])
    memory, streamed = both(ckpts, ends=strategy == "full")
    assert_same_rows(memory, streamed)
    assert not np.allclose(memory["nll_checkpoint"], memory["nll_reference"])  # the runs moved


def test_streamed_reads_each_block_once_per_checkpoint(tmp_path):
    ckpts = model_folders(tmp_path, "llama", embed=False)
    ex = examples()
    table = sweep(ckpts, ex, engine="streamed", batch_size=2)
    # one group of batches: the reference reads its L blocks; each checkpoint folder its own L and
    # the reference's L (a folder's blocks are compared, not assumed changed)
    assert table.attrs["fit"]["engine"] == "streamed"
    assert table.attrs["block_loads"] == LAYERS + 2 * 2 * LAYERS


def test_auto_picks_streamed_when_two_models_do_not_fit(tmp_path):
    ckpts = model_folders(tmp_path, "llama")
    ex = examples()
    roomy = sweep(ckpts, ex, engine="auto", batch_size=2)
    assert roomy.attrs["engine"] == "memory" and roomy.attrs["fit"]["engine"] == "memory"
    fit = roomy.attrs["fit"]
    budget = (fit["streamed"] + fit["in_memory"]) // 2
    tight = sweep(ckpts, ex, engine="auto", batch_size=2, max_memory=budget)
    assert tight.attrs["engine"] == "streamed"
    assert_same_rows(roomy, tight)
    with pytest.raises(CogprobeError, match="too small for one block plus the activations"):
        sweep(ckpts, ex, engine="streamed", batch_size=2, max_memory=fit["streamed"] // 2)


def test_models_in_memory_stay_in_memory(tmp_path):
    ref = tiny_model("llama")
    table = sweep([(0, ref), (5, perturbed(ref))], examples(), engine="auto")
    assert table.attrs["engine"] == "memory" and table.attrs["fit"] is None
    with pytest.raises(CogprobeError, match="reads checkpoints from their files"):
        sweep([(0, ref), (5, perturbed(ref))], examples(), engine="streamed")


def test_damaged_shards_fail_in_one_line(tmp_path):
    ckpts = model_folders(tmp_path, "llama", shard="60KB")
    folder = tmp_path / "llama-0"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    moved = folder / shards[-1]
    moved.rename(tmp_path / "aside")
    with pytest.raises(CogprobeError, match=f"names the shard {shards[-1]}, which is not in"):
        sweep(Checkpoints.open([str(folder), str(tmp_path / "llama-1")]), examples(), engine="streamed")
    (tmp_path / "aside").rename(moved)
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[-1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CogprobeError, match=f"lacks {name}.*disagree with their index"):
        sweep(Checkpoints.open([str(folder), str(tmp_path / "llama-1")]), examples(), engine="streamed")
    del ckpts


def test_another_architecture_is_refused(tmp_path):
    ckpts = model_folders(tmp_path, "llama")
    other = tmp_path / "other"
    torch.manual_seed(0)
    big = tiny_model("llama")
    big.resize_token_embeddings(400)
    big.save_pretrained(other)
    with pytest.raises(CogprobeError, match="not of the reference's architecture"):
        sweep(Checkpoints.open([str(tmp_path / "llama-0"), str(other)]), examples(), engine="streamed")
    del ckpts


# ------------------------------------------------------------------ the folder verb and the CLI


def test_sweep_run_records_the_engine_and_shards_alike(trained_run, tmp_path, monkeypatch):
    import cogprobe.probe.folders as probe
    from cogprobe.data.evalset import EvalSet
    from helpers import run_as_ranks
    run = trained_run["run"]
    kw = dict(evalset=EvalSet.for_run(run, n=3, max_sentence_tokens=32), batch_size=2, log=lambda _: None)
    memory = probe.sweep_run(run, out=tmp_path / "memory", engine="memory", **kw)
    streamed = probe.sweep_run(run, out=tmp_path / "streamed", engine="streamed", **kw)
    pd.testing.assert_frame_equal(memory, streamed, check_exact=True)
    record = json.loads((tmp_path / "streamed" / "sweeps.parquet.json").read_text())
    (ran,) = record["computed"]
    assert ran["engine"] == "streamed" and ran["dtype"] == "float32" and ran["peak_bytes"] > 0
    assert ran["fit"]["streamed"] < ran["fit"]["in_memory"]
    again = probe.sweep_run(run, out=tmp_path / "streamed", engine="memory", **kw)   # same exact rows: continues
    pd.testing.assert_frame_equal(again, streamed, check_exact=True)
    opened = [probe.open_checkpoints(run) for _ in range(3)]
    for c in opened:   # built before the threads: accelerate's empty-weights init patches torch globally
        skeleton_of(c)
    tables = run_as_ranks(monkeypatch, 3, lambda: probe.sweep_run(opened[probe.world().rank], out=tmp_path / "three",
                                                                  engine="streamed", **kw))
    for table in tables:
        pd.testing.assert_frame_equal(table, memory, check_exact=True)


def test_bfloat16_rows_are_their_own_table(trained_run, tmp_path):
    import cogprobe.probe.folders as probe
    from cogprobe.data.evalset import EvalSet
    run = trained_run["run"]
    kw = dict(evalset=EvalSet.for_run(run, n=3, max_sentence_tokens=32), batch_size=2, log=lambda _: None)
    fp32 = probe.sweep_run(run, out=tmp_path, **kw)
    with pytest.raises(CogprobeError, match="differs in source"):
        probe.sweep_run(run, out=tmp_path, dtype="bfloat16", **kw)
    memory = probe.sweep_run(run, out=tmp_path / "bf16m", dtype="bfloat16", engine="memory", **kw)
    streamed = probe.sweep_run(run, out=tmp_path / "bf16s", dtype="bfloat16", engine="streamed", **kw)
    pd.testing.assert_frame_equal(memory, streamed, check_exact=True)
    assert not np.array_equal(memory["nll"], fp32["nll"])
    np.testing.assert_allclose(memory["nll"], fp32["nll"], atol=0.05)


def test_cli_refuses_a_budget_too_small_and_writes_nothing(trained_run, tmp_path, capsys):
    from helpers import cli
    out = tmp_path / "tables"
    code = cli(["sweep", str(trained_run["run"]), "--out", str(out), "--pairs", "3", "--engine", "streamed",
                "--max-memory", "1KiB"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small for one block plus the activations" in err[0]
    assert not (out / "sweeps.parquet").exists()
    code = cli(["sweep", str(trained_run["run"]), "--out", str(out), "--pairs", "3", "--max-memory", "lots"])
    assert code == 2 and "cannot read 'lots' as an amount of memory" in capsys.readouterr().err


# ------------------------------------------------------------------ capture and alignment


@pytest.mark.parametrize("family,state_bytes", [("llama", 1 << 30), ("gemma2", 1)])
def test_streamed_capture_equals_the_torch_backend(tmp_path, family, state_bytes):
    """Every site, the logit lens and the alignment, in one group or one batch per group."""
    from cogprobe.probe.alignment import sentence_batches
    from cogprobe.probe.capture import capture_tables, task_batches
    from cogprobe.probe.streamed_acts import Streaming
    from helpers import TOY_CORPUS
    ckpts = model_folders(tmp_path, family)
    batches = task_batches(examples(), 2)
    sentences = sentence_batches(tiny_tokenizer(), TOY_CORPUS, 2)
    sites = ("resid", "attn", "mlp")
    acts, aligned, _ = capture_tables(ckpts, batches, sentences, sites=sites)
    streaming = Streaming(skeleton_of(ckpts), state_bytes=state_bytes)
    s_acts, s_aligned, _ = capture_tables(ckpts, batches, sentences, sites=sites, streaming=streaming)
    pd.testing.assert_frame_equal(acts, s_acts, check_exact=True)
    pd.testing.assert_frame_equal(aligned, s_aligned, check_exact=True)
    assert set(acts["stat"]) == {"drift_cos", "cka", "norm", "logit_lens_nll"} and len(aligned)


def test_capture_run_streams_under_a_small_budget_with_the_same_tables(trained_run, tmp_path):
    import cogprobe.probe.folders as probe
    from cogprobe.data.evalset import EvalSet
    run = trained_run["run"]
    kw = dict(evalset=EvalSet.for_run(run, n=3, max_sentence_tokens=32), batch_size=2, log=lambda _: None,
              sites=("resid", "mlp"), alignment=False)
    memory = probe.capture_run(run, out=tmp_path / "memory", **kw)   # auto: two tiny models fit
    record = json.loads((tmp_path / "memory" / "activations.parquet.json").read_text())["computed"][0]
    assert record["engine"] == "memory" and record["fit"]["engine"] == "memory"
    budget = (record["fit"]["streamed"] + record["fit"]["in_memory"]) // 2
    streamed = probe.capture_run(run, out=tmp_path / "auto", max_memory=budget, **kw)
    pd.testing.assert_frame_equal(memory, streamed, check_exact=True)
    (ran,) = json.loads((tmp_path / "auto" / "activations.parquet.json").read_text())["computed"]
    assert ran["engine"] == "streamed" and ran["fit"]["budget"] == budget and ran["peak_bytes"] > 0
    with pytest.raises(CogprobeError, match="--engine streamed reads activations with its own torch hooks"):
        probe.capture_run(run, out=tmp_path / "nn", engine="streamed", backend="nnsight", **kw)
    assert not (tmp_path / "nn").exists()


def test_the_budget_rule_streams_to_the_same_set(trained_run, tmp_path):
    import cogprobe.selection.folders as selection
    from cogprobe.data.evalset import EvalSet
    run = trained_run["run"]
    kw = dict(evalset=EvalSet.for_run(run, n=3, max_sentence_tokens=32), batch_size=2, log=lambda _: None,
              progress=False, rule="budget", search="exhaustive")
    memory = selection.select_run(run, out=tmp_path / "memory", engine="memory", **kw)
    streamed = selection.select_run(run, out=tmp_path / "streamed", engine="streamed", **kw)
    assert (memory.k_in, memory.k_out) == (streamed.k_in, streamed.k_out)
    assert memory.candidates == streamed.candidates


def test_a_checkpoint_with_a_missing_shard_fails_before_anything_is_written(tmp_path):
    import cogprobe.probe.folders as probe
    from cogprobe.data.evalset import EvalSet
    from helpers import write_corpus
    ref = tiny_model("llama")
    folders = []
    for i, m in enumerate((ref, perturbed(ref))):
        m.save_pretrained(tmp_path / f"m{i}", max_shard_size="60KB")
        tiny_tokenizer().save_pretrained(tmp_path / f"m{i}")
        folders.append(str(tmp_path / f"m{i}"))
    index = json.loads((tmp_path / "m1" / "model.safetensors.index.json").read_text())
    (tmp_path / "m1" / sorted(set(index["weight_map"].values()))[0]).unlink()
    evalset = EvalSet(corpus=str(write_corpus(tmp_path / "pairs.csv")), n=3, max_sentence_tokens=32)
    with pytest.raises(CogprobeError, match="which is not in .*m1; copy the missing shard"):
        probe.sweep_run(folders, out=tmp_path / "out", evalset=evalset, engine="streamed", log=lambda _: None)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------ eval


def eval_both(folder, evalset, **kw):
    """The same evaluation by the in-memory and the streamed engine."""
    from cogprobe.probe.evaluate import evaluate
    return evaluate(folder, evalset, engine="memory", **kw), evaluate(folder, evalset, engine="streamed", **kw)


def assert_same_scores(memory: pd.DataFrame, streamed: pd.DataFrame):
    numbers = [c for c in memory.columns if c != "seconds"]
    assert len(memory) == 4 and memory["nll"].notna().all()
    pd.testing.assert_frame_equal(memory[numbers], streamed[numbers], check_exact=True)
    assert streamed["seconds"].isna().all()   # one pass scored every task: no task has seconds of its own
    assert memory.attrs["computed"]["engine"] == "memory" and streamed.attrs["computed"]["engine"] == "streamed"


@pytest.mark.parametrize("family,shard", [("llama", "60KB"), ("gemma2", None), ("gpt_neox", None)])
def test_streamed_eval_equals_the_in_memory_eval(tmp_path, family, shard):
    """Every task and control, its interval and the conditional gain; a sharded folder, a soft-capped
    head and renamed weights."""
    from cogprobe.data.evalset import EvalSet
    from helpers import write_corpus
    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(folder)
    evalset = EvalSet(corpus=str(write_corpus(tmp_path / "pairs.csv")), split="test", n=3, max_sentence_tokens=32)
    memory, streamed = eval_both(folder, evalset, batch_size=4)
    assert_same_scores(memory, streamed)
    fit = streamed.attrs["computed"]["fit"]
    assert fit["engine"] == "streamed" and fit["streamed"] < fit["in_memory"] < 2 * fit["model"] + (1 << 30)


def test_eval_streams_under_a_small_budget_and_in_bfloat16(trained_run, tmp_path):
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.evaluate import evaluate
    evalset = EvalSet(corpus=str(trained_run["corpus"]), split="test", n=3, max_sentence_tokens=32)
    roomy = evaluate(trained_run["model"], evalset, out=tmp_path / "roomy")   # auto: one tiny model fits
    fit = roomy.attrs["computed"]["fit"]
    assert fit["engine"] == "memory" and fit["in_memory"] <= fit["budget"]
    budget = (fit["streamed"] + fit["in_memory"]) // 2
    tight = evaluate(trained_run["model"], evalset, max_memory=budget, out=tmp_path / "tight")
    assert_same_scores(roomy, tight)
    record = json.loads((tmp_path / "tight" / "scores.json").read_text())["computed"]
    assert record["engine"] == "streamed" and record["fit"]["budget"] == budget and record["peak_bytes"] > 0
    memory, streamed = eval_both(trained_run["model"], evalset, dtype="bfloat16")
    assert_same_scores(memory, streamed)
    assert streamed.attrs["computed"]["dtype"] == "bfloat16" and not np.array_equal(memory["nll"], roomy["nll"])
    np.testing.assert_allclose(memory["nll"], roomy["nll"], atol=0.05)


def test_eval_refuses_a_budget_too_small_in_one_line_and_writes_nothing(trained_run, tmp_path, capsys):
    from helpers import cli
    argv = ["eval", "--model", trained_run["model"], "--corpus", trained_run["corpus"], "--pairs", "3",
            "--out", tmp_path]
    assert cli(argv + ["--engine", "streamed", "--max-memory", "1KiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small for one block plus the activations" in err[0] and "1 block(s)" in err[0]
    assert not (tmp_path / "scores.csv").exists()
    assert cli(argv + ["--engine", "streamed"]) == 0
    assert "streamed engine, float32" in capsys.readouterr().out
    assert json.loads((tmp_path / "scores.json").read_text())["computed"]["engine"] == "streamed"


# ------------------------------------------------------------------ the exact parts of rank

FORWARD_ONLY = ("block-influence", "angular", "weight-delta")


def assert_same_rankings(memory: pd.DataFrame, streamed: pd.DataFrame):
    keys = ["checkpoint_step", "ranking", "block", "score", "rank", "forward_passes", "backward_passes"]
    assert len(memory) == len(streamed) > 0
    pd.testing.assert_frame_equal(memory[keys], streamed[keys], check_exact=True)
    assert memory.attrs["engine"] == "memory" and streamed.attrs["engine"] == "streamed"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_streamed_rankings_equal_the_in_memory_ones(tmp_path, family):
    from cogprobe.selection.rankings import rank
    ckpts = model_folders(tmp_path, family)
    memory = rank(ckpts, examples(), rankings=FORWARD_ONLY, batch_size=2, engine="memory")
    streamed = rank(ckpts, examples(), rankings=FORWARD_ONLY, batch_size=2, engine="streamed")
    assert_same_rankings(memory, streamed)
    assert set(streamed["checkpoint_step"]) == {0, 1, 2} and (streamed["score"] > 0).any()


def test_the_block_states_are_the_same_one_batch_per_group(tmp_path):
    from cogprobe.selection.rankings import ON_BASE_REDUCE, angular_distance, block_influence, streamed_block_states
    ckpts = model_folders(tmp_path, "llama")
    ex = examples()
    got = streamed_block_states(skeleton_of(ckpts), ckpts.reference_weights(skeleton_of(ckpts).rename), ex, 2,
                                ON_BASE_REDUCE, state_bytes=1)
    reference = ckpts.reference()[0]
    assert np.array_equal(got["block-influence"], block_influence(reference, ex, batch_size=2))
    assert np.array_equal(got["angular"], angular_distance(reference, ex, batch_size=2))


@pytest.mark.parametrize("strategy", ["full", "layers", "lora-layers"])
def test_streamed_weight_delta_equals_the_in_memory_one_on_own_runs(runs, strategy):
    from cogprobe.selection.rankings import rank
    ckpts = Checkpoints.open(runs[strategy])
    memory = rank(ckpts, examples(), rankings=("weight-delta",), engine="memory")
    streamed = rank(ckpts, examples(), rankings=("weight-delta",), engine="streamed")
    assert_same_rankings(memory, streamed)
    assert (memory["score"] > 0).any()


def test_taylor_does_not_stream_and_auto_streams_the_others_under_a_small_budget(tmp_path):
    from cogprobe.selection.rankings import rank
    ckpts = model_folders(tmp_path, "llama")
    ex = examples()
    roomy = rank(ckpts, ex, rankings=FORWARD_ONLY, batch_size=2)   # auto: two tiny models fit
    fit = roomy.attrs["fit"]
    assert roomy.attrs["engine"] == "memory" and fit["engine"] == "memory"
    budget = (fit["streamed"] + fit["in_memory"]) // 2
    tight = rank(ckpts, ex, rankings=FORWARD_ONLY, batch_size=2, max_memory=budget)
    assert_same_rankings(roomy, tight)
    with pytest.raises(CogprobeError, match=r"taylor ranking needs gradients .*does not stream \(the models need"):
        rank(ckpts, ex, batch_size=2, max_memory=budget)
    with pytest.raises(CogprobeError, match=r"does not stream \(--engine streamed\); drop taylor from --rankings"):
        rank(ckpts, ex, batch_size=2, engine="streamed")


def test_rank_run_streams_through_the_cli_and_records_it(trained_run, tmp_path, capsys):
    from helpers import cli
    argv = ["rank", trained_run["run"], "--pairs", "3", "--rankings", ",".join(FORWARD_ONLY)]
    assert cli(argv + ["--out", tmp_path / "memory", "--engine", "memory"]) == 0
    assert cli(argv + ["--out", tmp_path / "streamed", "--engine", "streamed"]) == 0
    memory, streamed = (pd.read_parquet(tmp_path / e / "rankings.parquet") for e in ("memory", "streamed"))
    cols = ["checkpoint_step", "ranking", "block", "score", "rank"]
    pd.testing.assert_frame_equal(memory[cols], streamed[cols], check_exact=True)
    (ran,) = json.loads((tmp_path / "streamed" / "rankings.parquet.json").read_text())["computed"]
    assert ran["engine"] == "streamed" and ran["fit"]["engine"] == "streamed" and ran["peak_bytes"] > 0
    assert cli(["rank", trained_run["run"], "--pairs", "3", "--engine", "streamed", "--out", tmp_path / "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop taylor from --rankings" in err[-1]
