"""What every sweep engine shares: a configuration (`Ablation`), the cost counter, the batching of
examples, and the walk over checkpoints with the reference first. Kept apart from `sweep` so that
the engines built on it (`taylor`) import it without importing the sweep."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import Example, collate
from cogprobe.models.blocks import Blocks, SkipBlock, swapped


@dataclass(frozen=True)
class Ablation:
    """Which weights run each block, the embeddings and the head; plus its labels."""
    sources: tuple[str, ...]   # per block: "c", "r" or "s"
    embed: str = "c"           # "c" or "r"
    head: str = "c"            # "c" or "r" (final norm + LM head)
    labels: dict = field(default_factory=dict, compare=False, hash=False)

    def ablated(self) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s != "c"]


CACHE_BYTES = 2 << 30   # what the in-memory engine may keep of reference states across checkpoints


@dataclass
class Counter:
    """Block evaluations performed, summed over batches (the benchmark's cost measure)."""
    block_evals: int = 0
    backward_passes: int = 0   # the taylor engine's (one per example)
    block_loads: int = 0       # blocks read from files (the streamed engine's)


def batches(examples: Sequence[Example], batch_size: int):
    """(example indices, collated batch), longest first: batches of similar lengths waste less on padding."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate([examples[i] for i in idx], pad_id=0)


def n_batches(examples: dict[str, list[Example]], batch_size: int) -> int:
    """(task, batch) units one checkpoint's evaluation goes through: a progress bar's total."""
    return sum(-(-len(exs) // batch_size) for exs in examples.values())


def largest_batch(examples: dict[str, list[Example]], batch_size: int) -> int:
    """Tokens in the largest batch (longest examples first): the states one batch keeps in flight."""
    longest = max((len(e.input_ids) for exs in examples.values() for e in exs), default=0)
    return longest * batch_size


def iter_checkpoints(checkpoints, steps):
    """(step, model) pairs, the reference first, loading one checkpoint at a time."""
    if hasattr(checkpoints, "load"):
        wanted = list(checkpoints.steps) if steps is None else [s for s in checkpoints.steps if s in set(steps)]
        ref = checkpoints.reference_step
        if not checkpoints.steps:
            raise CogprobeError("this run has no checkpoints; train with --save-steps first")
        yield ref, checkpoints.load(ref)[0]
        for s in wanted:
            if s != ref:
                yield s, checkpoints.load(s)[0]
        return
    pairs = list(checkpoints)
    if not pairs:
        raise CogprobeError("no checkpoints given; pass [(step, model), ...] with the reference first")
    for s, m in pairs:
        if steps is None or s in set(steps) or s == pairs[0][0]:
            yield s, m


def iter_weights(checkpoints, steps, rename=None):
    """(step, weights read lazily from the files), the reference first: `iter_checkpoints` for the
    streamed engine, which never loads a model. `rename`: see `models.weights.FolderWeights`."""
    if not checkpoints.steps:
        raise CogprobeError("this run has no checkpoints; train with --save-steps first")
    ref = checkpoints.reference_step
    yield ref, checkpoints.reference_weights(rename)
    for s in checkpoints.steps:
        if s != ref and (steps is None or s in set(steps)):
            yield s, checkpoints.weights(s, rename)


# --- calling blocks one at a time, with the decoder's own arguments ---------------------------


class _Recorder(SkipBlock):
    """Stand-in block that records what the decoder passes to it: (hidden_states, args, kwargs)."""

    def __init__(self, original, log: list):
        super().__init__(original)
        self.log = log

    def forward(self, hidden_states, *args, **kwargs):
        self.log.append((hidden_states, args, kwargs))
        return hidden_states


def record_call_args(blocks: Blocks, batch: dict, device) -> tuple[torch.Tensor, list]:
    """One cheap decoder pass with recorders for blocks: (embedding output, per-block call args)."""
    log: list = []
    with swapped(blocks, {i: _Recorder(blocks.modules[i], log) for i in range(blocks.n)}):
        blocks.decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False)
    return log[0][0], [(args, kwargs) for _, args, kwargs in log]


def call_block(layer: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    """Block `layer` run on state h with the arguments the decoder passed it (`record_call_args`)."""
    args, kwargs = call
    if args or "hidden_states" not in kwargs:
        out = layer(h, *args, **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": h})
    return out[0] if isinstance(out, tuple) else out
