"""Capture: how each block's activations drift from the reference across checkpoints.

`capture(checkpoints, batches_by_task)` runs every checkpoint and the reference on
identical batches and reduces, per (checkpoint, layer, site, task):

- `drift_cos`: 1 - mean cosine similarity between the checkpoint's and the
  reference's activation at the same (non-padding) token;
- `cka`: linear CKA between the two (tokens x hidden) matrices;
- `norm`: mean L2 norm of the checkpoint's activation per token;
- `logit_lens_nll` (site `resid` only): mean NLL (nats/token) of the scored tokens
  when the block's output is read through the checkpoint's own final norm and LM
  head, applied only at the positions that predict scored tokens.

Streaming: one batch at a time, reference and checkpoint on the same inputs; CKA
keeps sufficient statistics (XᵀX, YᵀY, YᵀX, column sums, n) in float64, so memory
grows with hidden² per (layer, site), never with the number of inputs. The
reference's activations of each batch are computed once and kept for the later
checkpoints while they fit in `ref_cache_bytes` (1 GiB; beyond it the reference
runs again per batch). One checkpoint is loaded at a time; the reference stays loaded. The reference's own rows (drift 0, CKA 1) are
included: identical inputs give exactly those values. Cost: on the embedded
model the logit lens (a 49k-vocabulary head at every layer, scored positions
only) takes about two thirds of the time; `logit_lens=False` skips it.

Alignment (`capture_with_alignment`): on bare-sentence batches of the evaluation
set's pairs (`alignment.sentence_batches`), each checkpoint's block outputs are
mean-pooled per sentence and reduced to cross-lingual alignment measures (see
`cogprobe.alignment`), in the same checkpoint pass and through the same backend
runner as the rest; its rows form a second table, `alignment.parquet`. The
sentences are read alone, so these are forward passes of their own (one per
checkpoint, none of the reference's), logged with their time beside the rest's.

Optionally, raw activations of chosen layers and positions go to safetensors
shards `raw_dir/step-{step}/{task}/batch-{i:05d}.safetensors`, one per batch, each
written atomically, holding `blocks.{i}.{site}` [n, hidden] (`backends.site_name`) plus the `row`,
`position` and `token` of each kept position. Capture stops with a CogprobeError
*before* writing a shard that would take the bytes written past `raw_budget_bytes`.
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from cogprobe.probe.alignment import ALIGNMENT, Pooler, Sentences, alignment_rows
from cogprobe.probe.alignment import COLUMNS as ALIGNMENT_COLUMNS
from cogprobe.probe.backends import SITES, Acts, check_sites, open_backend, site_name
from cogprobe.models.blocks import check_indices, find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.core.io import atomic_path, write_parquet
from cogprobe.core.layout import ACTIVATIONS
from cogprobe.data.tasks import batches, nll_at_scored, scored_positions
from cogprobe.probe.options import CaptureOptions
from cogprobe.probe.streamed_acts import Streaming

STATS = ("drift_cos", "cka", "norm", "logit_lens_nll")
COLUMNS = ["checkpoint_step", "block", "site", "stat", "task", "value"]
RAW_POSITIONS = "scored"   # raw dumps keep the positions the tasks score (or a list of positions)


# ------------------------------------------------------------------ streaming reducers

@dataclass
class Similarity:
    """Streaming comparison of checkpoint activations Y with reference activations X.

    Sums are taken of rows shifted by the first batch's mean: covariance does not
    change under a shift, and it keeps float64 sums from cancelling on the large
    outlier dimensions some LMs carry. Identical X and Y give drift 0 and CKA 1
    exactly (the same operations on the same numbers).
    """

    n: int = 0
    cos_sum: float = 0.0
    norm_sum: float = 0.0
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add rows x (reference) and y (checkpoint) [tokens, hidden]; y=None means y is x."""
        x = x.double()
        y = x if y is None else y.double().to(x.device)
        xx = (x * x).sum(-1)
        yy = xx if y is x else (y * y).sum(-1)
        xy = xx if y is x else (x * y).sum(-1)
        self.cos_sum += float((xy / (xx * yy).sqrt().clamp_min(1e-300)).sum())
        self.norm_sum += float(yy.sqrt().sum())
        self.n += x.shape[0]
        self._moments(x, y)

    def _moments(self, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.stats
        if not s:
            s["shift_x"] = x.mean(0)
            s["shift_y"] = s["shift_x"] if y is x else y.mean(0)
            d = x.shape[1]
            for k in ("sx", "sy", "xx", "yy", "yx"):
                s[k] = torch.zeros(d if k in ("sx", "sy") else (d, d), dtype=torch.float64, device=x.device)
        xc = x - s["shift_x"]
        yc = xc if y is x else y - s["shift_y"]
        s["sx"] += xc.sum(0)
        s["sy"] += yc.sum(0)
        gram = xc.T @ xc
        s["xx"] += gram
        s["yy"] += gram if y is x else yc.T @ yc
        s["yx"] += gram if y is x else yc.T @ xc

    def cka(self) -> float:
        """Linear CKA = ||Ycᵀ Xc||² / (||Xcᵀ Xc|| ||Ycᵀ Yc||), centred from the sums."""
        s, n = self.stats, self.n
        cxx = s["xx"] - torch.outer(s["sx"], s["sx"]) / n
        cyy = s["yy"] - torch.outer(s["sy"], s["sy"]) / n
        cyx = s["yx"] - torch.outer(s["sy"], s["sx"]) / n
        hxx, hyy = float((cxx * cxx).sum()), float((cyy * cyy).sum())
        return float((cyx * cyx).sum()) / (hxx * hyy) ** 0.5 if hxx > 0 and hyy > 0 else float("nan")

    def values(self) -> dict[str, float]:
        if self.n == 0:
            raise CogprobeError("no tokens were captured; give batches with at least one non-padding token")
        return {"drift_cos": 1.0 - self.cos_sum / self.n, "cka": self.cka(), "norm": self.norm_sum / self.n}


# ------------------------------------------------------------------ raw activations

@dataclass
class RawWriter:
    """Safetensors shards of raw activations, bounded by a byte budget."""

    root: Path
    layers: Sequence[int]
    sites: Sequence[str]
    positions: str | Sequence[int] = "scored"
    budget: int = 1 << 30
    used: int = 0

    def __post_init__(self):
        self.root = Path(self.root)
        if isinstance(self.positions, str) and self.positions not in ("scored", "all"):
            raise CogprobeError(f"raw_positions={self.positions!r}; use 'scored', 'all' or a list of positions")

    def where(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, positions) to keep: predicting positions of scored tokens, all real tokens,
        or the given positions in each sequence (negative ones count from its last token)."""
        real = batch["attention_mask"].bool()
        if self.positions == "scored":
            return scored_positions(batch)[0].nonzero(as_tuple=True)
        if self.positions == "all":
            return real.nonzero(as_tuple=True)
        lengths = real.sum(1)
        keep = torch.zeros_like(real)
        for row, n in enumerate(lengths.tolist()):
            for p in self.positions:
                p = p + n if p < 0 else p
                if 0 <= p < n:
                    keep[row, p] = True
        return keep.nonzero(as_tuple=True)

    def write(self, step: int, task: str, index: int, acts: Acts, batch: dict) -> Path:
        from safetensors.torch import save
        rows, pos = self.where(batch)
        tensors = {name: acts[name][rows.to(acts[name].device), pos.to(acts[name].device)].cpu().contiguous()
                   for name in (site_name(layer, site) for layer in self.layers for site in self.sites)}
        tensors.update(row=rows.contiguous(), position=pos.contiguous(),
                       token=batch["input_ids"][rows, pos].contiguous())
        data = save(tensors, metadata={"checkpoint_step": str(step), "task": task, "batch": str(index)})
        if self.used + len(data) > self.budget:
            raise CogprobeError(
                f"raw activations would exceed raw_budget_bytes={self.budget} ({self.used} written, next shard "
                f"{len(data)}); raise the budget, or choose fewer raw_layers or raw_positions")
        path = self.root / f"step-{step}" / task / f"batch-{index:05d}.safetensors"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        self.used += len(data)
        return path


# ------------------------------------------------------------------ checkpoints

def _iter_checkpoints(checkpoints, tokenizer) -> Iterator[tuple[int, object, object]]:
    """(step, model, tokenizer), reference first, loaded one at a time when lazily available."""
    if hasattr(checkpoints, "load") and hasattr(checkpoints, "steps"):
        ref = checkpoints.reference_step
        for step in [ref] + [s for s in checkpoints.steps if s != ref]:
            yield (step, *checkpoints.load(step))  # no local keeps the previous model alive
        return
    for item in checkpoints:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise CogprobeError("checkpoints must be a Checkpoints or (step, model) / (step, model, tokenizer) "
                                f"tuples, reference first; got {type(item).__name__}")
        yield int(item[0]), item[1], item[2] if len(item) == 3 else tokenizer


def task_batches(examples: Mapping[str, Sequence], batch_size: int) -> dict[str, list[dict]]:
    """{task: collated batches}, longest examples first (less padding per batch)."""
    return {t: list(batches(sorted(ex, key=lambda e: -len(e.input_ids)), batch_size, pad_id=0))
            for t, ex in examples.items()}


def _check_batches(batches_by_task: Mapping[str, Sequence[dict]], alignment: bool = False) -> dict[str, list[dict]]:
    if not batches_by_task and not alignment:
        raise CogprobeError("no tasks to capture; give batches_by_task={'perception': [...], ...}")
    out = {}
    for task, given in batches_by_task.items():
        listed = list(given)  # re-iterated for every checkpoint
        if not listed:
            raise CogprobeError(f"task {task!r} has no batches; build them with cogprobe.data.tasks.batches")
        missing = {"input_ids", "attention_mask", "score_mask"} - set(listed[0])
        if missing:
            raise CogprobeError(f"task {task!r}: batches lack {sorted(missing)}; build them with "
                                "cogprobe.data.tasks.collate / batches")
        out[task] = listed
    return out


# ------------------------------------------------------------------ capture

@torch.no_grad()
def _lens(blocks, resid: torch.Tensor, batch: dict) -> tuple[float, int]:
    """Summed NLL of the scored tokens read from `resid` through final norm + head."""
    pred_mask, targets = scored_positions(batch)
    if not targets.numel():
        return 0.0, 0
    return nll_at_scored(blocks.decode(resid[pred_mask.to(resid.device)]), targets)


def _at(act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return act[mask.to(act.device)]


@dataclass
class _Pass:
    """What every checkpoint's pass shares: the batches, the keys, the reference's runner."""

    batches_by_task: dict[str, list[dict]]
    backend: str
    layers: list[int]
    sites: tuple[str, ...]
    ref_step: int
    ref_model: object
    run_ref: Callable[[dict], Acts]
    raw: RawWriter | None
    logit_lens: bool = True
    sentences: Sentences | None = None
    streaming: Streaming | None = None    # blocks read from the files (`streamed_acts`), not a backend
    align_steps: set[int] | None = None   # None: every checkpoint
    task_steps: set[int] | None = None    # the checkpoints whose task rows are wanted (None: every one)
    aligned: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"tasks": 0.0, "alignment": 0.0})
    ref_cache_bytes: int = 1 << 30   # the reference's activations kept for the next checkpoints, up to this
    _ref_acts: dict = field(default_factory=dict)
    _ref_bytes: int = 0

    def reference_acts(self, task: str, index: int, batch: dict, acts: Acts | None = None) -> Acts:
        """The reference's activations on one batch: computed once (or given, on the reference's own
        pass) and kept while they fit in `ref_cache_bytes`, so later checkpoints do not run the
        reference again. The same forward on the same batch: the same numbers."""
        key = (task, index)
        if key in self._ref_acts:
            return self._ref_acts[key]
        acts = self.run_ref(batch) if acts is None else acts
        size = sum(t.numel() * t.element_size() for t in acts.values() if isinstance(t, torch.Tensor))
        if self._ref_bytes + size <= self.ref_cache_bytes:
            self._ref_acts[key], self._ref_bytes = acts, self._ref_bytes + size
        return acts

    @property
    def keys(self) -> list[tuple[int, str]]:
        return [(layer, site) for layer in self.layers for site in self.sites]

    def checkpoint(self, step: int, model, tok) -> list[dict]:
        blocks, n_ref = find_blocks(model), find_blocks(self.ref_model).n
        if blocks.n != n_ref:
            raise CogprobeError(f"checkpoint {step} has {blocks.n} blocks, the reference {n_ref}; "
                                "all checkpoints must share the reference's architecture")
        if step == self.ref_step:  # compared with itself: one forward per batch
            return self.tasks(step, blocks, self.run_ref, None)
        own = (contextlib.nullcontext(self.run_ref) if model is self.ref_model  # one object: wrap it once
               else self.open(model, tok, step))
        with own as run:
            return self.tasks(step, blocks, run, self.run_ref)

    def open(self, model, tok, step: int):
        """The runner of `model`: a backend, or the streamed runner of the weights it stands for."""
        if self.streaming is None:
            return open_backend(self.backend, model, layers=self.layers, sites=self.sites, tokenizer=tok)
        return contextlib.nullcontext(self.streaming.runner(model, layers=self.layers, sites=self.sites,
                                                            plan=self.plan(step)))

    def plan(self, step: int) -> list[dict]:
        """The batches `step`'s pass reads, in the order it reads them (the reference's: all)."""
        tasks = self.ref_step == step or self.task_steps is None or step in self.task_steps
        aligned = self.sentences is not None and (self.ref_step == step or self.align_steps is None
                                                  or step in self.align_steps)
        return ([b for batches in self.batches_by_task.values() for b in batches] if tasks else []) + \
            (list(self.sentences.batches) if aligned else [])

    def tasks(self, step, blocks, run, run_ref) -> list[dict]:
        """Every task's rows, then (if asked) the alignment rows into `self.aligned`; both timed."""
        start = time.perf_counter()
        wanted = self.batches_by_task if self.task_steps is None or step in self.task_steps else {}
        rows = [r for task, b in wanted.items() for r in self.task(step, task, b, blocks, run, run_ref)]
        self.seconds["tasks"] += time.perf_counter() - start
        if self.sentences is not None and (self.align_steps is None or step in self.align_steps):
            start = time.perf_counter()
            pool = Pooler(self.layers)
            for batch in self.sentences.batches:
                pool.add(run(batch), batch)
            self.aligned += alignment_rows(step, pool.vectors(), self.sentences.n_pairs)
            self.seconds["alignment"] += time.perf_counter() - start
        return rows

    def task(self, step, task, batches, blocks, run, run_ref=None) -> list[dict]:
        """Stream one task's batches through the checkpoint (and the reference), then reduce."""
        sims = {key: Similarity() for key in self.keys}
        lens = {layer: [0.0, 0] for layer in self.layers if "resid" in self.sites and self.logit_lens}
        for index, batch in enumerate(batches):
            if run_ref is None and step == self.ref_step:   # the reference itself: keep what it computes
                acts, ref = self.reference_acts(task, index, batch), None
            else:
                acts = run(batch)
                ref = self.reference_acts(task, index, batch) if run_ref is not None else None
            real = batch["attention_mask"].bool()
            for key, sim in sims.items():
                name = site_name(*key)
                if ref is None:
                    sim.update(_at(acts[name], real))
                else:
                    sim.update(_at(ref[name], real), _at(acts[name], real))
            for layer, acc in lens.items():
                s, n = _lens(blocks, acts[site_name(layer, "resid")], batch)
                acc[0], acc[1] = acc[0] + s, acc[1] + n
            if self.raw is not None:
                self.raw.write(step, task, index, acts, batch)
            del acts, ref
        rows = [dict(checkpoint_step=step, block=layer, site=site, stat=stat, task=task, value=value)
                for (layer, site), sim in sims.items() for stat, value in sim.values().items()]
        rows += [dict(checkpoint_step=step, block=layer, site="resid", stat="logit_lens_nll", task=task,
                      value=s / n if n else float("nan")) for layer, (s, n) in lens.items()]
        return rows


def capture(checkpoints, batches_by_task: Mapping[str, Sequence[dict]], *, sites: Sequence[str] = CaptureOptions.sites,
            layers: Sequence[int] | None = None, backend: str = CaptureOptions.backend, tokenizer=None,
            raw_dir: str | Path | None = None, raw_layers: Sequence[int] = (),
            raw_positions: str | Sequence[int] = RAW_POSITIONS, raw_budget_bytes: int = 1 << 30,
            logit_lens: bool = True, log: Callable[[str], None] | None = None,
            ref_cache_bytes: int = 1 << 30) -> pd.DataFrame:
    """Tidy table (checkpoint_step, layer, site, stat, task, value) over every checkpoint.

    `checkpoints`: a `Checkpoints`, or (step, model) / (step, model, tokenizer) tuples with
    the reference first. `batches_by_task`: {task: batches from `cogprobe.tasks.batches`}.
    `layers`: block indices (default all). `backend`: torch | nnsight | transformerlens (the
    last two need the tokenizer: from `Checkpoints.load`, the tuples, or `tokenizer=`).
    Raw activations are written only when `raw_dir` and `raw_layers` are given.
    `logit_lens=False` leaves out the `logit_lens_nll` rows (and most of the cost).
    `ref_cache_bytes`: memory for the reference's activations, kept across checkpoints (0: rerun it).
    """
    return capture_tables(checkpoints, batches_by_task, None, sites=sites, layers=layers, backend=backend,
                    tokenizer=tokenizer, raw_dir=raw_dir, raw_layers=raw_layers, raw_positions=raw_positions,
                    raw_budget_bytes=raw_budget_bytes, logit_lens=logit_lens, log=log,
                    ref_cache_bytes=ref_cache_bytes)[0]


def capture_with_alignment(checkpoints, batches_by_task: Mapping[str, Sequence[dict]], sentences: Sentences, *,
                           align_steps: Sequence[int] | None = None, **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`capture`'s table and the alignment table (`cogprobe.alignment.COLUMNS`), from one pass over the
    checkpoints. `sentences`: from `alignment.sentence_batches`. `batches_by_task` may be empty: then
    only the alignment is computed. `align_steps`: the checkpoints to align (default all). Needs site
    `resid` (the default)."""
    if not isinstance(sentences, Sentences):
        raise CogprobeError("sentences must come from cogprobe.probe.alignment.sentence_batches(tokenizer, pairs)")
    acts, aligned, _ = capture_tables(checkpoints, batches_by_task, sentences, align_steps=align_steps, **kw)
    return acts, aligned


def capture_tables(checkpoints, batches_by_task, sentences, *, sites=CaptureOptions.sites, layers=None,
             backend=CaptureOptions.backend, tokenizer=None, raw_dir=None, raw_layers=(), raw_positions=RAW_POSITIONS,
             raw_budget_bytes=1 << 30, logit_lens=True, log=None, align_steps=None, task_steps=None, ref_cache_bytes=1 << 30,
             on_checkpoint=None, streaming: Streaming | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Both tables and the seconds spent on the tasks and on the alignment. `task_steps`: the
    checkpoints whose task rows are wanted (default all); `on_checkpoint(step, rows, aligned)`: each
    checkpoint's rows as it finishes (a caller that writes them as it goes). `streaming`: read every
    model's blocks from its files, a group of batches at a time (`streamed_acts`; `checkpoints` a
    `Checkpoints`), instead of loading it whole: the torch backend's numbers."""
    sites = check_sites(sites)
    if sentences is not None and "resid" not in sites:
        raise CogprobeError("alignment pools the residual stream: add 'resid' to the sites, or leave alignment out")
    batches_by_task = _check_batches(batches_by_task, alignment=sentences is not None)
    items = (streaming.checkpoints(checkpoints, tokenizer) if streaming is not None
             else _iter_checkpoints(checkpoints, tokenizer))
    try:
        ref_step, ref_model, ref_tok = next(items)
    except StopIteration:
        raise CogprobeError("no checkpoints to capture; give at least the reference") from None
    n = find_blocks(ref_model).n
    layers = check_indices(range(n) if layers is None else layers, n)
    raw = _raw_writer(raw_dir, raw_layers, layers, sites, raw_positions, raw_budget_bytes)
    rows: list[dict] = []
    seen: set[int] = set()
    plan = _Pass(batches_by_task, backend, layers, sites, ref_step, ref_model, None, raw, logit_lens,
                 sentences, streaming, None if align_steps is None else {int(s) for s in align_steps},
                 None if task_steps is None else {int(s) for s in task_steps}, ref_cache_bytes=ref_cache_bytes)
    with plan.open(ref_model, ref_tok, ref_step) as run_ref:
        plan.run_ref = run_ref
        for step, model, tok in _chain((ref_step, ref_model, ref_tok), items):
            if step in seen:
                raise CogprobeError(f"checkpoint step {step} appears twice; give each step once")
            seen.add(step)
            before, n_aligned = dict(plan.seconds), len(plan.aligned)
            mine = plan.checkpoint(step, model, tok)
            rows += mine
            if on_checkpoint is not None:
                on_checkpoint(step, pd.DataFrame(mine, columns=COLUMNS),
                              pd.DataFrame(plan.aligned[n_aligned:], columns=ALIGNMENT_COLUMNS))
            if log:
                spent = {k: v - before[k] for k, v in plan.seconds.items()}
                log(f"capture: step {step} ({backend} backend): tasks {spent['tasks']:.1f} s"
                    + (f", alignment {spent['alignment']:.1f} s" if spent["alignment"] else ""))
            if step != ref_step:  # only one checkpoint besides the reference is alive at a time
                del model
                gc.collect()
    return (pd.DataFrame(rows, columns=COLUMNS), pd.DataFrame(plan.aligned, columns=ALIGNMENT_COLUMNS),
            dict(plan.seconds))


def _chain(first, rest):
    yield first
    yield from rest


def _raw_writer(raw_dir, raw_layers, layers, sites, positions, budget) -> RawWriter | None:
    if raw_dir is None or not raw_layers:
        return None
    bad = sorted(set(raw_layers) - set(layers))
    if bad:
        raise CogprobeError(f"raw_layers {bad} are not among the captured layers {list(layers)}; "
                            "capture them too (layers=...) or drop them from raw_layers")
    return RawWriter(Path(raw_dir), sorted(set(raw_layers)), sites, positions, int(budget))


def write_activations(df: pd.DataFrame, run_dir: str | Path) -> Path:
    """Write the capture table to `run_dir/activations.parquet` atomically."""
    return _write_table(df, Path(run_dir) / ACTIVATIONS, COLUMNS, "a capture table")


def write_alignment(df: pd.DataFrame, run_dir: str | Path) -> Path:
    """Write the alignment table to `run_dir/alignment.parquet` atomically."""
    return _write_table(df, Path(run_dir) / ALIGNMENT, ALIGNMENT_COLUMNS, "an alignment table")


def _write_table(df: pd.DataFrame, path: Path, columns: list[str], what: str) -> Path:
    missing = set(columns) - set(df.columns)
    if missing:
        raise CogprobeError(f"not {what}: columns {sorted(missing)} are missing")
    write_parquet(path, df[columns])
    return path


__all__ = ["SITES", "STATS", "COLUMNS", "Similarity", "RawWriter", "capture", "capture_with_alignment",
           "write_activations", "write_alignment"]
