"""Ablation sweeps: score each task with k blocks ablated from the input or output end.

A *configuration* says, for every block, which weights run it: the checkpoint's
(`c`), the reference's (`r`, i.e. step 0) or none (`s`, skipped = identity), plus
which model supplies the embeddings and the final norm + head.

    direction input,  mode revert, k:  r^k c^(L-k)      (blocks [0, k) reverted)
    direction output, mode revert, k:  c^(L-k) r^k      (blocks [L-k, L) reverted)
    mode skip: the same with `s` in place of `r`; works on any single model
    mode keep-outer, (k_in, k_out):   c^k_in r^(L-k_in-k_out) c^k_out

By default the embeddings, final norm and LM head stay at the checkpoint
(`ends=False`). With `ends=True` the input embedding counts as part of the input
end and the final norm + head as part of the output end: for every k >= 1 they
are reverted with the blocks (tied weights are untied for the evaluation, since
full fine-tuning moves them too).

Three engines give identical numbers:
- `naive`: for each configuration, build the ablated model (copy, load the
  weights) and run the plain HF forward. Obviously right; slow.
- `memory` (formerly `fast`): configurations form a trie over their per-block sources; walking it in
  sorted order reuses the hidden state of every shared prefix (the checkpoint's
  prefix serves every k of its output sweep, the reference prefix every k of its
  input sweep), reference-only prefixes are cached across checkpoints whose
  embeddings did not change, blocks a checkpoint did not change count as the
  reference's, and the LM head runs only at scored positions.
  Blocks are called directly with the arguments the HF decoder itself passes them
  (masks, rotary tables), recorded once per batch, so no architecture is
  special-cased.

- `streamed` (`probe.streamed`): the same configurations advanced layer-major, every block read from
  the weight files when its turn comes, so memory does not grow with depth; `auto` (the default)
  picks it where two models do not fit the memory budget (`probe.fit`).

A fourth engine, `taylor` (see `taylor`), estimates revert configurations to first order from one
backward pass per example; its rows say `engine="taylor"` and never share a table with exact rows.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cogprobe.models.blocks import SkipBlock, find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import to_string
from cogprobe.probe.options import DIRECTIONS, SweepOptions
from cogprobe.probe.engine import (CACHE_BYTES, Ablation, Counter, batches, call_block, iter_checkpoints, iter_weights,
                                   largest_batch, n_batches, record_call_args)
from cogprobe.probe.fit import pick, skeleton_for
from cogprobe.probe.streamed import StreamedEngine
from cogprobe.probe.taylor import TaylorEngine
from cogprobe.data.tasks import BATCH_SIZE, Example, nll_per_example, scored_positions

COLUMNS = ["checkpoint_step", "task", "direction", "mode", "k", "k_in", "k_out", "blocks", "ends",
           "nll", "n_tokens", "nll_reference", "nll_checkpoint", "share", "example_nll", "example_tokens",
           "reference_example_nll", "checkpoint_example_nll", "engine"]
# example_nll / example_tokens: per-example NLL sums and token counts (lists, in the evaluation set's
# order), and the same sums for the reference and the checkpoint (same examples, same counts), so an
# interval on any row, share included, can be recomputed without scoring again (`intervals`).
# engine: "exact" (fast and naive give the same numbers) or "taylor" (first-order estimates, see
# `taylor`); a table written before the column existed holds exact rows (`engines_in`).


def sweep_configs(n_layers: int, *, mode: str = SweepOptions.mode, directions: Sequence[str] = DIRECTIONS,
                  ks: Iterable[int] | None = None, ends: bool = False) -> list[Ablation]:
    """The configurations of a one-end sweep (modes revert and skip)."""
    if mode not in ("revert", "skip"):
        raise CogprobeError(f"sweep mode {mode!r} ablates one end; use revert or skip (keep-outer: keep_outer_configs)")
    ks = check_ks(ks, n_layers)
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise CogprobeError(f"unknown direction(s) {bad}; use {', '.join(DIRECTIONS)}")
    ab = "r" if mode == "revert" else "s"
    end = "r" if ends and mode == "revert" else "c"
    out = []
    for d in directions:
        for k in ks:
            if d == "input":
                src, emb, head = (ab,) * k + ("c",) * (n_layers - k), end if k else "c", "c"
            else:
                src, emb, head = ("c",) * (n_layers - k) + (ab,) * k, "c", end if k else "c"
            blocks = list(range(k)) if d == "input" else list(range(n_layers - k, n_layers))
            out.append(Ablation(src, emb, head, dict(direction=d, mode=mode, k=k, k_in=None, k_out=None,
                                                   blocks=to_string(blocks), ends=ends)))
    return out


def keep_outer_configs(n_layers: int, pairs: Iterable[tuple[int, int]]) -> list[Ablation]:
    """Keep the checkpoint in [0, k_in) and [L-k_out, L), revert the middle to the reference."""
    out = []
    for k_in, k_out in pairs:
        if k_in < 0 or k_out < 0 or k_in + k_out > n_layers:
            raise CogprobeError(f"keep-outer ({k_in}, {k_out}) does not fit {n_layers} blocks; need k_in + k_out <= L")
        src = ("c",) * k_in + ("r",) * (n_layers - k_in - k_out) + ("c",) * k_out
        kept = list(range(k_in)) + list(range(n_layers - k_out, n_layers))
        out.append(Ablation(src, "c", "c", dict(direction="both", mode="keep-outer", k=k_in + k_out, k_in=k_in,
                                              k_out=k_out, blocks=to_string(kept), ends=False)))
    return out


def check_ks(ks: Iterable[int] | None, n_layers: int) -> list[int]:
    if ks is None:
        return list(range(n_layers + 1))
    ks = sorted(set(int(k) for k in ks))
    bad = [k for k in ks if not 0 <= k <= n_layers]
    if bad:
        raise CogprobeError(f"k values {bad} are outside 0..{n_layers} (the model has {n_layers} blocks); "
                            f"ask for k within 0..{n_layers} (--ks, or sweep_ks in a study config)")
    return ks


# --- evaluating configurations --------------------------------------------------------------


def changed_blocks(model: nn.Module, reference: nn.Module) -> tuple[set[int], bool]:
    """Blocks whose weights differ from the reference, and whether the embeddings did."""
    mb, rb = find_blocks(model), find_blocks(reference)
    ref = reference.state_dict()
    changed, embed_changed = set(), False
    embed_names = set(mb.input_end_names())
    for name, p in model.named_parameters():
        same = name in ref and torch.equal(p, ref[name])
        if not same and (i := mb.block_of(name)) is not None:
            changed.add(i)
        elif not same and name in embed_names:
            embed_changed = True
    return changed, embed_changed


class FastEngine:
    """Prefix-sharing evaluation of many configurations of one checkpoint against a reference."""

    def __init__(self, reference: nn.Module, *, cache_bytes: int = CACHE_BYTES):
        self.reference = reference
        self.ref_blocks = find_blocks(reference)
        self.counter = Counter()
        self._ref_cache: dict[tuple, torch.Tensor] = {}  # (task, batch, depth) -> state after r-only prefix
        self._cache_bytes, self._cached = cache_bytes, 0
        self._kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (name, batch, prefix) -> state, LRU
        self._kept_bytes = 0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, configs: Sequence[Ablation], examples: dict[str, list[Example]],
                 *, batch_size: int = BATCH_SIZE, on_batch=None,
                 remember=None) -> dict[tuple[str, Ablation], tuple[float, int]]:
        """{(task, config): (nll sums, token counts)}, arrays over the task's examples in their order.
        `on_batch()` is called after each (task, batch) (a progress bar's tick). `remember`: a name
        for `model` (its step): the states of its prefixes are kept across calls (the least recently
        used dropped first beyond `cache_bytes`), for a caller that scores one checkpoint in many
        small calls (the budget search); the same block calls on the same states, so the same numbers."""
        configs = list(dict.fromkeys(configs))  # equal configurations are evaluated once
        cb = find_blocks(model)
        changed, embed_changed = changed_blocks(model, self.reference)
        device = next(model.parameters()).device
        # normalised keys: a block the checkpoint did not change *is* the reference block
        keyed = sorted(((self._key(c, changed, embed_changed), c) for c in configs), key=lambda kc: kc[0])
        totals = {}
        for task, exs in examples.items():
            for c in configs:
                totals[(task, c)] = (np.zeros(len(exs)), np.zeros(len(exs), dtype=np.int64))
            for idx, batch in batches(exs, batch_size):
                self._batch(task, batch, idx, cb, keyed, totals, device, remember)
                if on_batch is not None:
                    on_batch()
        return totals

    @staticmethod
    def _key(c: Ablation, changed: set[int], embed_changed: bool) -> tuple:
        emb = "r" if c.embed == "r" or not embed_changed else "c"
        return (emb,) + tuple("r" if s == "c" and i not in changed else s for i, s in enumerate(c.sources))

    def _batch(self, task, batch, idx, cb, keyed, totals, device, remember=None):
        pred_mask, targets = scored_positions(batch)
        pred_mask = pred_mask.to(device)
        batch_id = (task, tuple(batch["input_ids"].shape), hash(batch["input_ids"].numpy().tobytes()))
        roots, calls = {}, None
        path: list[str] = []        # sources of the current trie path
        states: list[torch.Tensor] = []   # states[i] = hidden state after path[:i+1] (i=0: embedding)
        for key, config in keyed:
            lcp = _common_prefix(path, key)
            path, states = list(key[:lcp]), states[:lcp]
            for depth in range(lcp, len(key)):
                src = key[depth]
                if depth == 0:
                    if src not in roots:
                        roots[src], calls_ = record_call_args(self.ref_blocks if src == "r" else cb, batch, device)
                        calls = calls or calls_
                    h = roots[src]
                else:
                    h = self._step(batch_id, key[:depth + 1], src, depth - 1, states[-1], calls, cb, remember)
                path.append(src)
                states.append(h)
            head_blocks = self.ref_blocks if config.head == "r" else cb
            logits = head_blocks.decode(states[-1][pred_mask])
            sums, counts = totals[(task, config)]
            sums[idx], counts[idx] = nll_per_example(logits, targets, pred_mask)

    def _step(self, batch_id, prefix, src, i, h, calls, cb, remember=None):
        """The state after block i runs (from `src`) on state h.

        A prefix that is reference-only (normalised keys) does not depend on the
        checkpoint, so its state is cached for every later checkpoint; with `remember`,
        the checkpoint's other prefixes are kept too (see `evaluate`).
        """
        if src == "s":
            return h
        pure_ref = all(s == "r" for s in prefix)
        ck = (batch_id, len(prefix))
        if pure_ref and ck in self._ref_cache:
            return self._ref_cache[ck]
        kept = (remember, batch_id, prefix) if remember is not None and not pure_ref else None
        if kept in self._kept:
            self._kept.move_to_end(kept)
            return self._kept[kept]
        layer = (self.ref_blocks if src == "r" else cb).modules[i]
        out = call_block(layer, h, calls[i])
        self.counter.block_evals += 1
        size = out.numel() * out.element_size()
        if pure_ref and self._cached + size <= self._cache_bytes:
            self._ref_cache[ck] = out
            self._cached += size
        elif kept is not None and size <= self._cache_bytes:
            self._kept[kept] = out
            self._kept_bytes += size
            while self._kept_bytes > self._cache_bytes:
                dropped = self._kept.popitem(last=False)[1]
                self._kept_bytes -= dropped.numel() * dropped.element_size()
        return out


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class NaiveEngine:
    """Builds each ablated model in full and runs the plain HF forward: the reference implementation."""

    def __init__(self, reference: nn.Module, **_):
        self.reference = reference
        self.counter = Counter()

    @torch.no_grad()
    def evaluate(self, model, configs, examples, *, batch_size: int = BATCH_SIZE, on_batch=None):
        totals = {}
        configs = list(dict.fromkeys(configs))
        for n, config in enumerate(configs):
            ablated = build_ablated(model, self.reference, config)
            n_run = sum(s != "s" for s in config.sources)
            for task, exs in examples.items():
                sums, counts = np.zeros(len(exs)), np.zeros(len(exs), dtype=np.int64)
                for idx, batch in batches(exs, batch_size):
                    pred_mask, targets = scored_positions(batch)
                    logits = ablated(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).logits
                    sums[idx], counts[idx] = nll_per_example(logits[pred_mask], targets, pred_mask)
                    self.counter.block_evals += n_run
                totals[(task, config)] = (sums, counts)
            del ablated
        for _ in range(n_batches(examples, batch_size)) if on_batch is not None else ():
            on_batch()   # one tick per (task, batch), as the fast engine, at the end
        return totals


def build_ablated(model: nn.Module, reference: nn.Module, config: Ablation) -> nn.Module:
    """A standalone copy of `model` with the configuration's weights loaded (ties broken)."""
    out = copy.deepcopy(model)
    ob, rb = find_blocks(out), find_blocks(reference)
    if config.embed != config.head and out.get_output_embeddings().weight is out.get_input_embeddings().weight:
        head = out.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
    ref = reference.state_dict()
    own = dict(out.named_parameters())
    for name, p in own.items():
        i = ob.block_of(name)
        take_ref = ((i is not None and config.sources[i] == "r")
                    or (name in ob.input_end_names() and config.embed == "r")
                    or (name in ob.output_end_names() and config.head == "r"))
        if take_ref:
            p.data.copy_(ref[name].data)
    for i, s in enumerate(config.sources):
        if s == "s":
            ob.modules[i] = SkipBlock(ob.modules[i])
    return out


ENGINES = {"auto": FastEngine, "memory": FastEngine, "fast": FastEngine, "streamed": StreamedEngine,
           "naive": NaiveEngine, "taylor": TaylorEngine}   # auto: memory or streamed (`probe.fit`); fast: memory's older name
ESTIMATES = {"taylor"}   # engines whose rows are estimates, labelled by name; the others are "exact"


def engine_label(engine: str) -> str:
    return engine if engine in ESTIMATES else "exact"


def engines_in(table: pd.DataFrame) -> set[str]:
    """The engines a sweep table's rows come from; rows without the column (older tables) are exact."""
    if table.empty:
        return set()
    if "engine" not in table.columns:
        return {"exact"}
    return set(table["engine"].astype(object).fillna("exact"))


def check_one_engine(table: pd.DataFrame, where: str) -> None:
    """Refuse a table that mixes exact rows and estimates: no rule or figure may average them."""
    found = engines_in(table)
    if len(found) > 1:
        raise CogprobeError(f"{where} mixes rows of the engines {sorted(found)}; keep each engine's sweep in its "
                            "own table (sweep with --out DIR)")


def reference_config(n_layers: int) -> Ablation:
    """The reference model itself: every block, the embeddings and the head at step 0."""
    return Ablation(("r",) * n_layers, "r", "r", dict(direction="none", mode="reference", k=0))


def checkpoint_config(n_layers: int) -> Ablation:
    return Ablation(("c",) * n_layers, "c", "c", dict(direction="none", mode="checkpoint", k=0))


def sweep(checkpoints, examples: dict[str, list[Example]], *, mode: str = SweepOptions.mode,
          directions: Sequence[str] = DIRECTIONS, ks: Iterable[int] | None = None, ends: bool = False,
          keep_outer: Iterable[tuple[int, int]] = (), engine: str = SweepOptions.engine, batch_size: int = BATCH_SIZE,
          steps: Iterable[int] | None = None, on_checkpoint=None, runner=None,
          configs: Sequence[Ablation] | None = None, on_batch=None, remember: bool = False,
          max_memory=SweepOptions.max_memory) -> pd.DataFrame:
    """Sweep every checkpoint; a tidy table with one row per (checkpoint, task, configuration).

    `checkpoints` is a `Checkpoints` or a sequence of (step, model) with the
    reference first. `on_checkpoint(step, rows)` is called after each checkpoint
    (the run-folder driver appends to disk there, so an interruption loses at
    most one checkpoint's work). `configs` replaces the grid that mode, directions,
    ks, ends and keep_outer describe (a process of a sharded sweep passes its share).
    `on_batch()` is called after each (checkpoint, task, batch): a progress bar's tick.
    `remember`: keep each checkpoint's prefix states in `runner` across calls (see
    `FastEngine.evaluate`; the budget search scores one checkpoint in many small calls).
    `engine` auto (or streamed) with a `Checkpoints` reads the weights' sizes from the files and
    streams the blocks when two models would not fit `max_memory` (`probe.fit`); the table's
    attrs say which engine ran (`engine`) and what it measured (`fit`).
    """
    if engine not in ENGINES:
        raise CogprobeError(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")
    if mode == "keep-outer" and not keep_outer and configs is None:
        raise CogprobeError("mode keep-outer needs (k_in, k_out) pairs; pass keep_outer=[(2, 2), ...]")

    def grid(n: int) -> list[Ablation]:
        own = configs if configs is not None else (
            keep_outer_configs(n, keep_outer) if mode == "keep-outer"
            else sweep_configs(n, mode=mode, directions=directions, ks=ks, ends=ends))
        return [reference_config(n), checkpoint_config(n)] + list(own)

    fit = None
    skeleton = skeleton_for(engine, checkpoints) if runner is None else None
    if skeleton is not None:
        planned = grid(skeleton.n)
        engine, fit, runner = pick(engine, checkpoints, skeleton, max_memory=max_memory,
                                   batch_tokens=largest_batch(examples, batch_size), n_configs=len(planned))
    if isinstance(runner, StreamedEngine):
        items = iter_weights(checkpoints, steps, runner.skeleton.rename)
    else:
        items = iter_checkpoints(checkpoints, steps)
    ref_step, reference = next(items)
    if skeleton is not None:
        configs = planned
    else:
        configs = grid(runner.skeleton.n if isinstance(runner, StreamedEngine) else find_blocks(reference).n)
    runner = runner or ENGINES[engine](reference)  # pass one to keep its caches across calls
    frames = []
    wanted_ref = steps is None or ref_step in set(steps)
    for step, model in (_with_reference(ref_step, reference, items) if wanted_ref else items):
        extra = dict(remember=step) if remember and not isinstance(runner, StreamedEngine) else {}
        totals = runner.evaluate(model, configs, examples, batch_size=batch_size, on_batch=on_batch, **extra)
        rows = _rows(step, configs, totals, examples, engine_label(engine))
        if on_checkpoint is not None:
            on_checkpoint(step, rows)
        frames.append(rows)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    table.attrs["block_evals"] = runner.counter.block_evals
    table.attrs["block_loads"] = runner.counter.block_loads
    table.attrs["engine"] = "memory" if engine in ("auto", "fast") else engine
    table.attrs["fit"] = fit.record() if fit is not None else None
    return table


def _with_reference(ref_step, reference, items):
    yield ref_step, reference
    yield from items


def _rows(step, configs, totals, examples, engine: str = "exact") -> pd.DataFrame:
    rows = []
    mean = lambda sc: float(sc[0].sum()) / int(sc[1].sum())  # noqa: E731  (a ratio of sums, in float64)
    for task in examples:
        nll_ref, nll_ck = mean(totals[(task, configs[0])]), mean(totals[(task, configs[1])])
        ref_sums, ck_sums = totals[(task, configs[0])][0].tolist(), totals[(task, configs[1])][0].tolist()
        gain = nll_ref - nll_ck
        for c in configs[2:]:
            sums, counts = totals[(task, c)]
            nll, n = mean(totals[(task, c)]), int(counts.sum())
            lab = c.labels
            rows.append(dict(checkpoint_step=step, task=task, direction=lab["direction"], mode=lab["mode"],
                             k=lab["k"], k_in=lab.get("k_in"), k_out=lab.get("k_out"), blocks=lab.get("blocks", ""),
                             ends=lab.get("ends", False), nll=nll, n_tokens=n, nll_reference=nll_ref,
                             nll_checkpoint=nll_ck,
                             share=(nll_ref - nll) / gain if gain > 0 else float("nan"),
                             example_nll=sums.tolist(), example_tokens=counts.tolist(),
                             reference_example_nll=ref_sums, checkpoint_example_nll=ck_sums, engine=engine))
    return pd.DataFrame(rows, columns=COLUMNS)
