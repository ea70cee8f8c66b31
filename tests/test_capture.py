import copy
import sys
import weakref

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import cogprobe  # noqa: F401  (offline env before transformers)
from cogprobe.probe.backends import SITES, open_backend, run_with_sites, site_child, site_parts
from cogprobe.models.blocks import find_blocks
from cogprobe.probe.capture import COLUMNS, Similarity, capture, write_activations
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import Example, batches, score
from helpers import PERTURBED, perturbed_block as perturbed, text_examples as examples
from tiny import TEXT, LAYERS, save_tiny, tiny_model, tiny_tokenizer



@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny models run fastest so, and on a busy 2-core machine two threads
    spin-wait (the embedded-model test took 39 s on two threads, 16 s on one, at load 7)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def task_batches(tok):
    # different batch sizes per task, so padding differs and several batches stream
    return {"perception": list(batches(examples(tok), 2, 0)),
            "production": list(batches(examples(tok, 4, offset=2), 3, 0))}


def assert_same_acts(got, want, mask, atol=1e-4):
    assert sorted(got) == sorted(want)
    real = mask.bool()
    for key in want:
        torch.testing.assert_close(got[key][real], want[key][real], atol=atol, rtol=0, msg=str(key))


def table(df, step, site="resid", task="perception"):
    sel = df[(df.checkpoint_step == step) & (df.site == site) & (df.task == task)]
    return sel.pivot_table(index="block", columns="stat", values="value")


# ---------------------------------------------------------------- backends


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_backends_agree_on_every_site(family, tok, task_batches):
    model = tiny_model(family)
    batch = task_batches["perception"][0]
    for layers in (range(LAYERS), [1, 3]):
        want = run_with_sites(model, batch, layers, SITES)
        assert len(want) == len(list(layers)) * 3
        for backend in ("nnsight", "transformerlens"):
            with open_backend(backend, model, layers=layers, sites=SITES, tokenizer=tok) as run:
                got = run(batch)
            assert_same_acts(got, want, batch["attention_mask"])
    # the model comes back as it was: nnsight's instance-level forwards are undone
    assert not [name for name, m in model.named_modules() if "forward" in vars(m) or "__nnsight__" in vars(m)]


def test_torch_sites_are_what_the_block_computes():
    model = tiny_model("llama")
    batch = {"input_ids": torch.tensor([[5, 17, 33, 120, 7, 9]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    acts = run_with_sites(model, batch, range(LAYERS), SITES)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    for i in range(LAYERS - 1):  # HF's last hidden state has the final norm applied
        torch.testing.assert_close(acts[f"blocks.{i}.resid"], hidden[i + 1])
        # a Llama block adds its attention and MLP outputs to the residual stream
        torch.testing.assert_close(hidden[i] + acts[f"blocks.{i}.attn"] + acts[f"blocks.{i}.mlp"], hidden[i + 1])


def test_hooks_removed_after_an_error(tok, task_batches):
    model = tiny_model("llama")
    blocks = find_blocks(model)

    def boom(module, args, out):
        raise RuntimeError("boom")

    bomb = blocks.modules[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_with_sites(model, task_batches["perception"][0], range(LAYERS), SITES)
    with pytest.raises(RuntimeError, match="boom"):
        capture([(0, model)], task_batches, sites=SITES)
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert hooked == ["model.layers.2"] and list(blocks.modules[2]._forward_hooks) == [bomb.id]
    bomb.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # and a normal run leaves none behind either
    run_with_sites(model, task_batches["perception"][0], [0, 5], SITES)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_missing_submodule_and_bad_arguments_fail_clearly():
    block = torch.nn.Sequential()
    block.add_module("mixer", torch.nn.Linear(2, 2))
    with pytest.raises(CogprobeError, match="attn submodule"):
        site_child(block, "attn")
    model = tiny_model("llama")
    with pytest.raises(CogprobeError, match="unknown site"):
        run_with_sites(model, {}, [0], ["residual"])
    with pytest.raises(CogprobeError, match="unknown backend"):
        open_backend("jax", model, layers=[0])


def test_architectures_a_backend_cannot_serve_fail_clearly(tok):
    import transformers as tf
    common = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    helium = tf.AutoModelForCausalLM.from_config(tf.HeliumConfig(num_key_value_heads=2, head_dim=8, **common)).eval()
    assert len(run_with_sites(helium, batch, [0, 1], SITES)) == 6  # torch hooks serve any block
    with pytest.raises(CogprobeError, match=r"backend 'transformerlens' cannot wrap HeliumForCausalLM.*backend='torch'"):
        with open_backend("transformerlens", helium, layers=[0, 1], tokenizer=tok):
            pass
    biogpt = tf.AutoModelForCausalLM.from_config(tf.BioGptConfig(**common)).eval()  # fc1/fc2, no MLP module
    with pytest.raises(CogprobeError, match="cannot find the mlp submodule of BioGptDecoderLayer"):
        run_with_sites(biogpt, batch, [0], ("resid", "mlp"))
    assert set(run_with_sites(biogpt, batch, [0], ("resid", "attn"))) == {"blocks.0.resid", "blocks.0.attn"}


def test_missing_optional_package_says_how_to_install(monkeypatch, tok, task_batches):
    model = tiny_model("llama")
    for backend, module in (("nnsight", "nnsight"), ("transformerlens", "transformer_lens.model_bridge")):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
        with pytest.raises(CogprobeError, match=r"pip install cogprobe\[backends\]"):
            with open_backend(backend, model, layers=[0], tokenizer=tok):
                pass


# ---------------------------------------------------------------- reductions


def test_checkpoint_against_itself_has_no_drift(tok, task_batches):
    model = tiny_model("llama")
    df = capture([(0, model), (7, copy.deepcopy(model))], task_batches, sites=SITES)
    assert list(df.columns) == COLUMNS
    # 2 steps x 2 tasks x 6 layers x (3 sites x 3 stats + 1 logit lens)
    assert len(df) == 2 * 2 * LAYERS * (3 * 3 + 1)
    for stat, value in (("drift_cos", 0.0), ("cka", 1.0)):
        assert (df[df.stat == stat].value == value).all(), stat
    # step 7 equals the reference in every stat
    a = df[df.checkpoint_step == 0].drop(columns="checkpoint_step").reset_index(drop=True)
    b = df[df.checkpoint_step == 7].drop(columns="checkpoint_step").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    # the same object twice (wrapped once) through nnsight gives the same table
    same = capture([(0, model, tok), (7, model, tok)], task_batches, sites=SITES, backend="nnsight")
    pd.testing.assert_frame_equal(same, df, atol=1e-4, rtol=0)


def test_drift_starts_at_the_perturbed_block(task_batches):
    model = tiny_model("llama")
    df = capture([(0, model), (10, perturbed(model))], task_batches, sites=SITES)
    for task in task_batches:
        for site in SITES:
            t = table(df, 10, site, task)
            before, after = t.loc[:PERTURBED - 1], t.loc[PERTURBED:]
            assert (before.drift_cos == 0).all() and (before.cka == 1).all(), (task, site)
            assert (after.drift_cos > 1e-3).all() and (after.cka < 1 - 1e-3).all(), (task, site)
            ref = table(df, 0, site, task)
            pd.testing.assert_series_equal(before.norm, ref.norm.loc[:PERTURBED - 1])
        lens = table(df, 10, "resid", task).logit_lens_nll
        ref_lens = table(df, 0, "resid", task).logit_lens_nll
        assert (lens.loc[:PERTURBED - 1] == ref_lens.loc[:PERTURBED - 1]).all()
        assert (lens.loc[PERTURBED:] != ref_lens.loc[PERTURBED:]).all()


def test_the_reference_runs_once_per_batch_and_the_table_is_the_same_as_rerunning_it(task_batches, monkeypatch):
    """The reference's activations are kept across checkpoints (within a memory budget): it runs once
    per batch, not once per checkpoint, and every value equals the run that recomputes them."""
    import cogprobe.probe.capture as cap
    model = tiny_model("llama")
    ckpts = [(0, model), (10, perturbed(model)), (20, perturbed(model, scale=0.1))]
    calls = []
    real = cap.open_backend

    def counting(backend, m, **kw):
        opened = real(backend, m, **kw)
        if m is not model:
            return opened

        class Counted:
            def __enter__(self):
                run = opened.__enter__()
                return lambda batch: calls.append(1) or run(batch)

            def __exit__(self, *exc):
                return opened.__exit__(*exc)
        return Counted()
    monkeypatch.setattr(cap, "open_backend", counting)
    kept = capture(ckpts, task_batches, sites=SITES)
    n_batches = sum(len(b) for b in task_batches.values())
    assert len(calls) == n_batches
    calls.clear()
    rerun = capture(ckpts, task_batches, sites=SITES, ref_cache_bytes=0)
    assert len(calls) == 3 * n_batches
    pd.testing.assert_frame_equal(kept, rerun, atol=0, rtol=0)


def direct_stats(x, y):
    """CKA, drift and norm from the full (tokens x hidden) matrices, the textbook way."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    cka = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return {"cka": float(cka), "drift_cos": float(1 - cos.mean()), "norm": float(y.norm(dim=-1).mean())}


def test_streaming_stats_equal_full_matrix_stats(task_batches):
    ref, ckpt = tiny_model("gpt2"), perturbed(tiny_model("gpt2"), block=1, scale=0.2)
    task = "perception"
    df = capture([(0, ref), (3, ckpt)], {task: task_batches[task]}, sites=SITES)
    assert len(task_batches[task]) == 3
    xs, ys = {}, {}
    for batch in task_batches[task]:
        real = batch["attention_mask"].bool()
        for store, model in ((xs, ref), (ys, ckpt)):
            for key, act in run_with_sites(model, batch, range(LAYERS), SITES).items():
                store.setdefault(key, []).append(act[real])
    for name, x in xs.items():
        layer, site = site_parts(name)
        want = direct_stats(torch.cat(x), torch.cat(ys[name]))
        got = table(df, 3, site, task).loc[layer]
        for stat, value in want.items():
            assert got[stat] == pytest.approx(value, rel=1e-9, abs=1e-12), (layer, site, stat)


def test_similarity_is_shift_invariant_and_memory_bounded():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) + 1e4  # large common offset
    y = x @ torch.randn(8, 8, generator=gen, dtype=torch.float64) + 3.0
    sim = Similarity()
    for start in range(0, 300, 50):
        sim.update(x[start:start + 50], y[start:start + 50])
    assert sim.n == 300 and {t.numel() for t in sim.stats.values()} <= {8, 64}
    assert sim.values()["cka"] == pytest.approx(direct_stats(x, y)["cka"], rel=1e-9)


def test_logit_lens_at_the_last_block_is_the_models_own_nll(tok):
    model = perturbed(tiny_model("qwen2"))
    exs = {"perception": examples(tok), "production": examples(tok, 4, offset=3)}
    df = capture([(0, model)], {t: list(batches(e, 2, 0)) for t, e in exs.items()})
    for task, e in exs.items():
        lens = table(df, 0, "resid", task).logit_lens_nll
        assert lens.loc[LAYERS - 1] == pytest.approx(score(model, e).nll, abs=1e-5)
        assert not lens.loc[:LAYERS - 2].sub(lens.loc[LAYERS - 1]).abs().lt(1e-6).any()
    without = capture([(0, model)], {t: list(batches(e, 2, 0)) for t, e in exs.items()}, logit_lens=False)
    pd.testing.assert_frame_equal(without, df[df.stat != "logit_lens_nll"].reset_index(drop=True))


@pytest.mark.parametrize("backend", ["nnsight", "transformerlens"])
def test_capture_table_does_not_depend_on_the_backend(backend, tok, task_batches):
    model = tiny_model("llama")
    ckpt = perturbed(model)
    want = capture([(0, model), (5, ckpt)], task_batches, sites=SITES, layers=[0, 3, 5])
    got = capture([(0, model, tok), (5, ckpt, tok)], task_batches, sites=SITES, layers=[0, 3, 5], backend=backend)
    pd.testing.assert_frame_equal(got, want, atol=1e-4, rtol=0)


def test_checkpoints_object_is_loaded_one_at_a_time(tmp_path, monkeypatch, tok, task_batches):
    from cogprobe.tuning.checkpoints import Checkpoints
    base = save_tiny(tmp_path / "base", "llama")
    model, _ = Checkpoints.open([base]).load(0)
    tuned = [perturbed(model, seed=s) for s in (1, 2)]
    for i, m in enumerate(tuned):
        m.save_pretrained(tmp_path / f"tuned{i}")
        tok.save_pretrained(tmp_path / f"tuned{i}")
    ckpts = Checkpoints.open([base, tmp_path / "tuned0", tmp_path / "tuned1"])
    assert ckpts.steps == [0, 1, 2]
    loaded, real_load = [], ckpts.load

    def load(step):
        assert not [r for r in loaded[1:] if r() is not None], "an earlier checkpoint is still alive"
        model, tok = real_load(step)
        loaded.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(ckpts, "load", load)
    got = capture(ckpts, task_batches)
    assert len(loaded) == 3
    want = capture([(0, model), (1, tuned[0]), (2, tuned[1])], task_batches)
    pd.testing.assert_frame_equal(got, want)
    write_activations(got, tmp_path / "run")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "activations.parquet"), got)


def test_bad_inputs_fail_clearly(task_batches):
    model = tiny_model("llama")
    with pytest.raises(CogprobeError, match="appears twice"):
        capture([(0, model), (0, model)], task_batches)
    with pytest.raises(CogprobeError, match="no batches"):
        capture([(0, model)], {"perception": []})
    with pytest.raises(CogprobeError, match="out of range"):
        capture([(0, model)], task_batches, layers=[6])
    for backend in ("nnsight", "transformerlens"):
        with pytest.raises(CogprobeError, match="needs the model's tokenizer"):
            capture([(0, model)], task_batches, backend=backend)


# ---------------------------------------------------------------- raw activations


def test_raw_shards_hold_the_activations(tmp_path, task_batches):
    model, ckpt = tiny_model("llama"), perturbed(tiny_model("llama"))
    capture([(0, model), (2, ckpt)], task_batches, sites=("resid", "mlp"), raw_dir=tmp_path,
            raw_layers=[1, 4], raw_positions="scored")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert files == [f"step-{s}/{t}/batch-{i:05d}.safetensors" for s in (0, 2)
                     for t, n in (("perception", 3), ("production", 2)) for i in range(n)]
    batch = task_batches["production"][1]
    shard = load_file(tmp_path / "step-2" / "production" / "batch-00001.safetensors")
    acts = run_with_sites(ckpt, batch, [1, 4], ("resid", "mlp"))
    pred = torch.zeros_like(batch["score_mask"])
    pred[:, :-1] = batch["score_mask"][:, 1:]
    rows, pos = pred.nonzero(as_tuple=True)
    assert torch.equal(shard["row"], rows) and torch.equal(shard["position"], pos)
    assert torch.equal(shard["token"], batch["input_ids"][rows, pos])
    for layer in (1, 4):
        for site in ("resid", "mlp"):
            assert torch.equal(shard[f"blocks.{layer}.{site}"], acts[f"blocks.{layer}.{site}"][rows, pos])


def test_raw_positions_all_and_explicit(tmp_path, task_batches):
    model = tiny_model("llama")
    one = {"perception": task_batches["perception"][:1]}
    batch = one["perception"][0]
    lengths = batch["attention_mask"].sum(1)
    capture([(0, model)], one, raw_dir=tmp_path / "all", raw_layers=[0], raw_positions="all")
    shard = load_file(tmp_path / "all" / "step-0" / "perception" / "batch-00000.safetensors")
    assert shard["blocks.0.resid"].shape == (int(lengths.sum()), 32)
    capture([(0, model)], one, raw_dir=tmp_path / "ends", raw_layers=[0], raw_positions=[0, -1])
    shard = load_file(tmp_path / "ends" / "step-0" / "perception" / "batch-00000.safetensors")
    assert shard["position"].tolist() == [p for n in lengths.tolist() for p in (0, n - 1)]
    with pytest.raises(CogprobeError, match="raw_layers"):
        capture([(0, model)], one, raw_dir=tmp_path, raw_layers=[2], layers=[0, 1])


def test_raw_budget_stops_before_the_shard_that_would_exceed_it(tmp_path, task_batches):
    model = tiny_model("llama")
    one = {"perception": task_batches["perception"]}
    capture([(0, model)], one, raw_dir=tmp_path / "probe", raw_layers=[0, 1])
    sizes = [p.stat().st_size for p in sorted((tmp_path / "probe").rglob("*.safetensors"))]
    budget = sizes[0] + sizes[1] + sizes[2] // 2  # two shards fit, the third does not
    out = tmp_path / "raw"
    with pytest.raises(CogprobeError, match="raw_budget_bytes"):
        capture([(0, model)], one, raw_dir=out, raw_layers=[0, 1], raw_budget_bytes=budget)
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert left == ["batch-00000.safetensors", "batch-00001.safetensors"]  # no partial or temp file
    # exactly at the budget is allowed
    capture([(0, model)], one, raw_dir=tmp_path / "exact", raw_layers=[0, 1], raw_budget_bytes=sum(sizes))


# ---------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_backends_agree_on_the_embedded_model():
    from cogprobe.models.loading import EMBEDDED, embedded_dir, load_model
    if not (embedded_dir() / "cogprobe-model.json").is_file():
        pytest.skip("the embedded model is not prepared (run `cogprobe prepare`)")
    # eager attention: TransformerBridge forces eager on its copy, so the original must match
    model, tok = load_model(EMBEDDED, attn_implementation="eager")
    texts = ["Nahuatl: in tlacatl quichiua in tlaxcalli", "Spanish: el hombre hace las tortillas",
             "Auh in ye yuhqui in on tlenamacac"]
    exs = [Example(tuple(ids), len(ids) // 2) for ids in (tok(t).input_ids for t in texts)]
    batch = next(batches(exs, 3, tok.pad_token_id))
    layers = range(find_blocks(model).n)
    assert len(layers) == 30
    want = run_with_sites(model, batch, layers, ("resid",))
    for backend in ("nnsight", "transformerlens"):
        with open_backend(backend, model, layers=layers, sites=("resid",), tokenizer=tok) as run:
            got = run(batch)
        assert_same_acts(got, want, batch["attention_mask"], atol=1e-4)  # exact (0.0) in practice
