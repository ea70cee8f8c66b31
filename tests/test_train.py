"""The training loop on tiny models: what trains, what stays bit-identical, resume, atomicity."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.tuning.checkpoints import Checkpoints, own_steps, step_dir
from cogprobe.core.errors import CogprobeError
from cogprobe.tuning.loop import TrainConfig, lr_factor, train
from helpers import config, write_corpus
from tiny import save_tiny, tiny_model, tiny_tokenizer



def base_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def final_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Train and return the trained model's state_dict (captured at the last step)."""
    seen = {}
    train(cfg, on_step=lambda step, model, loss: seen.update(
        state={k: v.detach().clone() for k, v in model.state_dict().items()}))
    return seen["state"]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("kw, words", [
    (dict(strategy="sgd"), "strategy"),
    (dict(strategy="layers"), "needs layers"),
    (dict(strategy="full", layers="0-1"), "only used by"),
    (dict(strategy="lora", train_head=True), "train_head"),
    (dict(steps=0), "steps=0"),
    (dict(seq_len=1), "seq_len"),
    (dict(lr=0), "lr=0"),
    (dict(schedule="step"), "schedule"),
    (dict(save_steps="0,99"), "outside 0..4"),
    (dict(save_steps="log:x"), "log:N"),
    (dict(mix_perception=0, mix_production=0, mix_plain=0), "mixture"),
    (dict(resume=True, overwrite=True), "contradict"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(eval_steps="every:0"), "every:N"),
    (dict(eval_steps="0,9"), "eval_steps.*outside 0..4"),
    (dict(dev_pairs=-1), "dev_pairs"),
    (dict(plateau_window=1.0), "plateau_window"),
    (dict(stop_on_plateau=True, schedule="constant"), "needs a dev curve.*--eval-steps"),
    (dict(stop_on_plateau=True, eval_steps="every:1"), "cosine schedule needs plateau_min_steps.*--schedule constant"),
    (dict(schedule_steps=3), "schedule_steps=3.*>= steps \\(4\\)"),
    (dict(schedule_steps=-1), "schedule_steps=-1"),
    (dict(loss_chunk_tokens=-1), "loss_chunk_tokens=-1"),
])
def test_config_rejects_with_named_field(inputs, tmp_path, kw, words):
    with pytest.raises(CogprobeError, match=words):
        config(inputs, tmp_path, **{"strategy": "full", **kw})


def test_save_steps_always_hold_base_and_last(inputs, tmp_path):
    assert config(inputs, tmp_path, "full", steps=100, save_steps="log:4").save_step_list() == [0, 1, 5, 22, 100]
    assert config(inputs, tmp_path, "full", steps=10, save_steps=[5, 3]).save_step_list() == [0, 3, 5, 10]
    assert config(inputs, tmp_path, "full", steps=10, save_steps="4").save_step_list() == [0, 4, 10]


def test_eval_steps_are_off_by_default_and_else_hold_base_and_last(inputs, tmp_path):
    assert config(inputs, tmp_path, "full").eval_step_list() == []
    assert config(inputs, tmp_path, "full", steps=10, eval_steps="every:4").eval_step_list() == [0, 4, 8, 10]
    assert config(inputs, tmp_path, "full", steps=100, eval_steps="log:4").eval_step_list() == [0, 1, 5, 22, 100]
    assert config(inputs, tmp_path, "full", steps=10, save_steps="every:5").save_step_list() == [0, 5, 10]


def test_config_round_trips_through_dict(inputs, tmp_path):
    cfg = config(inputs, tmp_path, "lora-layers", layers="cogsym", lora_targets="q_proj, v_proj")
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    with pytest.warns(UserWarning, match="unknown"):
        again = TrainConfig.from_dict({**cfg.to_dict(), "future_field": 1})
    assert again.to_dict() == cfg.to_dict()


def test_lr_schedule_warmup_then_decay():
    f = [lr_factor(s, 10, 2, "cosine") for s in range(1, 11)]
    assert f[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(f[2:], f[3:])) and 0 < f[-1] < 0.05
    assert [lr_factor(s, 4, 0, "linear") for s in range(1, 5)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(7, 10, 2, "constant") == 1.0


# ------------------------------------------------------------------ strategies


def test_layers_changes_exactly_the_listed_blocks(inputs, tmp_path):
    state = final_state(config(inputs, tmp_path / "run", "layers", layers="1,4"))
    base = base_state(inputs["llama"])
    changed = {n for n in base if not torch.equal(base[n], state[n])}
    listed = {n for n in base if n.startswith(("model.layers.1.", "model.layers.4."))}
    assert changed == listed  # every tensor of blocks 1 and 4, and nothing else (bit-identical)
    saved = load_file(str(step_dir(tmp_path / "run", 4) / "trainable.safetensors"))
    assert set(saved) == listed


def test_layers_with_head_trains_norm_and_head_not_embeddings(inputs, tmp_path):
    state = final_state(config(inputs, tmp_path / "run", "layers", family="qwen2", layers="0", train_head=True))
    base = base_state(inputs["qwen2"])
    changed = {n for n in base if not torch.equal(base[n], state[n])}
    assert {"lm_head.weight", "model.norm.weight"} <= changed
    assert "model.embed_tokens.weight" not in changed
    assert all(n.startswith("model.layers.0.") for n in changed - {"lm_head.weight", "model.norm.weight"})


def test_full_trains_every_tensor(inputs, tmp_path):
    state = final_state(config(inputs, tmp_path / "run", "full"))
    base = base_state(inputs["llama"])
    assert all(not torch.equal(base[n], state[n]) for n in base)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["trainable_params"] == manifest["total_params"]


@pytest.mark.parametrize("family, prefix", [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_lora_layers_adapts_exactly_the_listed_blocks(inputs, tmp_path, family, prefix):
    state = final_state(config(inputs, tmp_path / "run", "lora-layers", family=family, layers="2,3"))
    lora = [n for n in state if "lora_" in n]
    blocks = {int(n.split(prefix + ".")[1].split(".")[0]) for n in lora}
    assert blocks == {2, 3}
    base = base_state(inputs[family])
    for name, value in state.items():  # the base weights inside the PeftModel did not move
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" not in name and plain in base:
            assert torch.equal(value, base[plain]), name
    adapter = load_file(str(step_dir(tmp_path / "run", 4) / "adapter_model.safetensors"))
    assert {int(k.split(prefix + ".")[1].split(".")[0]) for k in adapter} == {2, 3}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    expected = {"gpt2": ["c_attn", "c_fc", "c_proj"],
                "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]}
    assert manifest["lora_targets"] == expected[family] and manifest["layers"] == [2, 3]


def test_lora_covers_every_block(inputs, tmp_path):
    state = final_state(config(inputs, tmp_path / "run", "lora", lora_targets=["q_proj"]))
    blocks = sorted({int(n.split("layers.")[1].split(".")[0]) for n in state if "lora_" in n})
    assert blocks == list(range(6)) and all("q_proj" in n for n in state if "lora_" in n)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_run_with_a_longer_schedule_is_the_start_of_the_longer_run(inputs, tmp_path, schedule):
    """schedule_steps: a 3-step run on an 8-step schedule takes the 8-step run's first 3 updates (a
    study's learning-rate trial is the start of the run it chooses for), not a schedule of its own."""
    kw = dict(lr=1e-3, warmup=0.25, schedule=schedule, save_steps="3")   # warm-up: 2 steps of the 8
    long, short = tmp_path / "long", tmp_path / "short"
    train(config(inputs, long, "full", steps=8, **kw))
    own = final_state(config(inputs, tmp_path / "own", "full", steps=3, **kw))
    start = final_state(config(inputs, short, "full", steps=3, schedule_steps=8, **kw))
    at3 = Checkpoints.open(long).load(3)[0].state_dict()
    assert all(torch.equal(start[k], at3[k]) for k in start)
    assert not all(torch.equal(own[k], at3[k]) for k in own)   # its own 3-step schedule moves otherwise
    logs = [pd.read_parquet(d / "train_log.parquet") for d in (long, short)]
    assert np.array_equal(logs[1]["lr"], logs[0]["lr"][:3])


def test_grad_accum_matches_one_big_batch(inputs, tmp_path):
    """Micro-batches of 2 x 2 accumulate to the update of one batch of 4 (same rows, same tokens)."""
    big = final_state(config(inputs, tmp_path / "big", "full", batch_size=4, lr=1e-3))
    acc = final_state(config(inputs, tmp_path / "acc", "full", batch_size=2, grad_accum=2, lr=1e-3))
    logs = [pd.read_parquet(tmp_path / n / "train_log.parquet") for n in ("big", "acc")]
    assert np.allclose(logs[0]["loss"], logs[1]["loss"], atol=1e-5)
    assert all(torch.allclose(big[k], acc[k], atol=1e-5) for k in big)


@pytest.mark.parametrize("strategy,layers", [("full", None), ("layers", "1,4"), ("lora-layers", "0,5")])
def test_gradient_checkpointing_gives_the_same_run(inputs, tmp_path, strategy, layers):
    """Recomputing activations in the backward pass changes memory, not the numbers (dropout off)."""
    kw = dict(layers=layers, lr=1e-3, lora_dropout=0.0)
    plain = final_state(config(inputs, tmp_path / "plain", strategy, **kw))
    on, seen = [], {}

    def watch(step, model, loss):
        on.append(any(getattr(m, "gradient_checkpointing", False) for m in model.modules()))
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    train(config(inputs, tmp_path / "ckpt", strategy, gradient_checkpointing=True, **kw), on_step=watch)
    assert on and all(on)   # the blocks did recompute
    saved = seen["state"]
    logs = [pd.read_parquet(tmp_path / n / "train_log.parquet") for n in ("plain", "ckpt")]
    assert np.allclose(logs[0]["loss"], logs[1]["loss"], atol=1e-6)
    assert np.allclose(logs[0]["grad_norm"], logs[1]["grad_norm"], rtol=1e-5)
    assert plain.keys() == saved.keys() and all(torch.allclose(plain[k], saved[k], atol=1e-6) for k in plain)


@pytest.mark.parametrize("family, strategy, kw", [
    ("llama", "full", {}), ("llama", "full", dict(bf16=True)), ("qwen2", "layers", dict(layers="1,4", train_head=True)),
    ("gpt2", "lora-layers", dict(layers="0,5", lora_dropout=0.0))])
def test_the_chunked_loss_on_scored_positions_is_the_models_own_loss(inputs, tmp_path, family, strategy, kw):
    """loss_chunk_tokens: logits of the labelled positions only, 7 tokens a chunk, recomputed in the backward
    pass; the same losses, gradients and weights as the model's own loss, up to float order."""
    kw = dict(family=family, lr=1e-3, **kw)
    own = final_state(config(inputs, tmp_path / "own", strategy, **kw))
    chunked = final_state(config(inputs, tmp_path / "chunked", strategy, loss_chunk_tokens=7, **kw))
    logs = [pd.read_parquet(tmp_path / n / "train_log.parquet") for n in ("own", "chunked")]
    tol = dict(rtol=1e-3, atol=1e-3) if kw.get("bf16") else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logs[1]["loss"], logs[0]["loss"], **tol)
    np.testing.assert_allclose(logs[1]["grad_norm"], logs[0]["grad_norm"], **tol)
    assert own.keys() == chunked.keys()
    for name in own:
        torch.testing.assert_close(chunked[name], own[name], rtol=1e-4, atol=1e-4 if not kw.get("bf16") else 1e-3)


def test_the_chunked_loss_refuses_a_model_that_caps_its_logits(tmp_path):
    """Gemma 2 soft-caps its logits after the head; the chunked path would skip that, so it says so."""
    from cogprobe.tuning.loss import check_plain_head
    from tiny import tiny_model
    with pytest.raises(CogprobeError, match="final_logit_softcapping.*--loss-chunk-tokens 0"):
        check_plain_head(tiny_model("gemma2"))
    check_plain_head(tiny_model("llama"))


def test_bf16_autocast_keeps_fp32_weights(inputs, tmp_path):
    state = final_state(config(inputs, tmp_path / "bf16", "layers", layers="0", bf16=True))
    assert all(v.dtype == torch.float32 for v in state.values())
    train(config(inputs, tmp_path / "fp32", "layers", layers="0"))
    half, full = (pd.read_parquet(tmp_path / n / "train_log.parquet")["loss"] for n in ("bf16", "fp32"))
    assert 0 < abs(half[0] - full[0]) < 0.05  # same batch, computed in bf16: close, not equal


# ------------------------------------------------------------------ run folder


def test_run_folder_manifest_log_and_cost(inputs, tmp_path):
    out = train(config(inputs, tmp_path / "run", "layers", layers="cogsym", grad_accum=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [0, 5] and manifest["strategy"] == "layers"  # round(0.25*6)=2 -> 1+1
    assert manifest["base"]["fingerprint"] and manifest["versions"]["torch"].startswith("2.")
    assert manifest["machine"].endswith(f"{os.cpu_count()} cores")    # bf16 results and times depend on it
    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log["step"]) == [1, 2, 3, 4]
    assert list(log["tokens"]) == list(log["step_tokens"].cumsum())  # real tokens, padding not counted
    assert ((log["step_tokens"] <= 2 * 2 * 24) & (log["step_tokens"] > 2 * 24)).all()
    assert (log["loss_tokens"] < log["step_tokens"]).all()  # prompts and first tokens are not labels
    assert {"loss", "lr", "seconds", "grad_norm"} <= set(log.columns)
    cost = json.loads((out / "cost.json").read_text())
    trainable = manifest["trainable_params"]
    assert cost["trainable_params"] == trainable
    assert cost["optimizer_state_bytes"] == 2 * 4 * trainable + 4 * 18  # exp_avg, exp_avg_sq + a step per tensor (2 blocks x 9)
    assert cost["peak_memory_bytes"] > 0 and cost["sec_per_step"] > 0 and cost["tokens_per_sec"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0", "step-2", "step-4"]
    assert not (out / "checkpoints" / "step-0" / "trainable.safetensors").exists()
    meta = json.loads((out / "checkpoints" / "step-4" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["tokens_seen"] == log["tokens"].iloc[-1]
    assert meta["train_loss"] == log["loss"].iloc[-1] and cost["tokens_total"] == log["tokens"].iloc[-1]
    assert not any((out / "checkpoints").glob("*/resume"))  # a finished run keeps no optimizer state


def test_out_folder_rules(inputs, tmp_path):
    out = tmp_path / "run"
    train(config(inputs, out, "full"))
    stamp = (out / "train_log.parquet").stat().st_mtime_ns
    assert train(config(inputs, out, "full", threads=2)) == out  # same run, finished: nothing to do
    assert (out / "train_log.parquet").stat().st_mtime_ns == stamp
    with pytest.raises(CogprobeError, match="different run.*lr"):
        train(config(inputs, out, "full", lr=1e-3))
    train(config(inputs, out, "full", lr=1e-3, overwrite=True))
    assert json.loads((out / "manifest.json").read_text())["config"]["lr"] == 1e-3
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(CogprobeError, match="not empty"):
        train(config(inputs, other, "full"))


def test_a_manifest_older_than_a_knob_reads_it_as_its_default(inputs, tmp_path):
    out = train(config(inputs, tmp_path / "run", "full"))
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("eval_steps", "stop_on_plateau", "plateau_window"):
        del manifest["config"][key]
    del manifest["stop"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert train(config(inputs, out, "full")) == out  # the same run, finished
    with pytest.raises(CogprobeError, match="different run.*eval_steps"):
        train(config(inputs, out, "full", eval_steps="2", dev_pairs=3))


def test_a_run_recorded_under_the_old_key_names_is_the_same_run(inputs, tmp_path):
    """`eval_pairs`, `eval_max_sentence_tokens`, `eval_sample_seed` and `max_sentence_tokens` were
    renamed (`tuning.config.RENAMED`): a run and a sweep table recorded under the old names are still
    that run and its table, for a rerun, a sweep that adds to the table, and `verify`."""
    from cogprobe.checks import verify
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import sweep_run
    from cogprobe.tuning.config import RENAMED
    cfg = config(inputs, tmp_path / "run", "full", eval_steps="2", dev_pairs=3)
    out = train(cfg)
    quiet = dict(evalset=EvalSet.for_run(out, n=3, max_sentence_tokens=32), ks=(0, 1), batch_size=2,
                 log=lambda _: None, progress=False)
    sweep_run(out, steps=[0], **quiet)
    old = {new: old for old, new in RENAMED.items()}
    for path, where in ((out / "manifest.json", ("config",)), (out / "sweeps.parquet.json", ("source", "run"))):
        record = json.loads(path.read_text())
        parent = record[where[0]] if len(where) == 2 else record
        parent[where[-1]] = {old.get(k, k): v for k, v in parent[where[-1]].items()}
        assert set(old.values()) <= set(parent[where[-1]])
        path.write_text(json.dumps(record))
    assert train(cfg) == out   # the same run, finished
    table = sweep_run(out, steps=[2], **quiet)   # adds to the table the old record describes
    assert sorted(table["checkpoint_step"].unique()) == [0, 2]
    assert verify(out) == []


def test_nan_loss_stops_and_keeps_last_good_checkpoint(inputs, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "bad")
    tiny_tokenizer().save_pretrained(tmp_path / "bad")
    with pytest.raises(CogprobeError, match="at step 1.*step-0"):
        train(config(inputs, tmp_path / "run", "full", model=tmp_path / "bad"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0"]


# ------------------------------------------------------------------ resume and atomicity


class Stop(Exception):
    pass


def stop_at(n):
    def hook(step, model, loss):
        if step == n:
            raise Stop
    return hook


# the third: a study row as the standard preset trains it (bf16 autocast, embeddings and head
# frozen, dev evaluations between steps), whose interruptions must not change what it learns
STUDY_ROW = dict(bf16=True, train_embeddings=False, train_head=False, eval_steps="every:2", dev_pairs=3)


@pytest.mark.parametrize("strategy, layers, extra", [("full", None, {}), ("lora-layers", "1,4", {}),
                                                     ("full", None, STUDY_ROW)])
def test_resume_equals_uninterrupted(inputs, tmp_path, strategy, layers, extra):
    kw = dict(layers=layers, steps=6, save_steps="3", warmup=2, lora_dropout=0.1, weight_decay=0.01, **extra)
    straight = train(config(inputs, tmp_path / "a", strategy, **kw))
    with pytest.raises(Stop):
        train(config(inputs, tmp_path / "b", strategy, **kw), on_step=stop_at(5))
    with pytest.raises(CogprobeError, match="--resume"):
        train(config(inputs, tmp_path / "b", strategy, **kw))
    resumed = train(config(inputs, tmp_path / "b", strategy, resume=True, **kw))
    a, b = (pd.read_parquet(p / "train_log.parquet") for p in (straight, resumed))
    assert list(b["step"]) == list(range(1, 7))
    assert np.array_equal(a["loss"].to_numpy(), b["loss"].to_numpy())  # bit for bit
    name = "adapter_model.safetensors" if strategy != "full" else "trainable.safetensors"
    ta, tb = (load_file(str(step_dir(p, 6) / name)) for p in (straight, resumed))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_failed_save_leaves_no_checkpoint_and_resume_recovers(inputs, tmp_path, monkeypatch):
    import cogprobe.tuning.checkpoints as ck
    real = ck.save_file

    def failing(tensors, path, **kw):
        if "step-2" in path:
            raise OSError("disk full")
        return real(tensors, path, **kw)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(OSError):
        train(config(inputs, tmp_path / "run", "full"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0"]
    monkeypatch.setattr(ck, "save_file", real)
    out = train(config(inputs, tmp_path / "run", "full", resume=True))
    assert Checkpoints.open(out).steps == [0, 2, 4]


def test_killed_run_leaves_no_complete_looking_checkpoint(inputs, tmp_path):
    out = tmp_path / "run"
    cfg = config(inputs, out, "full")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import cogprobe.tuning.checkpoints as ck
        from cogprobe.tuning.loop import TrainConfig, train
        real = ck.io.write_json
        def die(path, obj):
            if "step-2" in str(path) and str(path).endswith("meta.json"):
                os.kill(os.getpid(), signal.SIGKILL)  # killed after the tensors, before meta.json
            real(path, obj)
        ck.io.write_json = die
        train(TrainConfig(**{cfg.to_dict()!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith(".tmp-step-2") and names[1] == "step-0"
    assert Checkpoints.open(out).steps == [0]
    train(config(inputs, out, "full", resume=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0", "step-2", "step-4"]


# ------------------------------------------------------------------ the dev curve and the plateau stop

CURVE = dict(dev_pairs=3, schedule="constant")  # the tiny corpus's dev split holds 3 pairs


def curve_of(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "dev_curve.parquet")


@pytest.mark.parametrize("strategy, kw", [("full", dict(bf16=True)), ("lora", dict(lora_dropout=0.1))])
def test_dev_curve_rows_and_their_base_point(inputs, tmp_path, strategy, kw):
    from cogprobe.tuning import devcurve
    from cogprobe.models.loading import load_model
    from cogprobe.data.tasks import score
    modes = []
    cfg = config(inputs, tmp_path / "run", strategy, eval_steps="2", **CURVE, **kw)
    out = train(cfg, on_step=lambda step, model, loss: modes.append(model.training))
    assert modes == [True] * 4  # evaluated in eval mode, and train mode restored
    curve = curve_of(out)
    assert list(zip(curve["step"], curve["task"])) == [(s, t) for s in (0, 2, 4) for t in ("perception", "production")]
    for row in curve.itertuples():
        assert row.n_pairs == len(row.example_nll) == len(row.example_tokens) == 3
        assert sum(row.example_tokens) == row.n_tokens
        assert row.nll == pytest.approx(sum(row.example_nll) / row.n_tokens, rel=1e-12)
    assert curve.groupby("step")["nll"].mean().is_monotonic_decreasing  # lr 1e-2 on 4 steps: it learns
    base, tok = load_model(inputs["llama"])
    evalset = devcurve.evalset(cfg)
    for task, examples in evalset.examples(tok).items():  # step 0 is the base model, scored in fp32
        assert curve.query("step == 0 and task == @task")["nll"].item() == score(base, examples).nll
    record = json.loads((out / "dev_curve.parquet.json").read_text())
    assert {k: record[k] for k in evalset.to_dict()} == evalset.to_dict() and record["split"] == "dev"
    assert record["pair_ids"] == list(evalset.pairs(tok).pairs["pair_id"]) and record["sampled"] == 3
    stop = json.loads((out / "manifest.json").read_text())["stop"]
    assert stop == dict(stopped_at=4, stop_reason="cap", plateau=None)


PLATEAU = dict(steps=1000, eval_steps="every:2", stop_on_plateau=True, save_steps="6,12", **CURVE)


def test_stops_on_a_plateau_with_its_final_checkpoint_there(inputs, tmp_path):
    from cogprobe.tuning.plateau import first_plateau
    out = train(config(inputs, tmp_path / "run", "full", **PLATEAU))  # lr 1e-2: the tiny dev NLL flattens early
    manifest = json.loads((out / "manifest.json").read_text())
    stop = manifest["stop"]
    curve = curve_of(out).groupby("step")["nll"].mean()
    assert stop["stop_reason"] == "plateau" and 2 < stop["stopped_at"] < 100
    assert stop["stopped_at"] == first_plateau(list(curve.items()), 0.2, 0.01) == curve.index.max()
    assert [c["step"] for c in stop["plateau"]["checks"]] == list(curve.index)
    assert [c["converged"] for c in stop["plateau"]["checks"]] == [False] * (len(curve) - 1) + [True]
    assert Checkpoints.open(out).steps == [0, 6, 12, stop["stopped_at"]]
    assert len(pd.read_parquet(out / "train_log.parquet")) == stop["stopped_at"]
    assert not any((out / "checkpoints").glob("*/resume"))  # finished: no optimizer state kept
    from cogprobe.checks import verify
    assert verify(out) == []
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert train(config(inputs, tmp_path / "run", "full", resume=True, **PLATEAU)) == out  # stopped: nothing more
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and Checkpoints.open(out).steps[-1] == stop["stopped_at"]


def test_the_flags_reach_the_run(inputs, tmp_path):
    from helpers import cli, train_argv
    argv = train_argv(inputs["llama"], inputs["corpus"], tmp_path / "run", steps=50, lr=1e-12, eval_steps="every:3",
                      dev_pairs=3, schedule="constant", plateau_window=0.5, plateau_min_steps=4)
    assert cli(argv + ["--stop-on-plateau"]) == 0
    stop = json.loads((tmp_path / "run" / "manifest.json").read_text())["stop"]
    assert stop["stopped_at"] == 6 and stop["plateau"]["window"] == 0.5  # 3 is not judged (r = 0, 3 < 4); 6 is


def test_a_flat_curve_stops_at_the_first_step_the_rule_may_judge(inputs, tmp_path):
    out = train(config(inputs, tmp_path / "flat", "full", lr=1e-12, **{**PLATEAU, "eval_steps": "every:1"}))
    assert json.loads((out / "manifest.json").read_text())["stop"]["stopped_at"] == 2  # r(1) = 0: not judged
    out = train(config(inputs, tmp_path / "later", "full", lr=1e-12, plateau_min_steps=5, warmup=8,
                       **{**PLATEAU, "eval_steps": "every:1"}))
    assert json.loads((out / "manifest.json").read_text())["stop"]["stopped_at"] == 8  # not during warm-up


def test_a_decaying_schedule_may_stop_on_a_plateau_from_its_min_step(inputs, tmp_path):
    """With plateau_min_steps a cosine run may stop on a plateau (its schedule the cap's: not at 0 there)."""
    kw = {**PLATEAU, "eval_steps": "every:1", "schedule": "cosine", "steps": 40}
    out = train(config(inputs, tmp_path / "run", "full", lr=1e-12, plateau_min_steps=6, warmup=0, **kw))
    assert json.loads((out / "manifest.json").read_text())["stop"]["stopped_at"] == 6
    lrs = pd.read_parquet(out / "train_log.parquet")["lr"]
    assert len(lrs) == 6 and lrs.iloc[-1] > 0.9e-12   # still near the peak: the cosine spans the 40-step cap


def test_a_curve_that_keeps_improving_runs_to_the_cap(inputs, tmp_path):
    out = train(config(inputs, tmp_path / "run", "full", lr=3e-3, **{**PLATEAU, "steps": 20}))
    stop = json.loads((out / "manifest.json").read_text())["stop"]
    assert (stop["stopped_at"], stop["stop_reason"]) == (20, "cap")
    assert not any(c["converged"] for c in stop["plateau"]["checks"])
    assert Checkpoints.open(out).steps == [0, 6, 12, 20]


def test_resume_meets_the_same_curve_and_the_same_stop(inputs, tmp_path):
    straight = train(config(inputs, tmp_path / "a", "full", **PLATEAU))
    stopped_at = json.loads((straight / "manifest.json").read_text())["stop"]["stopped_at"]
    assert stopped_at > 12 + 1  # so the interruptions below fall between checkpoints
    with pytest.raises(Stop):
        train(config(inputs, tmp_path / "b", "full", **PLATEAU), on_step=stop_at(9))
    assert curve_of(tmp_path / "b")["step"].max() == 8
    resumed = train(config(inputs, tmp_path / "b", "full", resume=True, **PLATEAU))  # from step 6
    a, b = curve_of(straight), curve_of(resumed)
    assert list(b["step"]) == list(a["step"]) and np.array_equal(a["nll"], b["nll"])  # bit for bit
    assert all(np.array_equal(x, y) for x, y in zip(a["example_nll"], b["example_nll"]))
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (straight, resumed)]
    assert manifests[0]["stop"] == manifests[1]["stop"]
    assert Checkpoints.open(resumed).steps == Checkpoints.open(straight).steps


def test_killed_between_the_stop_record_and_the_final_checkpoint_resumes_to_the_same_stop(inputs, tmp_path,
                                                                                           monkeypatch):
    import cogprobe.tuning.checkpoints as ck
    straight = train(config(inputs, tmp_path / "a", "full", **PLATEAU))
    stop = json.loads((straight / "manifest.json").read_text())["stop"]
    real = ck.save_file

    def failing(tensors, path, **kw):
        if f"step-{stop['stopped_at']}" in path:
            raise OSError("disk full")
        return real(tensors, path, **kw)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(OSError):
        train(config(inputs, tmp_path / "b", "full", **PLATEAU))
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["stop"] == stop  # recorded, not saved
    monkeypatch.setattr(ck, "save_file", real)
    with pytest.raises(CogprobeError, match="unfinished run"):
        train(config(inputs, tmp_path / "b", "full", **PLATEAU))
    resumed = train(config(inputs, tmp_path / "b", "full", resume=True, **PLATEAU))  # from step 12
    assert json.loads((resumed / "manifest.json").read_text())["stop"] == stop
    assert curve_of(resumed).equals(curve_of(straight).assign(seconds=curve_of(resumed)["seconds"]))


def test_a_damaged_dev_curve_stops_the_resume_before_anything_changes(inputs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(config(inputs, out, "full", **PLATEAU), on_step=stop_at(9))
    (out / "dev_curve.parquet").write_bytes(b"PAR1 not a table")
    log = (out / "train_log.parquet").read_bytes()
    with pytest.raises(CogprobeError, match="dev_curve.parquet .the dev curve. is not a readable Parquet"):
        train(config(inputs, out, "full", resume=True, **PLATEAU))
    assert (out / "train_log.parquet").read_bytes() == log


def test_threads_are_restored(inputs, tmp_path):
    before = torch.get_num_threads()
    seen = []
    train(config(inputs, tmp_path / "run", "full", steps=1, save_steps=[], threads=1),
          on_step=lambda *a: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before


def test_training_state_is_only_assigned_in_constructors():
    """The run is set up once (`_Run`, frozen) and the loop's changing state is one declared record:
    no `self.x = ...` outside an `__init__`, so no method depends on another having run first."""
    import ast
    import importlib
    import inspect
    module = importlib.import_module("cogprobe.tuning.loop")
    tree = ast.parse(inspect.getsource(module))
    outside = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"):
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                outside += [f"{cls.name}.{fn.name}: self.{t.attr}" for t in targets if isinstance(t, ast.Attribute)
                            and isinstance(t.value, ast.Name) and t.value.id == "self"]
    assert outside == []


def test_resume_points_bound_the_lost_steps_and_leave_no_trace(inputs, tmp_path):
    """`resume_every` checkpoints an interrupted run often (it resumes from the latest), the results
    equal a run without them, and a finished run holds only its save steps."""
    kw = dict(steps=6, save_steps="6", warmup=2, weight_decay=0.01)
    straight = train(config(inputs, tmp_path / "a", "full", **kw))
    with pytest.raises(Stop):
        train(config(inputs, tmp_path / "b", "full", resume_every=2, **kw), on_step=stop_at(5))
    assert [s for s, _ in own_steps(tmp_path / "b")] == [0, 4]       # step 2 went when step 4 landed
    resumed = train(config(inputs, tmp_path / "b", "full", resume_every=2, resume=True, **kw))
    log = pd.read_parquet(resumed / "train_log.parquet")
    assert list(log["step"]) == list(range(1, 7))                      # steps 5 and 6 redone, 1-4 not
    a = pd.read_parquet(straight / "train_log.parquet")
    assert np.array_equal(a["loss"].to_numpy(), log["loss"].to_numpy())
    assert [s for s, _ in own_steps(resumed)] == [0, 6] and not list((resumed / "checkpoints").glob(".tmp-*"))
    with pytest.raises(CogprobeError, match="resume_every"):
        config(inputs, tmp_path / "c", "full", resume_every=-1, **kw)
