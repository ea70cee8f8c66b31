"""The training loop on tiny models: what trains, what stays bit-identical, resume, atomicity."""
from __future__ import annotations

import json
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
from cogprobe.checkpoints import Checkpoints, step_dir
from cogprobe.errors import CogprobeError
from cogprobe.train import TrainConfig, lr_factor, train
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
])
def test_config_rejects_with_named_field(inputs, tmp_path, kw, words):
    with pytest.raises(CogprobeError, match=words):
        config(inputs, tmp_path, **{"strategy": "full", **kw})


def test_save_steps_always_hold_base_and_last(inputs, tmp_path):
    assert config(inputs, tmp_path, "full", steps=100, save_steps="log:4").save_step_list() == [0, 1, 5, 22, 100]
    assert config(inputs, tmp_path, "full", steps=10, save_steps=[5, 3]).save_step_list() == [0, 3, 5, 10]
    assert config(inputs, tmp_path, "full", steps=10, save_steps="4").save_step_list() == [0, 4, 10]


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


def test_grad_accum_matches_one_big_batch(inputs, tmp_path):
    """Micro-batches of 2 x 2 accumulate to the update of one batch of 4 (same rows, same tokens)."""
    big = final_state(config(inputs, tmp_path / "big", "full", batch_size=4, lr=1e-3))
    acc = final_state(config(inputs, tmp_path / "acc", "full", batch_size=2, grad_accum=2, lr=1e-3))
    logs = [pd.read_parquet(tmp_path / n / "train_log.parquet") for n in ("big", "acc")]
    assert np.allclose(logs[0]["loss"], logs[1]["loss"], atol=1e-5)
    assert all(torch.allclose(big[k], acc[k], atol=1e-5) for k in big)


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


@pytest.mark.parametrize("strategy, layers", [("full", None), ("lora-layers", "1,4")])
def test_resume_equals_uninterrupted(inputs, tmp_path, strategy, layers):
    kw = dict(layers=layers, steps=6, save_steps="3", warmup=2, lora_dropout=0.1, weight_decay=0.01)
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
    import cogprobe.checkpoints as ck
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
        import cogprobe.checkpoints as ck
        from cogprobe.train import TrainConfig, train
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
    module = importlib.import_module("cogprobe.train")  # the module (`cogprobe.train` is the function)
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
