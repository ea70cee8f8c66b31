"""Activations read block by block from the weight files: capture and alignment of models that
do not fit in memory twice.

A capture runner maps a batch to its activations (`backends.Acts`: `blocks.{i}.{site}` -> [B, T, H]).
This one (`StreamedRunner`) holds no model: asked for a batch, it takes that batch and the ones
the capture will ask for next (its `plan`), as many as `state_bytes` holds, and runs them layer-major
through a `streamed.Skeleton`: block i is read from the files once for the whole group, run on every
batch's state, its outputs (and, with hooks on its submodules, its attention and MLP outputs) kept,
and dropped. Each block is read once per group, not once per batch.

The numbers are the torch backend's: each block is called with the arguments the decoder itself
passes it (`engine.record_call_args`), on the same batches, so the same tensors come out.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from cogprobe.models.blocks import Blocks, find_blocks
from cogprobe.probe.backends import Acts, output_tensor, site_child, site_name
from cogprobe.probe.engine import call_block, iter_weights, record_call_args
from cogprobe.probe.streamed import Skeleton

STATE_BYTES = 1 << 30   # default bound on the activations one group keeps


class Streaming:
    """A capture's way to stream checkpoints: the reference's weightless model, and the activations a
    group of batches may keep. `checkpoints` stands in for loading each model, `runner` for a backend."""

    def __init__(self, skeleton: Skeleton, state_bytes: int = STATE_BYTES, steps: Sequence[int] | None = None):
        self.skeleton, self.state_bytes, self.steps = skeleton, state_bytes, steps   # steps: None, every one
        self._weights: dict[int, object] = {}   # id(model holding only its ends) -> the weights it stands for

    def checkpoints(self, checkpoints, tokenizer) -> Iterator[tuple[int, object, object]]:
        """(step, a model holding only its ends, tokenizer), the reference first."""
        for step, weights in iter_weights(checkpoints, self.steps, self.skeleton.rename):
            ends = self.skeleton.ends(weights)
            self._weights[id(ends.model)] = weights
            yield step, ends.model, tokenizer

    def runner(self, model, *, layers: Sequence[int], sites: Sequence[str], plan: Sequence[dict]) -> "StreamedRunner":
        """The runner of the weights `model` stands for (one of `checkpoints`' models)."""
        return StreamedRunner(self.skeleton, self._weights[id(model)], find_blocks(model), layers=layers,
                              sites=sites, plan=plan, state_bytes=self.state_bytes)


class StreamedRunner:
    """`run(batch) -> Acts` for one model's weights, computed a group of batches at a time."""

    def __init__(self, skeleton: Skeleton, weights, ends: Blocks, *, layers: Sequence[int], sites: Sequence[str],
                 plan: Sequence[dict] = (), state_bytes: int = STATE_BYTES):
        self.skeleton, self.weights, self.ends = skeleton, weights, ends
        self.layers, self.sites = sorted(layers), tuple(sites)
        self.plan, self.state_bytes = list(plan), state_bytes
        self._ready: dict[int, Acts] = {}
        self.block_loads = 0

    def __call__(self, batch: dict) -> Acts:
        if id(batch) not in self._ready:
            self._compute(self._group_from(batch))
        return self._ready.pop(id(batch))

    def _group_from(self, batch: dict) -> list[dict]:
        """`batch` and the planned batches after it, while their activations fit `state_bytes`."""
        at = next((i for i, b in enumerate(self.plan) if b is batch), None)
        if at is None:
            return [batch]
        group, used = [], 0
        for b in self.plan[at:]:
            need = self._bytes(b)
            if group and used + need > self.state_bytes:
                break
            group.append(b)
            used += need
        return group

    def _bytes(self, batch: dict) -> int:
        hidden = self.skeleton.empty.config.get_text_config().hidden_size
        kept = len(self.layers) * len(self.sites) + 2   # the kept sites, the state in flight and its successor
        return batch["input_ids"].numel() * hidden * self.skeleton.dtype.itemsize * kept

    @torch.no_grad()
    def _compute(self, group: list[dict]) -> None:
        device = self.skeleton.device
        started = [record_call_args(self.ends, batch, device) for batch in group]
        states = [h for h, _ in started]
        acts: list[Acts] = [{} for _ in group]
        for i in range(self.layers[-1] + 1):
            block = self.skeleton.block(self.weights, i)
            self.block_loads += 1
            for j, (_, calls) in enumerate(started):
                with self._hooks(block, i, acts[j]):
                    states[j] = call_block(block, states[j], calls[i])
                if i in self.layers and "resid" in self.sites:
                    acts[j][site_name(i, "resid")] = states[j]
            del block
        for batch, got in zip(group, acts):
            self._ready[id(batch)] = {site_name(i, s): got[site_name(i, s)] for i in self.layers for s in self.sites}

    @contextlib.contextmanager
    def _hooks(self, block, i: int, into: Acts):
        """Keep the outputs of block i's attention and MLP, where asked for (`backends.site_child`)."""
        handles = []
        if i in self.layers:
            for site in self.sites:
                if site != "resid":
                    module = block.get_submodule(site_child(block, site))
                    handles.append(module.register_forward_hook(_keeper(into, site_name(i, site))))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _keeper(into: Acts, name: str):
    def hook(module, args, out):
        into[name] = output_tensor(out)
    return hook


def through_blocks(skeleton: Skeleton, weights, batches: Sequence[dict], visit, *,
                   state_bytes: int = STATE_BYTES) -> int:
    """Run `batches` layer-major through the model `weights` stand for: for each group of batches whose
    states fit `state_bytes`, every block i is read once and run on every batch of the group, and
    `visit(i, batch, block input, block output)` is called in batch order. So for each block the
    batches come in their given order, as a forward pass per batch with hooks sees them (the
    per-block rankings of `selection.rankings` sum in that order). Returns the blocks read."""
    ends, loads = skeleton.ends(weights), 0
    hidden = skeleton.empty.config.get_text_config().hidden_size
    for group in _fitting(batches, lambda b: b["input_ids"].numel() * hidden * skeleton.dtype.itemsize * 2,
                          state_bytes):   # a batch keeps two states in flight: a block's input and output
        loads += _through(skeleton, weights, ends, group, visit)
    return loads


@torch.no_grad()
def _through(skeleton: Skeleton, weights, ends: Blocks, group: list[dict], visit) -> int:
    started = [record_call_args(ends, b, skeleton.device) for b in group]
    states = [h for h, _ in started]
    for i in range(skeleton.n):
        block = skeleton.block(weights, i)
        for j, (batch, (_, calls)) in enumerate(zip(group, started)):
            out = call_block(block, states[j], calls[i])
            visit(i, batch, states[j], out)
            states[j] = out
        del block
    return skeleton.n


def _fitting(items: Sequence, size, budget: int):
    """Consecutive items whose sizes add up to at most `budget` (at least one item per group)."""
    group, used = [], 0
    for item in items:
        if group and used + size(item) > budget:
            yield group
            group, used = [], 0
        group.append(item)
        used += size(item)
    if group:
        yield group
