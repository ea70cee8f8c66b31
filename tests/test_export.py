"""Layer sets exported to peft / axolotl / LLaMA-Factory / HF Trainer, and merged model folders."""
from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest
import torch
import yaml

from cogprobe.models.blocks import find_blocks
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.cli import main
from cogprobe.core.errors import CogprobeError
from cogprobe.exports import (apply_layer_set, axolotl_matches, export_layer_set, export_merged, layer_set,
                             llamafactory_yaml, peft_config)
from cogprobe.tuning.loop import TrainConfig, train
from tiny import save_tiny, tiny_model, tiny_tokenizer


def _lora_blocks(peft_model) -> set[int]:
    """Blocks that received a LoRA module, read from the wrapped model's module names."""
    blocks = find_blocks(peft_model)
    return {blocks.block_of(name.removeprefix("base_model.model.")) for name, _ in peft_model.named_modules()
            if name.endswith("lora_A")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_json_wraps_exactly_the_set(family):
    from peft import LoraConfig, get_peft_model
    model = tiny_model(family)
    config = LoraConfig(**json.loads(export_layer_set(model, "0,4-5", "peft")))
    wrapped = get_peft_model(copy.deepcopy(model), config)
    assert _lora_blocks(wrapped) == {0, 4, 5}
    assert isinstance(peft_config(model, "0,4-5")["target_modules"], list)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_axolotl_full_patterns_match_exactly_the_blocks(family):
    model = tiny_model(family)
    snippet = yaml.safe_load(export_layer_set(model, "1,3", "axolotl"))
    matched = {n for n, _ in model.named_parameters() if any(axolotl_matches(p, n) for p in snippet["unfrozen_parameters"])}
    blocks = find_blocks(model)
    assert matched == {n for n, _ in model.named_parameters() if blocks.block_of(n) in (1, 3)}


def test_axolotl_lora_and_embeddings():
    model = tiny_model("llama")
    lora = yaml.safe_load(export_layer_set(model, "cogsym", "axolotl", lora=True))
    assert lora["adapter"] == "lora" and lora["peft_layers_to_transform"] == [0, 5]
    assert "q_proj" in lora["lora_target_modules"]
    full = yaml.safe_load(export_layer_set(model, "5", "axolotl", train_embeddings=True))
    assert any(axolotl_matches(p, "model.embed_tokens.weight") for p in full["unfrozen_parameters"])


def test_llamafactory_one_end_only():
    model = tiny_model("llama")
    assert yaml.safe_load(llamafactory_yaml(model, "4-5"))["freeze_trainable_layers"] == 2
    assert yaml.safe_load(llamafactory_yaml(model, "0-2"))["freeze_trainable_layers"] == -3
    with pytest.raises(CogprobeError, match="first or the last N blocks.*axolotl or peft"):
        llamafactory_yaml(model, "cogsym")   # blocks 0 and 5 of 6


def test_apply_layer_set_under_hf_trainer(tmp_path):
    """transformers.Trainer changes exactly the tensors that apply_layer_set leaves trainable."""
    from transformers import Trainer, TrainingArguments
    model = tiny_model("llama")
    model.train()
    names = apply_layer_set(model, "1,4")
    blocks = find_blocks(model)
    assert names and {blocks.block_of(n) for n in names} == {1, 4}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1, 300, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [dict(input_ids=row, labels=row) for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == set(names)


def test_cli_export_writes_and_refuses(tmp_path, capsys):
    folder = save_tiny(tmp_path / "m", "qwen2")
    capsys.readouterr()   # save_pretrained's progress bar
    out = tmp_path / "peft.json"
    assert main(["export", "cogsym", "--model", str(folder), "--to", "peft", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["layers_to_transform"] == [0, 5]
    assert main(["export", "cogsym", "--model", str(folder), "--to", "llamafactory"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "freeze_trainable_layers" in err


# ---------------------------------------------------------------- each target, read by its tool's own rule
# Each tool's rule is restated here from its source, independently of cogprobe.exports, and applied to a
# fresh copy of the model; what it leaves trainable must be what cogprobe's own `train` trains, as the
# names `named_parameters()` lists (a tied head is the embedding's tensor, listed once, under its first name).


def _ours(model, layers, strategy="layers", **ends):
    """What `cogprobe train --strategy <strategy>` trains on this model."""
    from cogprobe.tuning.strategies import apply
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weights warning
        trained = apply(copy.deepcopy(model), strategy, layer_set(model, layers), **ends)
    return {n for n, p in trained.named_parameters() if p.requires_grad}


def _requires_grad(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def axolotl_unfreeze(model, patterns):
    """axolotl src/axolotl/utils/freeze.py, freeze_layers_except + LayerNamePattern (no [range] suffixes):
    every parameter `model.named_parameters()` lists is frozen unless a pattern, with each period not
    followed by `+` escaped, re.match-es its name."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\\\.", pattern)) for pattern in patterns]
    for name, param in model.named_parameters():
        param.requires_grad = any(c.match(name) is not None for c in compiled)
    return model


def llamafactory_freeze(model, options):
    """LLaMA-Factory src/llamafactory/model/adapter.py, _setup_freeze_tuning (freeze_trainable_modules: all):
    the last N blocks (N > 0) or the first -N, as substrings `.{i}.`, plus each freeze_extra_modules
    name, which must be a module outside the blocks, as a substring anywhere in the parameter name."""
    n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    count = options["freeze_trainable_layers"]
    ids = range(max(0, n - count), n) if count > 0 else range(min(-count, n))
    trainable = [f".{i}." for i in ids]
    non_hidden = {name.split(".")[-2] for name, _ in model.named_parameters() if re.search(r"\.\d+\.", name) is None}
    for module in filter(None, str(options.get("freeze_extra_modules") or "").split(",")):
        assert module in non_hidden, f"LLaMA-Factory raises: module {module} is not found"
        trainable.append(module)
    for name, param in model.named_parameters():
        param.requires_grad_(any(t in name for t in trainable))
    return model


def axolotl_lora(model, cfg):
    """axolotl's load_lora: LoraConfig from the config keys it reads."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["lora_target_modules"],
                        layers_to_transform=cfg["peft_layers_to_transform"], layers_pattern=cfg["peft_layers_pattern"],
                        lora_dropout=cfg["lora_dropout"], fan_in_fan_out=cfg["lora_fan_in_fan_out"], bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config), config


ENDS = [dict(), dict(train_head=True), dict(train_embeddings=True), dict(train_embeddings=True, train_head=True)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # llama: tied head (as SmolLM2); qwen2: untied
@pytest.mark.parametrize("ends", ENDS, ids=["blocks", "head", "embeddings", "both"])
def test_axolotl_trains_what_cogprobe_trains(family, ends):
    model = tiny_model(family)
    assert model.config.tie_word_embeddings == (family == "llama")
    for layers in ("cogsym", "1,3", "0-5"):
        snippet = yaml.safe_load(export_layer_set(model, layers, "axolotl", **ends))
        theirs = _requires_grad(axolotl_unfreeze(copy.deepcopy(model), snippet["unfrozen_parameters"]))
        assert theirs == _ours(model, layers, **ends), (layers, ends)
    if family == "llama" and ends.get("train_head"):
        assert "model.embed_tokens.weight$" in snippet["unfrozen_parameters"]   # the name axolotl sees
        assert "lm_head.weight$" not in snippet["unfrozen_parameters"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ends", ENDS, ids=["blocks", "head", "embeddings", "both"])
def test_llamafactory_trains_what_cogprobe_trains_or_refuses(family, ends):
    model = tiny_model(family)
    for layers in ("4-5", "0-2"):
        if ends.get("train_head"):   # the final `norm` would match every block's norms too: refused in one line
            with pytest.raises(CogprobeError, match="freeze_extra_modules .*would also unfreeze") as e:
                export_layer_set(model, layers, "llamafactory", **ends)
            assert "\n" not in str(e.value)
            continue
        options = yaml.safe_load(export_layer_set(model, layers, "llamafactory", **ends))
        theirs = _requires_grad(llamafactory_freeze(copy.deepcopy(model), options))
        assert theirs == _ours(model, layers, **ends), (layers, ends, options)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("to", ["peft", "axolotl", "trainer"])
def test_lora_exports_wrap_what_cogprobe_wraps_with_its_hyperparameters(family, to):
    from peft import LoraConfig, get_peft_model
    from cogprobe.tuning.strategies import LoraSpec
    model, spec = tiny_model(family), LoraSpec()
    text = export_layer_set(model, "cogsym", to, lora=True)
    if to == "peft":
        config = LoraConfig(**json.loads(text))
        theirs = get_peft_model(copy.deepcopy(model), config)
    elif to == "axolotl":
        theirs, config = axolotl_lora(copy.deepcopy(model), yaml.safe_load(text))
    else:
        scope = {"model": copy.deepcopy(model)}
        exec(text, scope)
        theirs = scope["model"]
        config = theirs.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (spec.r, spec.alpha, spec.dropout)
    assert _requires_grad(theirs) == _ours(model, "cogsym", "lora-layers")


@pytest.mark.parametrize("ends", ENDS, ids=["blocks", "head", "embeddings", "both"])
def test_the_trainer_snippet_trains_what_cogprobe_trains(ends):
    model = tiny_model("llama")
    scope = {"model": copy.deepcopy(model)}
    exec(export_layer_set(model, "cogsym", "trainer", **ends), scope)
    assert _requires_grad(scope["model"]) == _ours(model, "cogsym", **ends)


@pytest.mark.parametrize("to", ["peft", "axolotl", "llamafactory", "trainer"])
def test_what_a_lora_export_cannot_carry_is_refused_in_one_line(to):
    model = tiny_model("llama")
    with pytest.raises(CogprobeError) as e:
        export_layer_set(model, "4-5", to, lora=to != "peft", train_head=True)
    assert "\n" not in str(e.value) and ("LoRA" in str(e.value) or "freeze_extra_modules" in str(e.value))


# ---------------------------------------------------------------- merged model folders

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged")
    rows = [dict(es=f"la casa {i} es grande", nah=f"in calli {i} huei") for i in range(40)]
    pd.DataFrame(rows).to_csv(root / "pairs.csv", index=False)
    return dict(model=save_tiny(root / "llama", "llama"), corpus=root / "pairs.csv", root=root)


@pytest.mark.parametrize("strategy", ["layers", "lora", "lora-layers"])
def test_merged_export_loads_with_the_same_logits(inputs, strategy, tmp_path):
    from transformers import AutoModelForCausalLM
    run = tmp_path / "run"
    train(TrainConfig(model=inputs["model"], corpus=inputs["corpus"], out=run, strategy=strategy,
                      layers="1,4" if strategy != "lora" else None, steps=2, batch_size=2, seq_len=16,
                      lr=1e-2, warmup=0, save_steps="0,2", threads=1, progress=False, lora_dropout=0.0))
    out = export_merged(run, 2, tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and (out / "tokenizer.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ours, _ = Checkpoints.open(run).load(2)
    base, _ = Checkpoints.open(run).load(0)
    ids = tiny_tokenizer()("in calli huei", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got, ref = (m(input_ids=ids).logits for m in (ours, theirs, base))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, ref, atol=1e-4)   # the export is the trained checkpoint, not the base
