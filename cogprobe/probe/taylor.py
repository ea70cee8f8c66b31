"""The first-order sweep engine (`--engine taylor`): a whole revert sweep from one backward pass.

Reverting block i moves its weights by d_i = theta_ref,i - theta_ck,i. To first order an
example's summed NLL then changes by t_i = g_i . d_i, where g_i is the gradient of that NLL
with respect to block i's weights at the checkpoint; reverting a set S of blocks changes it by
the sum of t_i over S. One forward and one backward pass therefore give every point of both
directions' curves (and any keep-outer configuration): about three forward passes per example
instead of the exact engine's O(L^2) block evaluations. The estimate is right to first order in
d (its error shrinks as |d|^2); what it misses is what the first order misses: curvature, and
blocks that compensate for one another.

Examples go through one at a time: a batch's backward pass gives only the sum of its examples'
gradients, and the paired bootstrap intervals need each example's own estimate. The reference
and checkpoint rows are exact forward passes (the reference's cached across checkpoints), so
`share` compares an estimate with the exact gain. The engine estimates revert
configurations only (no `skip`, no `--ends`); anything else is refused, never computed another way.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cogprobe.models.blocks import find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.probe.engine import Counter, n_batches
from cogprobe.data.tasks import BATCH_SIZE, Example, collate, score, scored_positions


def block_deltas(model, reference) -> list[dict[str, torch.Tensor]]:
    """Per block, {parameter name: theta_ref - theta_ck} of the parameters the checkpoint changed."""
    blocks, ref = find_blocks(model), dict(find_blocks(reference).model.named_parameters())
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(blocks.n)]
    for name, p in blocks.model.named_parameters():
        i = blocks.block_of(name)
        if i is not None and not torch.equal(p, ref[name]):
            out[i][name] = (ref[name].detach() - p.detach()).to(p.dtype)
    return out


@contextlib.contextmanager
def _grad_on(params: Sequence[torch.nn.Parameter]):
    """Gradients for `params` only, restored on exit (checkpoints are loaded frozen)."""
    before = [p.requires_grad for p in params]
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def block_terms(model, reference, examples: Sequence[Example], *, counter=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(checkpoint NLL sums, scored tokens, t[example, block]): each example's exact summed NLL at the
    checkpoint and the first-order change of that sum when each block alone is reverted."""
    blocks, deltas = find_blocks(model), block_deltas(model, reference)
    device = next(model.parameters()).device
    if not any(deltas):   # nothing changed (the reference itself): every t is 0, one forward suffices
        s = score(model, examples)
        return np.asarray(s.example_nll), np.asarray(s.example_tokens), np.zeros((len(examples), blocks.n))
    own = dict(blocks.model.named_parameters())
    names = [n for d in deltas for n in d]
    params = [own[n] for n in names]
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    t = np.zeros((len(examples), blocks.n))
    with _grad_on(params):
        for e, example in enumerate(examples):
            batch = collate([example], pad_id=0)
            pred_mask, targets = scored_positions(batch)
            hidden = blocks.decoder(input_ids=batch["input_ids"].to(device), use_cache=False).last_hidden_state
            logits = blocks.logits(hidden[pred_mask.to(device)])
            nll = F.cross_entropy(logits.float(), targets.to(device), reduction="sum")
            grads = dict(zip(names, torch.autograd.grad(nll, params)))
            sums[e], counts[e] = float(nll.detach()), int(targets.numel())
            for i, d in enumerate(deltas):
                t[e, i] = float(sum((grads[n].double() * dn.double()).sum() for n, dn in d.items())) if d else 0.0
            if counter is not None:
                counter.block_evals += blocks.n
                counter.backward_passes += 1
    return sums, counts, t


class TaylorEngine:
    """First-order estimates of revert configurations; the `evaluate` interface of `sweep.FastEngine`."""

    def __init__(self, reference, **_):
        self.reference = reference
        self.counter = Counter()
        self._reference_scores: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def evaluate(self, model, configs, examples: dict[str, list[Example]], *, batch_size: int = BATCH_SIZE,
                 on_batch=None, remember=None) -> dict:
        """{(task, config): (nll sums, token counts)}: exact for the reference and the checkpoint,
        the first-order estimate for every other configuration. `on_batch` ticks once per (task, batch)
        of `batch_size`, at the end, as the exact engines' progress does; `remember` is the fast
        engine's (nothing to remember here: one pass serves every configuration)."""
        configs = list(dict.fromkeys(configs))
        ref_like = [c for c in configs if c.embed == "r" or c.head == "r" or "s" in c.sources]
        bad = [c for c in ref_like if not _is_reference(c)]
        if bad:
            raise CogprobeError("the taylor engine estimates revert sweeps only (no skip mode, no --ends, the "
                                f"embeddings and head stay at the checkpoint; got {bad[0].labels or bad[0].sources}); "
                                "use --engine fast for that sweep")
        totals = {}
        for task, exs in examples.items():
            sums, counts, t = block_terms(model, self.reference, exs, counter=self.counter)
            for c in configs:
                if _is_reference(c):
                    totals[(task, c)] = self._reference(task, exs, batch_size)
                else:
                    reverted = [i for i, s in enumerate(c.sources) if s == "r"]
                    totals[(task, c)] = (sums + t[:, reverted].sum(axis=1), counts)
        for _ in range(n_batches(examples, batch_size)) if on_batch is not None else ():
            on_batch()
        return totals

    def _reference(self, task, exs, batch_size) -> tuple[np.ndarray, np.ndarray]:
        key = (task, tuple(e.input_ids for e in exs))
        if key not in self._reference_scores:
            s = score(self.reference, exs, batch_size=batch_size)
            self.counter.block_evals += find_blocks(self.reference).n * len(exs)
            self._reference_scores[key] = (np.asarray(s.example_nll), np.asarray(s.example_tokens))
        return self._reference_scores[key]


def _is_reference(c) -> bool:
    return c.embed == "r" and c.head == "r" and all(s == "r" for s in c.sources)
