"""Export: a layer set for the trainers people already use, and a checkpoint as a plain HF model.

A layer set (a selection.json, "cogsym", "0-3,26-29", ...) is only useful if the user's
own trainer can read it. Each format below is built from the model's real module and
parameter names, and checked against them, so an export never names a block that is
not there:
  - peft: `LoraConfig(**json)` keyword arguments (`target_modules` as a list, so that
    peft honours `layers_to_transform`);
  - axolotl: `unfrozen_parameters` (full-parameter) or `peft_layers_to_transform` (LoRA);
  - LLaMA-Factory: `freeze_trainable_layers`, which can only name the first or the last
    N blocks, so a two-ended set like CogSym is refused with the alternative;
  - trainer: `apply_layer_set` for HF Trainer / TRL, which freezes everything else.

`export_merged` writes a checkpoint of any strategy as a standard HF model folder.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cogprobe.core import io
from cogprobe.models.blocks import find_blocks
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import knob
from cogprobe.models.layersets import resolve, to_string
from cogprobe.models.loading import EMBEDDED
from cogprobe.models.params import trainable
from cogprobe.tuning.strategies import LoraSpec, apply, lora_kwargs

FORMATS = ("peft", "axolotl", "llamafactory", "trainer")


@dataclass(frozen=True)
class ExportOptions:
    """How a layer set is written for a trainer (`cogprobe export`, `export_layer_set`)."""
    to: str = knob("peft", "format of the layer set", choices=FORMATS)
    model: str = knob(EMBEDDED, "the model the set is for (its real module names)")
    lora: bool = knob(False, "axolotl: a LoRA config instead of unfrozen_parameters")
    train_embeddings: bool = knob(False, "axolotl: also unfreeze the input embeddings")
    train_head: bool = knob(False, "axolotl: also unfreeze the final norm and LM head")


def layer_set(model: nn.Module, selection) -> list[int]:
    """Any layer-set spelling (or a Selection) resolved against this model's blocks."""
    layers = getattr(selection, "layers", selection)
    return resolve(layers if isinstance(layers, (list, tuple)) else str(layers), find_blocks(model).n)


def apply_layer_set(model: nn.Module, selection, *, train_embeddings: bool = False,
                    train_head: bool = False) -> list[str]:
    """Freeze everything but the set's blocks (and embeddings / final norm + head if asked);
    returns the names of the parameters that stay trainable. For HF Trainer / TRL, which
    optimise exactly the parameters with requires_grad."""
    apply(model, "layers", layer_set(model, selection), train_embeddings=train_embeddings,
          train_head=train_head)
    return sorted(trainable(model))


def peft_config(model: nn.Module, selection, lora: LoraSpec = LoraSpec()) -> dict:
    """JSON-ready `LoraConfig` keyword arguments that wrap exactly the set's blocks."""
    return lora_kwargs(find_blocks(model), layer_set(model, selection), lora)


def axolotl_patterns(model: nn.Module, layers: list[int], *, train_embeddings: bool = False,
                     train_head: bool = False) -> list[str]:
    """`unfrozen_parameters` entries, one per block (plus embeddings / head when asked)."""
    blocks = find_blocks(model)
    patterns = [blocks.block_prefix(i) for i in layers]
    extra = (blocks.input_end_names() if train_embeddings else []) + (blocks.output_end_names() if train_head else [])
    return patterns + [f"{name}$" for name in extra]


def axolotl_matches(pattern: str, name: str) -> bool:
    """axolotl's rule: periods are literal, the pattern matches from the start of the name."""
    return re.match(pattern.replace(".", r"\."), name) is not None


def axolotl_yaml(model: nn.Module, selection, *, lora: bool = False, train_embeddings: bool = False,
                 train_head: bool = False) -> str:
    """An axolotl config snippet for the set, checked against the model's parameter names."""
    layers = layer_set(model, selection)
    head = f"# cogprobe layer set {to_string(layers)} of {find_blocks(model).n} blocks ({type(model).__name__})\n"
    if lora:
        kw = lora_kwargs(find_blocks(model), layers)
        return head + _yaml(dict(adapter="lora", lora_target_modules=kw["target_modules"],
                                 peft_layers_to_transform=layers))
    blocks = find_blocks(model)
    patterns = axolotl_patterns(model, layers, train_embeddings=train_embeddings, train_head=train_head)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    want = {n for n in names if blocks.block_of(n) in set(layers)}
    want |= set(blocks.input_end_names() if train_embeddings else []) | set(
        blocks.output_end_names() if train_head else [])
    got = {n for n in names if any(axolotl_matches(p, n) for p in patterns)}
    if got != want:  # a bug here, not a user error: the patterns must name exactly the set
        raise AssertionError(f"axolotl patterns match {sorted(got ^ want)[:3]} wrongly")
    return head + _yaml(dict(unfrozen_parameters=patterns))


def llamafactory_yaml(model: nn.Module, selection) -> str:
    """LLaMA-Factory's freeze options; it counts trainable blocks from one end only
    (positive: the last N, negative: the first N)."""
    layers, n = layer_set(model, selection), find_blocks(model).n
    k = len(layers)
    if layers == list(range(n - k, n)):
        count = k
    elif layers == list(range(k)):
        count = -k
    else:
        raise CogprobeError(f"LLaMA-Factory's freeze_trainable_layers names only the first or the last N blocks, "
                            f"and blocks {to_string(layers)} are not one end of {n}; export --to axolotl or peft, "
                            "or call cogprobe.apply_layer_set(model, ...) before its trainer")
    return (f"# cogprobe layer set {to_string(layers)} of {n} blocks\n"
            + _yaml(dict(finetuning_type="freeze", freeze_trainable_layers=count, freeze_trainable_modules="all")))


def trainer_snippet(model: nn.Module, selection) -> str:
    """Python for HF Trainer / TRL users: the set applied before `Trainer(model=model, ...)`."""
    layers = to_string(layer_set(model, selection))
    return ("import cogprobe\n"
            f"trainable = cogprobe.apply_layer_set(model, {layers!r})  # freezes every other parameter\n"
            "# then Trainer(model=model, ...) / SFTTrainer(model=model, ...) as usual\n")


def export_layer_set(model: nn.Module, selection, to: str, *, lora: bool = False,
                     train_embeddings: bool = False, train_head: bool = False) -> str:
    """The set in format `to` (one of FORMATS), as the text to save or print."""
    if to == "peft":
        return json.dumps(peft_config(model, selection), indent=2) + "\n"
    if to == "axolotl":
        return axolotl_yaml(model, selection, lora=lora, train_embeddings=train_embeddings, train_head=train_head)
    if to == "llamafactory":
        return llamafactory_yaml(model, selection)
    if to == "trainer":
        return trainer_snippet(model, selection)
    raise CogprobeError(f"unknown export format {to!r}; use one of {', '.join(FORMATS)}")


def _yaml(obj: dict) -> str:
    import yaml
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def export_merged(run, step: int, out, *, base=None) -> Path:
    """Checkpoint `step` of `run` (any strategy; LoRA merged) as an HF model folder: safetensors,
    config and tokenizer, written atomically, loadable by `AutoModelForCausalLM.from_pretrained`."""
    model, tok = Checkpoints.open(run, base=base).load(step)
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)
