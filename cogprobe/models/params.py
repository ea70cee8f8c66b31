"""Parameters by name: which train, copying saved tensors in, and tied aliases.

What both sides of a checkpoint need: training (`train`, `export`) saves the
trainable tensors, reading (`checkpoints`) copies them back into a base model and
compares them with it. Kept apart from `strategies` so that reading a checkpoint
does not depend on how the run was trained.
"""
from __future__ import annotations

import torch
from torch import nn

from cogprobe.core.errors import CogprobeError


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (tied weights once, under their first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model).values())


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors (the non-LoRA checkpoint content)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable(model).items()}


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into `model` in place; every name must be a parameter of it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CogprobeError(f"{where} holds tensors the model does not have ({unknown[:3]}); "
                            "it was saved from a different architecture")
    with torch.no_grad():
        for name, value in tensors.items():
            p = params[name]
            if p.shape != value.shape:
                raise CogprobeError(f"{where}: tensor {name} has shape {tuple(value.shape)}, the model's "
                                    f"is {tuple(p.shape)}; it was saved from a different model")
            p.copy_(value.to(p.device, p.dtype))


def aliases(model: nn.Module) -> dict[str, set[str]]:
    """Every parameter name -> all names sharing its tensor (tied embeddings/head)."""
    by_tensor: dict[int, set[str]] = {}
    pairs = list(model.named_parameters(remove_duplicate=False))
    for name, p in pairs:
        by_tensor.setdefault(id(p), set()).add(name)
    return {name: by_tensor[id(p)] for name, p in pairs}
