"""What trains: the four strategies, as freezing or as peft LoRA adapters.

  full         every parameter (embeddings and head included);
  layers       the listed blocks only; embeddings / final norm + head only when
               `train_embeddings` / `train_head` say so;
  lora         LoRA adapters on every block;
  lora-layers  LoRA adapters on the listed blocks only.

LoRA targets default to every linear module inside the blocks (nn.Linear, and
GPT-2's Conv1D), found by walking the model rather than named per family. The
block filter uses peft's `layers_to_transform` with `target_modules` as a *list*:
given a string, peft treats it as a regex and silently ignores the indices.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from cogprobe.models.blocks import Blocks, find_blocks
from cogprobe.core.errors import CogprobeError

STRATEGIES = ("full", "layers", "lora", "lora-layers")
LAYERED = ("layers", "lora-layers")
LORA = ("lora", "lora-layers")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None  # module names; None: every linear in the blocks


def linear_names(blocks: Blocks) -> list[str]:
    """Last-name of every linear module inside the blocks, e.g. q_proj ... down_proj, or c_attn."""
    from transformers.pytorch_utils import Conv1D
    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks.modules.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D))})


def apply(model: nn.Module, strategy: str, layers: list[int] | None, *, lora: LoraSpec = LoraSpec(),
          train_embeddings: bool = False, train_head: bool = False) -> nn.Module:
    """Set what trains; returns the model to train (a PeftModel for the LoRA strategies)."""
    if strategy not in STRATEGIES:
        raise CogprobeError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    blocks = find_blocks(model)
    if strategy == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if strategy == "layers":
        return _freeze_except(model, blocks, layers or [], train_embeddings, train_head)
    indices = list(range(blocks.n)) if strategy == "lora" else list(layers or [])
    return _lora(model, blocks, indices, lora)


def _freeze_except(model, blocks: Blocks, layers: list[int], embeddings: bool, head: bool):
    keep = set(layers)
    for name, p in model.named_parameters():
        p.requires_grad_(blocks.block_of(name) in keep)
    extra = (blocks.input_end_names() if embeddings else []) + (blocks.output_end_names() if head else [])
    for name in extra:
        model.get_parameter(name).requires_grad_(True)
    head_w = blocks.head.weight
    tied = any(head_w is model.get_parameter(n) for n in blocks.input_end_names())
    if tied and embeddings != head:
        warnings.warn("the LM head shares its weight with the input embedding (tied embeddings), so "
                      "training one trains both", stacklevel=3)
    return model


def lora_kwargs(blocks: Blocks, indices: list[int], spec: LoraSpec = LoraSpec()) -> dict:
    """`LoraConfig` keyword arguments (JSON-ready) that put adapters on exactly the blocks `indices`."""
    found = linear_names(blocks)
    targets = list(spec.targets) if spec.targets else found
    missing = sorted(set(targets) - set(found))
    if missing:
        raise CogprobeError(f"LoRA targets {missing} are not linear modules of the blocks; "
                            f"choose from {', '.join(found)}")
    return dict(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                layers_to_transform=list(indices), layers_pattern=blocks.layers_path.rsplit(".", 1)[-1],
                fan_in_fan_out=_conv1d(blocks), bias="none")


def _lora(model, blocks: Blocks, indices: list[int], spec: LoraSpec):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(**lora_kwargs(blocks, indices, spec))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft vs transformers 5
        return get_peft_model(model, config)


def _conv1d(blocks: Blocks) -> bool:
    from transformers.pytorch_utils import Conv1D
    return any(isinstance(m, Conv1D) for m in blocks.modules.modules())
