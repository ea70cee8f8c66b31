"""The in-memory forms of the verbs, for notebooks: objects in, a tidy DataFrame or a `Selection` out,
nothing written. Each takes the same options dataclass as its folder form (`sweep_run`, ...) and the
command line, or that dataclass's fields as keywords:

    ckpts = cogprobe.Checkpoints.open("runs/x")
    dev = cogprobe.EvalSet(corpus="axolotl", split="dev", n=64)
    table = cogprobe.sweep(ckpts, dev, ks=range(0, 31, 2))
    chosen = cogprobe.select(table, rule="curves", tau=0.8)

`ablate` is the paper's experiment without a sweep: a model with some blocks reverted to a
reference's weights (or skipped), restored on exit.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
from torch import nn

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import with_changes
from cogprobe.core.layout import COMPARE, SCORES
from cogprobe.data.evalset import EvalSet
from cogprobe.models.blocks import SkipBlock, check_indices, find_blocks, swapped
from cogprobe.models.layersets import resolve
from cogprobe.probe.alignment import sentence_batches
from cogprobe.probe.capture import capture_tables, task_batches
from cogprobe.probe.fit import capture_engine
from cogprobe.probe.options import DTYPES, CaptureOptions, SweepOptions
from cogprobe.probe.sweep import sweep as sweep_engine
from cogprobe.probe.tables import open_checkpoints
from cogprobe.selection.options import RANKINGS, SelectOptions
from cogprobe.selection.rankings import select_ranking
from cogprobe.selection.rules import Selection, select_curves, select_fixed
from cogprobe.study.verdicts import comparison_table


def sweep(checkpoints, evalset: EvalSet, options: SweepOptions | None = None, **changes) -> pd.DataFrame:
    """Every checkpoint swept on `evalset` (a `Checkpoints`, a run folder or a list of model folders):
    one row per (checkpoint, task, direction, k), as `sweeps.parquet` holds them."""
    o = with_changes(SweepOptions, options, changes)
    ckpts = open_checkpoints(checkpoints)
    with ckpts.precision(DTYPES[o.dtype]):
        examples = evalset.examples(ckpts.reference_tokenizer(), o.tasks)
        return sweep_engine(ckpts, examples, mode=o.mode, directions=o.directions, ks=o.ks, ends=o.ends,
                            engine=o.engine, batch_size=o.batch_size, max_memory=o.max_memory)


def capture(checkpoints, evalset: EvalSet, options: CaptureOptions | None = None,
            **changes) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drift, CKA, norms and logit lens of every checkpoint's blocks on `evalset`, and (unless
    `alignment=False`, then an empty table) the cross-lingual alignment of the blocks."""
    o = with_changes(CaptureOptions, options, changes)
    ckpts = open_checkpoints(checkpoints)
    with ckpts.precision(DTYPES[o.dtype]):
        tok = ckpts.reference_tokenizer()
        examples = evalset.examples(tok)
        streaming, _ = capture_engine(o, ckpts, examples)
        sentences = sentence_batches(tok, evalset.pairs(tok), o.batch_size) if o.alignment else None
        acts, aligned, _ = capture_tables(ckpts, task_batches(examples, o.batch_size), sentences, sites=o.sites,
                                          backend=o.backend, streaming=streaming, tokenizer=tok)
    return acts, aligned


def select(table: pd.DataFrame, options: SelectOptions | None = None, *, n_blocks: int | None = None,
           **changes) -> Selection:
    """A layer set from a table already in memory: `fixed` needs only `n_blocks`; `curves` reads a
    sweeps table; a ranking rule reads a rankings table. The budget rule scores new candidates:
    use `select_run` on a run folder."""
    o = with_changes(SelectOptions, options, changes)
    if o.rule == "fixed":
        if n_blocks is None:
            raise CogprobeError("rule fixed needs n_blocks (the model's block count)")
        return select_fixed(n_blocks, o.fraction)
    if o.rule == "curves":
        return select_curves(table, tau=o.tau, step=o.step, input_task=o.input_task, output_task=o.output_task,
                             n_layers=n_blocks, criterion=o.criterion)
    if o.rule in RANKINGS:
        n = n_blocks if n_blocks is not None else int(table["block"].max()) + 1
        return select_ranking(table, o.rule, n_layers=n, step=o.step, fraction=o.fraction,
                              tau=o.tau if o.by_tau else None)
    raise CogprobeError(f"rule {o.rule!r} scores candidates on a model: use cogprobe.select_run(run, rule=...)")


def compare(study: str | Path) -> pd.DataFrame:
    """A study folder's comparison with 95% intervals: every (row, seed, task, quantity), as the
    report states them (`verdicts.comparison_table`)."""
    study = Path(study)
    for name in (COMPARE, SCORES):
        if not (study / name).is_file():
            raise CogprobeError(f"no {name} in {study}; give a study folder that `cogprobe run` wrote")
    rows = io.read_parquet(study / COMPARE)[["row", "seed"]]
    return comparison_table(io.read_parquet(study / SCORES), list(rows.itertuples(index=False, name=None)))


@contextlib.contextmanager
def ablate(model: nn.Module, reference: nn.Module | None, blocks: Iterable[int] | str,
           mode: str = SweepOptions.mode) -> Iterator[nn.Module]:
    """`model` with `blocks` (indices or a layer-set string such as "0-3,26-29") run by `reference`'s
    weights (`revert`) or skipped (`skip`, identity; no reference needed), restored on exit, also on
    error. The reference's block modules are borrowed, not copied: keep both models on one device."""
    mb = find_blocks(model)
    chosen = (resolve(blocks, mb.n) if isinstance(blocks, str) else check_indices(blocks, mb.n))
    if mode == "skip":
        replacements = {i: SkipBlock(mb.modules[i]) for i in chosen}
    elif mode == "revert":
        if reference is None:
            raise CogprobeError("mode revert needs the reference model whose blocks run instead")
        rb = find_blocks(reference)
        if rb.n != mb.n:
            raise CogprobeError(f"the reference has {rb.n} blocks and the model {mb.n}; give the model's own base")
        replacements = {i: rb.modules[i] for i in chosen}
    else:
        raise CogprobeError(f"ablation mode {mode!r}: use revert or skip")
    with swapped(mb, replacements):
        yield model
