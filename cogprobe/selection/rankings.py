"""Cheap per-block rankings: which blocks to tune, without a revert sweep.

Each ranking scores every block; a higher score means a more important block (rank 1 is tuned first):
- `block-influence` (ShortGPT, Men et al. 2024): 1 - cos(block input, block output), the mean over
  every token of the evaluation set, on the base model. One forward pass; no probe run at all.
- `angular` (Gromov et al. 2024, with n = 1): arccos(cos(h_l, h_l+1)) / pi at each sequence's last
  token, the mean over sequences, on the base model. One forward pass; no probe run.
- `weight-delta`: ||theta_ck - theta_ref|| / ||theta_ref|| over the block's weights, per checkpoint of
  a probe run. No forward pass.
- `taylor`: per checkpoint, the first-order estimate of the share of the task's gain that reverting
  the block alone removes (t_i / gain, see `taylor`), the mean over tasks. One forward and one
  backward pass per example (and one forward of the reference per run, for the gain). The only
  ranking that estimates gain, so the only one a tau can cut.

`rank` returns a tidy table, one row per (checkpoint_step, ranking, block): score, rank, and what the
ranking cost at that checkpoint (forward and backward passes over the evaluation set, seconds).
Base-model rankings are written at the reference step. `select_ranking` turns a ranking into a
layer set; `agreement` checks rankings against the exact sweep.

Models that do not fit in memory (`--engine streamed`, or `auto` where they do not fit `--max-memory`)
are ranked from their files: block-influence and angular in one layer-major pass through the
reference, each block read once per group of batches (`probe.streamed_acts.through_blocks`), and
weight-delta two tensors at a time. The same numbers, bit for bit: the same block inputs and outputs
and the same sums in the same order. taylor needs a backward pass through whole models, so it does
not stream and is refused there in one line.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from cogprobe.core import io
from cogprobe.models.blocks import find_blocks
from cogprobe.core.distributed import world
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import with_changes
from cogprobe.core.memory import gib, process_peak
from cogprobe.data.evalset import EvalSet
from cogprobe.models.layersets import DEFAULT_FRACTION, check_fraction, cogsym
from cogprobe.probe.fit import STREAMABLE, check_files, choose, skeleton_for
from cogprobe.probe.streamed import Skeleton
from cogprobe.probe.streamed_acts import STATE_BYTES, through_blocks
from cogprobe.probe.tables import open_checkpoints, out_dir, say_set, source_id, wanted
from cogprobe.selection.options import RANKINGS, RankOptions
from cogprobe.selection.rules import EPS, Selection
from cogprobe.probe.engine import iter_checkpoints, iter_weights, largest_batch
from cogprobe.data.tasks import BATCH_SIZE, Example, batches, score
from cogprobe.probe.taylor import block_terms

ON_BASE = ("block-influence", "angular")       # computed once, on the reference
COLUMNS = ["checkpoint_step", "ranking", "block", "score", "rank", "forward_passes", "backward_passes", "seconds"]
RANKINGS_TABLE = "rankings.parquet"


def check_rankings(names: Sequence[str]) -> list[str]:
    bad = [n for n in names if n not in RANKINGS]
    if bad or not names:
        raise CogprobeError(f"unknown ranking(s) {bad or names}; use {', '.join(RANKINGS)}")
    return list(dict.fromkeys(names))


@torch.no_grad()
def _block_states(model, examples: dict[str, list[Example]], batch_size: int, reduce) -> np.ndarray:
    """Per block, the mean of `reduce(block input, block output, attention mask)` -> (sum, count) over
    the evaluation set, read with hooks on the blocks (their raw residual stream, before any final norm)."""
    blocks = find_blocks(model)
    device = next(model.parameters()).device
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def keep_input(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def keep_output(i):
        def hook(module, args, output):
            outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [h for i, layer in enumerate(blocks.modules) for h in (
        layer.register_forward_pre_hook(keep_input(i), with_kwargs=True),
        layer.register_forward_hook(keep_output(i)))]
    sums, counts = np.zeros(blocks.n), np.zeros(blocks.n)
    try:
        for exs in examples.values():
            for batch in batches(exs, batch_size, pad_id=0):
                mask = batch["attention_mask"].to(device)
                blocks.decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
                for i in range(blocks.n):
                    total, n = reduce(inputs[i].float(), outputs[i].float(), mask.bool())
                    sums[i], counts[i] = sums[i] + total, counts[i] + n
    finally:
        for h in handles:
            h.remove()
    return sums / counts


def _one_minus_cos(x, y, mask) -> tuple[float, int]:
    cos = torch.nn.functional.cosine_similarity(x[mask], y[mask], dim=-1)
    return float((1 - cos).double().sum()), int(mask.sum())


def _last_token_angle(x, y, mask) -> tuple[float, int]:
    last = mask.sum(1) - 1      # right-padded: the last real token of each row
    rows = torch.arange(mask.shape[0], device=mask.device)
    cos = torch.nn.functional.cosine_similarity(x[rows, last], y[rows, last], dim=-1).clamp(-1, 1)
    return float((torch.arccos(cos) / math.pi).double().sum()), mask.shape[0]


ON_BASE_REDUCE = {"block-influence": _one_minus_cos, "angular": _last_token_angle}   # what each one sums


def block_influence(model, examples: dict[str, list[Example]], *, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """ShortGPT's Block Influence of every block: 1 - cos(input, output), the mean over every real token."""
    return _block_states(model, examples, batch_size, _one_minus_cos)


def angular_distance(model, examples: dict[str, list[Example]], *, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Gromov et al.'s angular distance between each block's input and output at the last token (n = 1)."""
    return _block_states(model, examples, batch_size, _last_token_angle)


def weight_delta(model, reference) -> np.ndarray:
    """||theta_ck - theta_ref|| / ||theta_ref|| over each block's parameters."""
    blocks, ref = find_blocks(model), dict(find_blocks(reference).model.named_parameters())
    moved, size = np.zeros(blocks.n), np.zeros(blocks.n)
    for name, p in blocks.model.named_parameters():
        if (i := blocks.block_of(name)) is not None:
            moved[i] += float((p.detach().double() - ref[name].detach().double()).pow(2).sum())
            size[i] += float(ref[name].detach().double().pow(2).sum())
    return np.sqrt(moved) / np.sqrt(np.where(size > 0, size, 1.0))


def taylor_share(terms: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], reference: dict[str, float]) -> np.ndarray:
    """Per block, the first-order share of the task's gain that reverting it removes, the mean over tasks:
    sum_e t_e,i / (sum_e nll_ref,e - sum_e nll_ck,e), from `taylor.block_terms` and the reference's
    summed NLL. Over the measured gain, not the estimates' own total: that can be near zero or
    negative far from the reference, and dividing by it would flip the order."""
    shares = []
    for task, (sums, _, t) in terms.items():
        gain = reference[task] - sums.sum()
        if not gain > 0:
            raise CogprobeError(f"the checkpoint did not improve on the reference for task {task!r} "
                                f"(gain {gain:.4g} nats); the taylor ranking shares a gain: train longer")
        shares.append(t.sum(axis=0) / gain)
    return np.mean(shares, axis=0)


def ranking_rows(step, ranking, scores, forward, backward, seconds) -> list[dict]:
    order = pd.Series(-np.asarray(scores)).rank(method="first").astype(int).tolist()
    return [dict(checkpoint_step=int(step), ranking=ranking, block=i, score=float(s), rank=r, forward_passes=forward,
                 backward_passes=backward, seconds=seconds) for i, (s, r) in enumerate(zip(scores, order))]


def rank(checkpoints, examples: dict[str, list[Example]], *, rankings: Sequence[str] = RANKINGS,
         batch_size: int = BATCH_SIZE, steps: Sequence[int] | None = None, engine: str = RankOptions.engine,
         max_memory: str | int | None = RankOptions.max_memory) -> pd.DataFrame:
    """Every ranking of `rankings` (base-model ones once, the others per trained checkpoint) as a tidy table.

    `checkpoints` is a `Checkpoints` or a sequence of (step, model) with the reference first. `engine`
    auto (or streamed) with a `Checkpoints` reads the weights' sizes from the files and, where the
    models do not fit `max_memory` (`probe.fit`), streams: block-influence and angular in one
    layer-major pass through the reference read block by block, weight-delta tensor by tensor from
    the files; the same numbers (the same operations in the same order). taylor needs gradients
    through whole models and does not stream: it is refused there. attrs: `engine`, `fit`.
    """
    rankings = check_rankings(rankings)
    skeleton, fit, state_bytes = _streaming(engine, checkpoints, rankings, examples, batch_size, max_memory)
    if skeleton is None:
        table = _rank_in_memory(checkpoints, examples, rankings, batch_size, steps)
    else:
        table = _rank_streamed(checkpoints, skeleton, examples, rankings, batch_size, steps, state_bytes)
    table.attrs["engine"] = "memory" if skeleton is None else "streamed"
    table.attrs["fit"] = fit.record() if fit is not None else None
    return table


def _streaming(engine: str, checkpoints, rankings: list[str], examples, batch_size: int, max_memory):
    """(the weightless model to stream, or None; what `probe.fit.choose` measured, or None; the states a
    group of batches may keep: what the budget leaves). The in-memory rankings hold two models where a
    checkpoint is compared (weight-delta, taylor), else one."""
    skeleton = skeleton_for(engine, checkpoints)
    if skeleton is None:
        return None, None, 0
    hidden = skeleton.empty.config.get_text_config().hidden_size
    states = largest_batch(examples, batch_size) * hidden * skeleton.dtype.itemsize * 2   # a block's input, output
    models = 2 if {"weight-delta", "taylor"} & set(rankings) else 1
    fit = choose(engine, checkpoints, skeleton, max_memory=max_memory, states=states, models=models)
    if fit.engine != "streamed":
        return None, fit, 0
    if "taylor" in rankings:
        why = "--engine streamed" if engine == "streamed" else \
            f"the models need {gib(fit.in_memory)}, --max-memory is {gib(fit.budget)}"
        raise CogprobeError(f"the taylor ranking needs gradients through whole models and does not stream ({why}); "
                            "drop taylor from --rankings (the others stream), or rank with --engine memory where "
                            "the models fit")
    check_files(checkpoints, skeleton)
    return skeleton, fit, max(states, fit.budget - fit.streamed + states)


def _rank_in_memory(checkpoints, examples, rankings: list[str], batch_size: int, steps) -> pd.DataFrame:
    n_examples = sum(len(e) for e in examples.values())
    items = iter_checkpoints(checkpoints, steps)
    ref_step, reference = next(items)
    rows: list[dict] = []
    for name, fn in (("block-influence", block_influence), ("angular", angular_distance)):
        if name in rankings:
            t0 = time.perf_counter()
            scores = fn(reference, examples, batch_size=batch_size)
            rows += ranking_rows(ref_step, name, scores, n_examples, 0, time.perf_counter() - t0)
    reference_nll = {}
    for step, model in items:
        if "weight-delta" in rankings:
            t0 = time.perf_counter()
            rows += ranking_rows(step, "weight-delta", weight_delta(model, reference), 0, 0, time.perf_counter() - t0)
        if "taylor" in rankings:
            t0 = time.perf_counter()
            if not reference_nll:   # once per run: the reference does not change
                reference_nll = {task: score(reference, exs, batch_size=batch_size).nll_sum
                                 for task, exs in examples.items()}
            terms = {task: block_terms(model, reference, exs) for task, exs in examples.items()}
            rows += ranking_rows(step, "taylor", taylor_share(terms, reference_nll), n_examples, n_examples,
                          time.perf_counter() - t0)
    return pd.DataFrame(rows, columns=COLUMNS)


def _rank_streamed(checkpoints, skeleton: Skeleton, examples, rankings: list[str], batch_size: int, steps,
                   state_bytes: int) -> pd.DataFrame:
    """The forward-only rankings in one pass (each row's seconds: that pass's), weight-delta per checkpoint."""
    n_examples = sum(len(e) for e in examples.values())
    items = iter_weights(checkpoints, steps, skeleton.rename)
    ref_step, reference = next(items)
    rows: list[dict] = []
    reduces = {name: reduce for name, reduce in ON_BASE_REDUCE.items() if name in rankings}
    if reduces:
        t0 = time.perf_counter()
        scores = streamed_block_states(skeleton, reference, examples, batch_size, reduces, state_bytes=state_bytes)
        seconds = time.perf_counter() - t0
        for name in reduces:
            rows += ranking_rows(ref_step, name, scores[name], n_examples, 0, seconds)
    sizes = None   # the reference's squared norms, read with the first checkpoint
    if "weight-delta" in rankings:
        for step, weights in items:
            t0 = time.perf_counter()
            delta, sizes = streamed_weight_delta(skeleton, weights, reference, sizes)
            rows += ranking_rows(step, "weight-delta", delta, 0, 0, time.perf_counter() - t0)
    return pd.DataFrame(rows, columns=COLUMNS)


def streamed_block_states(skeleton: Skeleton, weights, examples: dict[str, list[Example]], batch_size: int,
                          reduces: dict, *, state_bytes: int = STATE_BYTES) -> dict[str, np.ndarray]:
    """`_block_states` of every reduce of `reduces` ({name: reduce}) in one layer-major pass through the
    model `weights` stand for, read block by block (`streamed_acts.through_blocks`): the same block
    inputs and outputs, summed over the same batches in the same order, so the same numbers."""
    sums = {name: np.zeros(skeleton.n) for name in reduces}
    counts = {name: np.zeros(skeleton.n) for name in reduces}

    def visit(i, batch, x, y):
        mask = batch["attention_mask"].to(skeleton.device).bool()
        for name, reduce in reduces.items():
            total, n = reduce(x.float(), y.float(), mask)
            sums[name][i], counts[name][i] = sums[name][i] + total, counts[name][i] + n

    through_blocks(skeleton, weights, [b for exs in examples.values() for b in batches(exs, batch_size, pad_id=0)],
                   visit, state_bytes=state_bytes)
    return {name: sums[name] / counts[name] for name in reduces}


def streamed_weight_delta(skeleton: Skeleton, weights, reference, sizes: np.ndarray | None = None):
    """(`weight_delta`, the reference's per-block squared norms) read tensor by tensor from the files:
    two tensors in memory at a time, summed in the in-memory order (each block's parameters as the
    model lists them) at the skeleton's precision, so the same numbers. A tensor the checkpoint cannot
    have changed (`may_differ`) adds nothing, as its exact zero does there. `sizes`: the squared
    norms if known (they do not change across checkpoints)."""
    moved, known = np.zeros(skeleton.n), sizes is not None
    sizes = sizes if known else np.zeros(skeleton.n)
    read = lambda source, name: source.read(name).to(skeleton.dtype).double()  # noqa: E731  (as loaded, then float64)
    for i in range(skeleton.n):
        for name in skeleton.block_names(i):
            ref = read(reference, name) if not known or weights.may_differ(name) else None
            if not known:
                sizes[i] += float(ref.pow(2).sum())
            if weights.may_differ(name):
                moved[i] += float((read(weights, name) - ref).pow(2).sum())
    return np.sqrt(moved) / np.sqrt(np.where(sizes > 0, sizes, 1.0)), sizes


def rank_run(source, options: RankOptions | None = None, *, evalset: EvalSet | None = None, out=None, base=None,
             device=None, log=print, **changes) -> pd.DataFrame:
    """`rank` of a run folder's checkpoints on its evaluation set, written to `rankings.parquet` (whole,
    atomically: a rerun recomputes it) with the evaluation set beside it, and which engine ran
    (`computed`). `changes`: fields of `RankOptions` given as keywords, on top of `options`."""
    o = with_changes(RankOptions, options, changes)
    rankings = check_rankings(o.rankings)
    ckpts = open_checkpoints(source, base, device)
    out = out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    tok = ckpts.reference_tokenizer() if o.engine in STREAMABLE else ckpts.reference()[1]
    examples = evalset.examples(tok)
    say_set(evalset, tok, world(), log)
    start = time.perf_counter()
    table = rank(ckpts, examples, rankings=rankings, batch_size=o.batch_size, engine=o.engine,
                 max_memory=o.max_memory)
    ran = dict(engine=table.attrs["engine"], device=str(ckpts.device), seconds=round(time.perf_counter() - start, 1),
               peak_bytes=process_peak(ckpts.device), fit=table.attrs["fit"])
    io.write_parquet(out / RANKINGS_TABLE, table)
    io.write_json(out / f"{RANKINGS_TABLE}.json", dict(wanted(evalset, source_id(source, ckpts)), computed=[ran]))
    log(f"rank: {len(table)} rows in {out / RANKINGS_TABLE} ({ran['engine']} engine, peak {gib(ran['peak_bytes'])})")
    return table


def select_ranking(rankings: pd.DataFrame, rule: str, *, n_layers: int, step: int | None = None,
                   fraction: float = DEFAULT_FRACTION, tau: float | None = None) -> Selection:
    """The top blocks of ranking `rule` at `step` (default: the last step that has it): as many as
    CogSym tunes (round(fraction * L)), or, for `taylor` with `tau`, the fewest top blocks whose
    estimated shares add up to tau. The set need not be outer: `layers` is the set, and k_in / k_out
    count its blocks in the input and output halves."""
    check_rankings([rule])
    rows = rankings[rankings["ranking"] == rule]
    if rows.empty:
        raise CogprobeError(f"no {rule} rows in the rankings table; run `cogprobe rank RUN --rankings {rule}` first")
    steps = sorted(int(s) for s in rows["checkpoint_step"].unique())
    step = steps[-1] if step is None or rule in ON_BASE else int(step)
    if step not in steps:
        raise CogprobeError(f"no {rule} ranking at checkpoint step {step}; the table has steps {steps}")
    rows = rows[rows["checkpoint_step"] == step].sort_values("rank")
    if sorted(rows["block"]) != list(range(n_layers)):
        raise CogprobeError(f"the {rule} ranking at step {step} does not cover the model's {n_layers} blocks; "
                            "rank this run's checkpoints again")
    if tau is None:
        n = len(cogsym(n_layers, check_fraction(fraction, "fraction")))
        evidence = dict(n_blocks=n, rule=f"the {n} top-ranked blocks (CogSym's size at fraction {fraction})")
    else:
        if rule != "taylor":
            raise CogprobeError(f"ranking {rule} does not estimate gain, so tau cannot cut it; "
                                "use the taylor ranking with tau, or drop tau (CogSym's size)")
        cumulative = rows["score"].cumsum().to_numpy()
        reach = np.nonzero(cumulative >= check_fraction(tau, "tau") * (1 - EPS))[0]
        if not len(reach):
            raise CogprobeError(f"the taylor shares never add up to tau={tau} (best {cumulative.max():.3f}); "
                                "lower tau or use the exact curves")
        n = int(reach[0]) + 1
        evidence = dict(n_blocks=n, share=float(cumulative[n - 1]),
                        rule=f"the fewest top-ranked blocks whose estimated shares reach tau={tau}")
    layers = sorted(int(b) for b in rows["block"].head(n))
    evidence["scores"] = {int(b): float(s) for b, s in zip(rows["block"], rows["score"])}
    k_in = sum(b < n_layers / 2 for b in layers)
    params = dict(step=step, fraction=fraction) if tau is None else dict(step=step, tau=tau)
    return Selection(rule, params, n_layers, layers, k_in, len(layers) - k_in, evidence)


def select_ranking_run(source, rule: str, *, out=None, **kw) -> Selection:
    """`select_ranking` on the `rankings.parquet` of a run folder (the `cogprobe select --rule RANKING` path)."""
    out = out_dir(source, out)
    path = Path(out) / RANKINGS_TABLE
    if not path.exists():
        raise CogprobeError(f"no {RANKINGS_TABLE} in {out}; run `cogprobe rank {source}` first")
    table = io.read_parquet(path)
    return select_ranking(table, rule, n_layers=int(table["block"].max()) + 1, **kw)
