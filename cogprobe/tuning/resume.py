"""The resume state of a training run: its optimizer, saved with the latest checkpoint.

`checkpoints/step-N/resume/` holds
  optimizer.safetensors  the optimizer's state tensors, named "<param index>.<key>"
  state.json             the rest of its state_dict (param groups, plain values), the
                         trainable parameters' names (a resume with other trainable
                         parameters is refused), the step and the tokens seen so far.
It is written inside the checkpoint's atomic step, so meta.json records its checksums;
it is kept on the latest checkpoint only and dropped when the run finishes. Stored as
safetensors + JSON, never pickled: `torch.load` of an untrusted file can run code.

This module owns the format (names, writing, reading, dropping); it imports nothing
from `checkpoints`, which calls it, and `train` and `runfolder`, which use it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError

DIR = "resume"
OPTIMIZER = f"{DIR}/optimizer.safetensors"
STATE = f"{DIR}/state.json"
FILES = (OPTIMIZER, STATE)

State = tuple[dict[str, torch.Tensor], dict]  # (optimizer tensors, state.json)


def torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (or `optimizer` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def capture(optimizer, names: list[str], *, step: int, tokens_seen: int) -> State:
    """The resume state of `optimizer` after `step`: tensors as CPU copies, the rest JSON-able."""
    sd = torch_optimizer(optimizer).state_dict()
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                plain.setdefault(str(idx), {})[key] = value
    info = dict(param_groups=sd["param_groups"], plain_state=plain, param_names=list(names))
    return tensors, dict(io.jsonable(info), step=step, tokens_seen=tokens_seen)


def write(folder: Path, state: State) -> None:
    """Write `state` into checkpoint folder `folder` (while it is still being built)."""
    (folder / DIR).mkdir()
    save_file(state[0], str(folder / OPTIMIZER))
    io.write_json(folder / STATE, state[1])


def present(folder: Path) -> bool:
    """Whether checkpoint folder `folder` holds a resume state (its `resume/` folder)."""
    return (folder / DIR).is_dir()


def read(folder: Path, recorded: dict[str, str]) -> State | None:
    """The resume state of checkpoint folder `folder`, checked against the checksums its meta.json
    `recorded`; None if it has none."""
    if not ((folder / STATE).is_file() and (folder / OPTIMIZER).is_file()):
        return None
    return io.read_tensors(folder / OPTIMIZER, recorded.get(OPTIMIZER)), io.read_json(folder / STATE)


def restore(optimizer, folder: Path, names: list[str], recorded: dict[str, str]) -> dict:
    """Restore `optimizer` from checkpoint folder `folder`; returns its state.json."""
    saved = read(folder, recorded)
    if saved is None:
        raise CogprobeError(f"{folder} has no resume state; resume from a checkpoint saved by this version")
    tensors, info = saved
    if info["param_names"] != list(names):
        raise CogprobeError(f"the resume state in {folder} is for other trainable parameters; "
                            "resume with the run's own config, or pass --overwrite")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, rest in info["plain_state"].items():
        state.setdefault(int(idx), {}).update(rest)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in info["param_groups"]]
    torch_optimizer(optimizer).load_state_dict({"state": state, "param_groups": groups})
    return info


def drop(checkpoints: Iterable[tuple[int, Path]], keep: int | None) -> None:
    """Remove the resume state of every (step, folder) but step `keep` (renamed first, then deleted,
    so no checkpoint is ever left with half of one)."""
    for step, folder in checkpoints:
        if step != keep and (folder / DIR).exists():
            gone = folder / ".old-resume"
            shutil.rmtree(gone, ignore_errors=True)
            (folder / DIR).rename(gone)
            shutil.rmtree(gone, ignore_errors=True)
