"""Checkpoints: own runs, HF Trainer folders and folder lists load as base + what changed."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

import cogprobe  # noqa: F401  (offline environment before transformers)
import cogprobe.tuning.checkpoints as ck
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.core.errors import CogprobeError
from cogprobe.models.loading import load_model, model_fingerprint
from cogprobe.tuning.loop import train
from helpers import config
from tiny import save_tiny, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft vs transformers 5
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


RUNS = {"full": None, "layers": "1,4", "lora-layers": "0,5"}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):  # noqa: F811
    """Each strategy trained once; the trained model's logits captured at every saved step."""
    found = {}
    for strategy, layers in RUNS.items():
        seen = {}

        def capture(step, model, loss):
            if step in (2, 4):
                model.eval()
                seen[step] = logits(model)
                model.train()

        out = train(config(inputs, tmp_path_factory.mktemp(strategy), strategy, layers=layers,
                           lora_dropout=0.0), on_step=capture)
        found[strategy] = (out, seen)
    return found


@pytest.mark.parametrize("strategy", list(RUNS))
def test_own_run_loads_the_trained_model(runs, inputs, strategy):  # noqa: F811
    out, seen = runs[strategy]
    ckpts = Checkpoints.open(out)
    assert ckpts.steps == [0, 2, 4] and ckpts.reference_step == 0
    assert ckpts.base_fingerprint == model_fingerprint(inputs["llama"])
    base, _ = load_model(inputs["llama"])
    assert torch.equal(logits(ckpts.load(0)[0]), logits(base))
    tol = 1e-5 if strategy == "lora-layers" else 0  # merging LoRA reorders float sums
    for step in (2, 4):
        model, tok = ckpts.load(step)
        assert torch.allclose(logits(model), seen[step], atol=tol, rtol=0), step
        assert type(model).__name__ == "LlamaForCausalLM"  # a plain model, LoRA merged
    assert ckpts.meta(4)["tokens_seen"] == pd.read_parquet(out / "train_log.parquet")["tokens"].iloc[-1]


def test_loads_are_independent_copies(runs):
    ckpts = Checkpoints.open(runs["layers"][0])
    a, _ = ckpts.load(4)
    with torch.no_grad():
        a.model.layers[1].mlp.up_proj.weight.zero_()
    b, _ = ckpts.load(4)
    assert not torch.equal(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(ckpts.reference()[0].model.layers[1].mlp.up_proj.weight,
                           a.model.layers[1].mlp.up_proj.weight)


def test_changed_tensors(runs):
    layers = Checkpoints.open(runs["layers"][0])
    names = {n for n, _ in layers.reference()[0].named_parameters()}
    assert layers.changed_tensors(0) == set()
    assert layers.changed_tensors(4) == {n for n in names if n.startswith(("model.layers.1.", "model.layers.4."))}
    full = Checkpoints.open(runs["full"][0])
    assert full.changed_tensors(2) == names | {"lm_head.weight"}  # the tied head is named too
    lora = Checkpoints.open(runs["lora-layers"][0])
    expected = {f"model.layers.{i}.{m}.weight" for i in (0, 5) for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert lora.changed_tensors(4) == expected


def test_peft_reads_lora_checkpoints_directly(runs, inputs):  # noqa: F811
    from peft import PeftModel
    out, seen = runs["lora-layers"]
    base, _ = load_model(inputs["llama"])
    model = PeftModel.from_pretrained(base, str(ck.step_dir(out, 4)))
    assert torch.allclose(logits(model), seen[4], atol=1e-6)


def test_base_is_read_once(runs, monkeypatch):
    calls = []
    real = ck.load_model
    monkeypatch.setattr(ck, "load_model", lambda spec, **kw: calls.append(spec) or real(spec, **kw))
    ckpts = Checkpoints.open(runs["full"][0])
    for step in ckpts.steps:
        ckpts.load(step)
    assert len(calls) == 1


def test_other_base_fingerprint_is_refused(runs, inputs, tmp_path):  # noqa: F811
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs["layers"][0], run)
    with pytest.raises(CogprobeError, match="not the base"):
        Checkpoints.open(run, base=inputs["qwen2"])
    meta = run / "checkpoints" / "step-2" / "meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), base_fingerprint="0" * 64)))
    with pytest.raises(CogprobeError, match="different base model"):
        Checkpoints.open(run)


def _trainer_state(path, step):
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_hf_trainer_folder_of_full_models(inputs, tmp_path):  # noqa: F811
    out = tmp_path / "trainer"
    models = {}
    for step, seed in ((10, 1), (2, 2), (5, 3)):
        models[step] = tiny_model("llama", seed=seed)
        save_tiny(out / f"checkpoint-{step}", "llama", seed=seed)
        if step != 5:  # checkpoint-5 was interrupted: no trainer_state.json
            _trainer_state(out / f"checkpoint-{step}", step)
    ckpts = Checkpoints.open(out, base=inputs["llama"])
    assert ckpts.steps == [0, 2, 10]  # numeric order, base first, the incomplete one left out
    assert torch.allclose(logits(ckpts.load(10)[0]), logits(models[10]), atol=1e-6)
    assert torch.equal(logits(ckpts.load(0)[0]), logits(load_model(inputs["llama"])[0]))
    base = dict(tiny_model("llama", seed=0).named_parameters(remove_duplicate=False))
    other = dict(models[2].named_parameters(remove_duplicate=False))
    differ = {n for n in base if not torch.equal(base[n], other[n])}
    assert "lm_head.weight" in differ and "model.norm.weight" not in differ  # norms start at 1 in any seed
    assert ckpts.changed_tensors(2) == differ
    no_base = Checkpoints.open(out)
    assert no_base.steps == [2, 10] and no_base.reference_step == 2
    assert no_base.changed_tensors(2) == set()


def test_hf_trainer_folder_of_adapters(inputs, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    out = tmp_path / "trainer"
    merged = {}
    for step in (4, 8):
        base, _ = load_model(inputs["llama"])
        torch.manual_seed(step)
        peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(out / f"checkpoint-{step}")
        _trainer_state(out / f"checkpoint-{step}", step)
        merged[step] = logits(peft)
    ckpts = Checkpoints.open(out)  # the base comes from adapter_config.json
    assert ckpts.steps == [0, 4, 8]
    assert torch.allclose(logits(ckpts.load(8)[0]), merged[8], atol=1e-5)
    assert ckpts.changed_tensors(4) == {f"model.layers.{i}.self_attn.{m}.weight"
                                        for i in range(6) for m in ("q_proj", "v_proj")}


def test_list_of_model_folders(inputs, tmp_path):  # noqa: F811
    folders = [save_tiny(tmp_path / f"m{seed}", "llama", seed=seed) for seed in (0, 7, 8)]
    ckpts = Checkpoints.open([str(f) for f in folders])
    assert ckpts.steps == [0, 1, 2] and ckpts.base_fingerprint == model_fingerprint(folders[0])
    assert torch.allclose(logits(ckpts.load(2)[0]), logits(tiny_model("llama", seed=8)), atol=1e-6)
    with_base = Checkpoints.open(folders[1:], base=folders[0])
    assert with_base.steps == [0, 1, 2]
    assert torch.equal(logits(with_base.load(0)[0]), logits(ckpts.load(0)[0]))


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(CogprobeError, match="no checkpoints at"):
        Checkpoints.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CogprobeError, match="neither"):
        Checkpoints.open(tmp_path / "empty")
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(CogprobeError, match="neither a model folder"):
        Checkpoints.open([tmp_path / "tok"])


def test_reading_checkpoints_does_not_import_the_training_code():
    """Sweeps, captures and `verify` read checkpoints; how a run was trained must not come with that."""
    training = ("cogprobe.tuning.strategies", "cogprobe.tuning.config", "cogprobe.tuning.loop",
                "cogprobe.tuning.runfolder")
    code = f"import sys, cogprobe.tuning.checkpoints; print([m for m in {training!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
