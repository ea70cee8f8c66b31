"""Export: a layer set for the trainers people already use, and a checkpoint as a plain HF model.

A layer set (a selection.json, "cogsym", "0-3,26-29", ...) is only useful if the user's
own trainer can read it. Each format below is built from the model's real module and
parameter names, and checked against them, so an export never names a block that is
not there:
  - peft: `LoraConfig(**json)` keyword arguments (`target_modules` as a list, so that
    peft honours `layers_to_transform`);
  - axolotl: `unfrozen_parameters` (full-parameter) or `peft_layers_to_transform` (LoRA,
    with lora_r / lora_alpha / lora_dropout);
  - LLaMA-Factory: `freeze_trainable_layers`, which can only name the first or the last
    N blocks, so a two-ended set like CogSym is refused with the alternative (and
    `freeze_extra_modules` for the embeddings; the head is refused, see llamafactory_yaml);
  - trainer: `apply_layer_set` (or, with lora, `get_peft_model`) for HF Trainer / TRL.
A tied weight (SmolLM2's LM head is its input embedding) is listed by `named_parameters()`,
which these tools iterate, only under its first name: it is exported under that name, and
each export is checked with the tool's own matching rule over the names it iterates.
LoRA runs train no embeddings or head (cogprobe's own LoRA strategies do not), so asking
for them with a LoRA export is refused rather than dropped.

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
from cogprobe.models.params import aliases, trainable
from cogprobe.tuning.strategies import LoraSpec, apply, lora_kwargs

FORMATS = ("peft", "axolotl", "llamafactory", "trainer")


@dataclass(frozen=True)
class ExportOptions:
    """How a layer set is written for a trainer (`cogprobe export`, `export_layer_set`)."""
    to: str = knob("peft", "format of the layer set", choices=FORMATS)
    model: str = knob(EMBEDDED, "the model the set is for (its real module names)")
    lora: bool = knob(False, "axolotl, trainer: a LoRA config instead of unfrozen_parameters")
    train_embeddings: bool = knob(False, "axolotl, llamafactory, trainer: also unfreeze the input embeddings")
    train_head: bool = knob(False, "axolotl, trainer: also unfreeze the final norm and LM head")


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


def trained_names(model: nn.Module, layers: list[int], *, train_embeddings: bool = False,
                  train_head: bool = False) -> set[str]:
    """What cogprobe's `layers` strategy trains, as the names `model.named_parameters()` lists (a tied
    tensor once, under its first name): the names a trainer iterating the model sees."""
    blocks, keep = find_blocks(model), set(layers)
    extra = (blocks.input_end_names() if train_embeddings else []) + (blocks.output_end_names() if train_head else [])
    wanted = {id(model.get_parameter(name)) for name in extra}
    return {n for n, p in model.named_parameters() if blocks.block_of(n) in keep or id(p) in wanted}


def axolotl_patterns(model: nn.Module, layers: list[int], *, train_embeddings: bool = False,
                     train_head: bool = False) -> list[str]:
    """`unfrozen_parameters` entries, one per block (plus embeddings / head when asked, under the
    names axolotl will see: a head tied to the embedding is `...embed_tokens.weight`)."""
    blocks = find_blocks(model)
    patterns = [blocks.block_prefix(i) for i in layers]
    outside = trained_names(model, [], train_embeddings=train_embeddings, train_head=train_head)
    return patterns + [f"{name}$" for name, _ in model.named_parameters() if name in outside]


def axolotl_matches(pattern: str, name: str) -> bool:
    """axolotl's rule (utils/freeze.py, LayerNamePattern): a period not followed by `+` is literal,
    and the pattern matches from the start of the name (re.match)."""
    return re.match(re.sub(r"\.(?!\+)", r"\\.", pattern), name) is not None


def _refuse_lora_ends(tool: str, train_embeddings: bool, train_head: bool) -> None:
    if train_embeddings or train_head:
        raise CogprobeError(f"a LoRA export for {tool} cannot also train the embeddings or the head (cogprobe's "
                            "LoRA runs do not either); drop --train-embeddings/--train-head, or export without "
                            "--lora (--to axolotl or trainer) to train them with the blocks")


def axolotl_yaml(model: nn.Module, selection, *, lora: bool = False, train_embeddings: bool = False,
                 train_head: bool = False) -> str:
    """An axolotl config snippet for the set, checked with axolotl's own matching rule over the
    names it iterates (`model.named_parameters()`)."""
    layers = layer_set(model, selection)
    head = f"# cogprobe layer set {to_string(layers)} of {find_blocks(model).n} blocks ({type(model).__name__})\n"
    if lora:
        _refuse_lora_ends("axolotl", train_embeddings, train_head)
        kw = lora_kwargs(find_blocks(model), layers)
        return head + _yaml(dict(adapter="lora", lora_r=kw["r"], lora_alpha=kw["lora_alpha"],
                                 lora_dropout=kw["lora_dropout"], lora_target_modules=kw["target_modules"],
                                 peft_layers_to_transform=layers, peft_layers_pattern=kw["layers_pattern"],
                                 lora_fan_in_fan_out=kw["fan_in_fan_out"]))
    patterns = axolotl_patterns(model, layers, train_embeddings=train_embeddings, train_head=train_head)
    want = trained_names(model, layers, train_embeddings=train_embeddings, train_head=train_head)
    got = {n for n, _ in model.named_parameters() if any(axolotl_matches(p, n) for p in patterns)}
    if got != want:
        raise CogprobeError(f"axolotl's unfrozen_parameters cannot name exactly this set on {type(model).__name__} "
                            f"(it would differ in {sorted(got ^ want)[:3]}); export --to trainer or peft")
    names = aliases(model)
    tied = "".join(f"# {n} is also {', '.join(sorted(names[n] - {n}))} (tied: one tensor)\n"
                   for n in sorted(want) if len(names[n]) > 1)
    return head + tied + _yaml(dict(unfrozen_parameters=patterns))


def llamafactory_yaml(model: nn.Module, selection, *, lora: bool = False, train_embeddings: bool = False,
                      train_head: bool = False) -> str:
    """LLaMA-Factory's freeze options; it counts trainable blocks from one end only (positive: the last N,
    negative: the first N), and unfreezes `freeze_extra_modules` wherever their name occurs in a parameter
    name, so the result is checked with that rule (`norm` would also unfreeze every block's norms)."""
    layers, n = layer_set(model, selection), find_blocks(model).n
    if lora:
        raise CogprobeError("LLaMA-Factory's LoRA (lora_target) names modules, not blocks, so it cannot be held to a "
                            "layer set; export --to axolotl --lora or --to peft")
    k = len(layers)
    if layers == list(range(n - k, n)):
        count = k
    elif layers == list(range(k)):
        count = -k
    else:
        raise CogprobeError(f"LLaMA-Factory's freeze_trainable_layers names only the first or the last N blocks, "
                            f"and blocks {to_string(layers)} are not one end of {n}; export --to axolotl or peft, "
                            "or call cogprobe.apply_layer_set(model, ...) before its trainer")
    options = dict(finetuning_type="freeze", freeze_trainable_layers=count, freeze_trainable_modules="all")
    outside = sorted(trained_names(model, [], train_embeddings=train_embeddings, train_head=train_head))
    if outside:
        options["freeze_extra_modules"] = ",".join(dict.fromkeys(name.split(".")[-2] for name in outside))
        extra = options["freeze_extra_modules"].split(",")
        got = {name for name, _ in model.named_parameters()
               if any(f".{i}." in name for i in layers) or any(m in name for m in extra)}
        want = trained_names(model, layers, train_embeddings=train_embeddings, train_head=train_head)
        if got != want:
            raise CogprobeError(f"LLaMA-Factory's freeze_extra_modules {extra} would also unfreeze "
                                f"{sorted(got - want)[:2]} (it matches module names anywhere in a parameter name); "
                                "export --to axolotl or trainer to train the embeddings or the head")
    return f"# cogprobe layer set {to_string(layers)} of {n} blocks\n" + _yaml(options)


def trainer_snippet(model: nn.Module, selection, *, lora: bool = False, train_embeddings: bool = False,
                    train_head: bool = False) -> str:
    """Python for HF Trainer / TRL users: the set applied before `Trainer(model=model, ...)`; with lora,
    a peft LoraConfig carrying cogprobe's rank, alpha and dropout."""
    layers = layer_set(model, selection)
    if lora:
        _refuse_lora_ends("HF Trainer", train_embeddings, train_head)
        return ("from peft import LoraConfig, get_peft_model\n"
                f"model = get_peft_model(model, LoraConfig(**{peft_config(model, layers)!r}))\n"
                "# then Trainer(model=model, ...) / SFTTrainer(model=model, ...) as usual\n")
    ends = "".join(f", {flag}=True" for flag, on in (("train_embeddings", train_embeddings),
                                                     ("train_head", train_head)) if on)
    return ("import cogprobe\n"
            f"trainable = cogprobe.apply_layer_set(model, {to_string(layers)!r}{ends})  # freezes every other parameter\n"
            "# then Trainer(model=model, ...) / SFTTrainer(model=model, ...) as usual\n")


def export_layer_set(model: nn.Module, selection, to: str, *, lora: bool = False,
                     train_embeddings: bool = False, train_head: bool = False) -> str:
    """The set in format `to` (one of FORMATS), as the text to save or print."""
    ends = dict(train_embeddings=train_embeddings, train_head=train_head)
    if to == "peft":
        _refuse_lora_ends("peft", **ends)
        return json.dumps(peft_config(model, selection), indent=2) + "\n"
    if to == "axolotl":
        return axolotl_yaml(model, selection, lora=lora, **ends)
    if to == "llamafactory":
        return llamafactory_yaml(model, selection, lora=lora, **ends)
    if to == "trainer":
        return trainer_snippet(model, selection, lora=lora, **ends)
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
