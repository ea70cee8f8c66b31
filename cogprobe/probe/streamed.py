"""The streamed engine: exact sweeps whose memory does not grow with the model's depth.

A sweep evaluates blocks in sequence, and each configuration needs one block's weights at a time.
This engine advances every configuration of a group of batches one block at a time (layer-major):
block i of the reference and of the checkpoint are read from their files when its turn comes
(`models.weights`), run on every distinct state in flight, and dropped. The model itself is a
skeleton on the meta device (accelerate's `init_empty_weights`); only its ends (embeddings, final
norm, head) hold weights. Peak memory is about two blocks, each model's ends and the states in
flight, whatever the depth; each block of each model is read once per checkpoint per group.

It gives the in-memory engine's (`sweep.FastEngine`) numbers bit for bit: the same tensors make
the same blocks, called with the arguments the decoder passes them (`record_call_args`) on the same
batches (`batches`), and configurations that share a prefix share its state as there (a block the
checkpoint did not change counts as the reference's). Only the order of the work differs, and
nothing is cached across checkpoints.
"""
from __future__ import annotations

import copy
import threading
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cogprobe.core.errors import CogprobeError
from cogprobe.core.memory import HOST
from cogprobe.data.tasks import BATCH_SIZE, Example, nll_per_example, scored_positions
from cogprobe.models.blocks import Blocks, find_blocks
from cogprobe.probe.engine import Ablation, Counter, batches, call_block, record_call_args

_BUILDING = threading.Lock()   # init_empty_weights patches torch globally: one skeleton at a time
STATE_BYTES = 1 << 30   # default bound on the states in flight per group of batches


class Skeleton:
    """A model's modules without weights; its ends and blocks get weights from a source on demand."""

    def __init__(self, config, *, dtype: torch.dtype = torch.float32, device=HOST):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        with _BUILDING:
            with init_empty_weights():   # parameters on the meta device; buffers (rotary tables) real
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            model.tie_weights()   # (inside the context it would not tie)
        self.empty = model.eval()
        self.blocks = find_blocks(model)
        self.dtype, self.device = dtype, torch.device(device)
        self._renamings, self._converters, self._names = _conversions(model)

    def rename(self, key: str) -> str:
        """The model's name for a key in its weight files, as `from_pretrained` renames it (GPT-NeoX's
        `embed_out` is `lm_head`); a key that transformers would merge with others is refused."""
        if not self._renamings and not self._converters:
            return key
        from transformers.core_model_loading import rename_source_key
        name, merged = rename_source_key(key, self._renamings, self._converters,
                                         self.empty.base_model_prefix, self._names)
        if merged is not None:
            raise CogprobeError(f"the weight files store {key} in a layout transformers converts when it loads "
                                f"({merged}); the streamed engine reads tensors as stored: use --engine memory")
        return name

    @property
    def n(self) -> int:
        return self.blocks.n

    def ends(self, weights) -> Blocks:
        """A copy whose embeddings, final norm and head hold `weights`' tensors (its blocks stay empty)."""
        model = copy.deepcopy(self.empty)
        blocks = find_blocks(model)
        self._fill(model, weights, "", skip=lambda name: blocks.block_of(name) is not None)
        return blocks

    def block(self, weights, i: int) -> nn.Module:
        """Block i with `weights`' tensors."""
        module = copy.deepcopy(self.blocks.modules[i])
        self._fill(module, weights, self.blocks.block_prefix(i))
        return module

    def end_names(self) -> list[str]:
        return [n for n, _ in self.empty.named_parameters() if self.blocks.block_of(n) is None]

    def block_names(self, i: int) -> list[str]:
        return [self.blocks.block_prefix(i) + n for n, _ in self.blocks.modules[i].named_parameters()]

    def _fill(self, module: nn.Module, weights, prefix: str, skip=lambda name: False) -> None:
        """Give each meta parameter of `module` its tensor; tied names share one tensor, read from the
        name the source itself changes if any (a trained tied embedding is saved under one name)."""
        tied: dict[int, list[str]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if not skip(name):
                tied.setdefault(id(p), []).append(name)
        for names in tied.values():
            full = [prefix + n for n in names]
            own = [f for f in full if weights.has(f) and weights.may_differ(f)]
            source = (own or [f for f in full if weights.has(f)] or full)[0]
            tensor = weights.read(source)
            want = module.get_parameter(names[0]).shape
            if tensor.shape != want:
                raise CogprobeError(f"{source} has shape {tuple(tensor.shape)} in {getattr(weights, 'folder', 'the checkpoint')}, the reference's "
                                    f"config gives {tuple(want)}: these weights are not of the reference's "
                                    "architecture; sweep checkpoints of the same model (or pass its --base)")
            param = nn.Parameter(tensor.to(self.device, self.dtype), requires_grad=False)
            for n in names:
                owner, _, leaf = n.rpartition(".")
                setattr(module.get_submodule(owner) if owner else module, leaf, param)
        for name, buf in list(module.named_buffers()):
            if buf.device != self.device:
                owner, _, leaf = name.rpartition(".")
                (module.get_submodule(owner) if owner else module).register_buffer(leaf, buf.to(self.device))


class StreamedEngine:
    """Layer-major exact evaluation of many configurations of one checkpoint against a reference,
    reading every block from the files when its turn comes."""

    def __init__(self, skeleton: Skeleton, reference, *, state_bytes: int = STATE_BYTES):
        self.skeleton, self.reference = skeleton, reference
        self.counter = Counter()
        self.state_bytes = state_bytes
        self._ref_ends: Blocks | None = None

    @torch.no_grad()
    def evaluate(self, weights, configs: Sequence[Ablation], examples: dict[str, list[Example]],
                 *, batch_size: int = BATCH_SIZE, on_batch=None) -> dict[tuple[str, Ablation], tuple]:
        """{(task, config): (nll sums, token counts)} as `FastEngine.evaluate` returns them."""
        configs = list(dict.fromkeys(configs))
        totals = {(task, c): (np.zeros(len(exs)), np.zeros(len(exs), dtype=np.int64))
                  for task, exs in examples.items() for c in configs}
        units = [(task, idx, batch) for task, exs in examples.items() for idx, batch in batches(exs, batch_size)]
        ends_r = self._reference_ends()
        ends_c = ends_r if weights is self.reference or not self._differs(weights, self.skeleton.end_names()) \
            else self.skeleton.ends(weights)
        for group in self._groups(units, len(configs)):
            self._group(weights, configs, group, ends_r, ends_c, totals)
            for _ in group if on_batch is not None else ():
                on_batch()
        return totals

    def _reference_ends(self) -> Blocks:
        if self._ref_ends is None:
            self._ref_ends = self.skeleton.ends(self.reference)
        return self._ref_ends

    def _differs(self, weights, names: list[str]) -> bool:
        return weights is not self.reference and any(weights.may_differ(n) for n in names)

    def _groups(self, units: list, n_configs: int):
        """Consecutive units whose states in flight (two depths of every configuration) fit `state_bytes`."""
        hidden, size = self.skeleton.empty.config.get_text_config().hidden_size, self.skeleton.dtype.itemsize
        group, used = [], 0
        for unit in units:
            need = unit[2]["input_ids"].numel() * hidden * size * 2 * (n_configs + 1)
            if group and used + need > self.state_bytes:
                yield group
                group, used = [], 0
            group.append(unit)
            used += need
        if group:
            yield group

    def _group(self, weights, configs, group, ends_r: Blocks, ends_c: Blocks, totals) -> None:
        device = self.skeleton.device
        embed_changed = ends_c is not ends_r and _tensors_differ(ends_r, ends_c, ends_r.input_end_names())
        roots, calls = [], []
        for _, _, batch in group:
            h_r, call = record_call_args(ends_r, batch, device)
            roots.append({("r",): h_r, ("c",): record_call_args(ends_c, batch, device)[0] if embed_changed else h_r})
            calls.append(call)
        node = {c: ("r" if c.embed == "r" or not embed_changed else "c",) for c in configs}
        states = [{key: r[key] for key in set(node.values())} for r in roots]
        for i in range(self.skeleton.n):
            node, states = self._advance(i, weights, configs, node, states, calls)
        self._score(configs, group, node, states, ends_r, ends_c, totals)

    def _advance(self, i: int, weights, configs, node: dict, states: list, calls: list):
        """Every distinct state one block further: block i from the reference or the checkpoint."""
        wanted = {c.sources[i] for c in configs}
        differs = "c" in wanted and self._differs(weights, self.skeleton.block_names(i))
        ref = self.skeleton.block(self.reference, i) if "r" in wanted or ("c" in wanted and not differs) else None
        own = self.skeleton.block(weights, i) if differs else None
        self.counter.block_loads += (ref is not None) + (own is not None)
        if own is not None and ref is not None and _modules_equal(own, ref):
            own = None   # unchanged after all: the reference's block, so their states are shared
        children: dict[tuple, tuple[tuple, str]] = {}
        for c in configs:
            src = c.sources[i]
            src = "r" if src == "c" and own is None else src   # a block the checkpoint did not change
            key = node[c] + (src,)
            children[key] = (node[c], src)
            node[c] = key
        out = []
        for per_unit, call in zip(states, calls):
            step = {}
            for key, (parent, src) in children.items():
                h = per_unit[parent]
                if src != "s":
                    h = call_block(ref if src == "r" else own, h, call[i])
                    self.counter.block_evals += 1
                step[key] = h
            out.append(step)
        return node, out

    def _score(self, configs, group, node, states, ends_r, ends_c, totals) -> None:
        for (task, idx, batch), per_unit in zip(group, states):
            pred_mask, targets = scored_positions(batch)
            pred_mask = pred_mask.to(self.skeleton.device)
            scored: dict[tuple, tuple] = {}
            for c in configs:
                if (task, c) not in totals:
                    continue
                at = (node[c], c.head)
                if at not in scored:
                    ends = ends_r if c.head == "r" else ends_c
                    scored[at] = nll_per_example(ends.decode(per_unit[node[c]][pred_mask]), targets, pred_mask)
                sums, counts = totals[(task, c)]
                sums[idx], counts[idx] = scored[at]


def _conversions(model) -> tuple[list, list, dict]:
    """transformers' key renamings and converters for `model`'s checkpoints (none before 5.0)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return [], [], {}
    transforms = get_model_conversion_mapping(model)
    names = dict(model.named_parameters(remove_duplicate=False))
    return ([t for t in transforms if not isinstance(t, WeightConverter)],
            [t for t in transforms if isinstance(t, WeightConverter)], names)


def _modules_equal(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None:
        return False
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)


def _tensors_differ(a: Blocks, b: Blocks, names: list[str]) -> bool:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    return any(not torch.equal(pa[n], pb[n]) for n in names)
