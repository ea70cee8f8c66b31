"""Selecting a layer set from a run folder: the function behind `cogprobe select RUN`.

The fixed rule needs only the block count; the curves rule reads the sweeps table (a full grid below
its answer: it refuses an adaptive one's gaps); the budget rule scores keep-outer candidates (reusing
those the sweeps table already holds, on any grid); a cheap ranking reads
rankings.parquet. The set is written to `selection.json` with the evaluation set it was chosen on.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import with_changes
from cogprobe.core.layout import SWEEPS, metadata
from cogprobe.core.progress import bar
from cogprobe.data.evalset import EvalSet
from cogprobe.data.tasks import CONTROLS, TASKS
from cogprobe.models.layersets import check_fraction
from cogprobe.probe.conditional import conditional_rows
from cogprobe.probe.engine import largest_batch
from cogprobe.probe.fit import block_count, pick, skeleton_for
from cogprobe.probe.streamed import StreamedEngine
from cogprobe.probe.sweep import FastEngine, sweep
from cogprobe.probe.tables import identity, open_checkpoints, out_dir, source_id, wanted
from cogprobe.selection.options import DERIVED, RANKINGS, RULES, SelectOptions
from cogprobe.selection.rankings import select_ranking_run
from cogprobe.selection.rules import (Selection, budget_decider, curves_decider, select_budget, select_curves,
                                      select_fixed, sweep_candidates)
from cogprobe.selection.stability import stability
from cogprobe.tuning.checkpoints import Checkpoints


def rules() -> list[str]:
    """Every rule `select_run` takes, the three of `rules` then each cheap ranking: `cogprobe ls rules`."""
    return list(RULES)


def select_run(source, options: SelectOptions | None = None, *, evalset: EvalSet | None = None, out=None, base=None,
               device=None, log=print, progress: bool = True, checkpoints: Checkpoints | None = None,
               **changes) -> Selection:
    """A CogSym layer set by `rule` (fixed | curves | budget, or a cheap ranking of `rank`: the top
    blocks of rankings.parquet, CogSym's size unless `by_tau`), written to `selection.json`.

    The budget rule reads the candidates that `sweeps.parquet` in `out` already scored (a revert
    sweep without --ends of the same checkpoint, tasks and evaluation set), instead of scoring them
    again, and searches the rest by `search` (frontier | exhaustive, see `select_budget`). `changes`:
    fields of `SelectOptions` given as keywords, on top of `options`."""
    o = with_changes(SelectOptions, options, changes)
    rule, tau, fraction, step, name = o.rule, o.tau, o.fraction, o.step, o.name
    check_fraction(tau, "tau")
    if not str(name).endswith(".json"):
        raise CogprobeError(f"selection name {name!r} must end in .json (that is how --layers recognises it)")
    if rule in RANKINGS:
        selection = select_ranking_run(source, rule, out=out, step=step, fraction=fraction,
                                       tau=tau if o.by_tau else None)
        io.write_json(out_dir(source, out) / name, selection.to_json())
        return selection
    if rule not in DERIVED:
        raise CogprobeError(f"unknown rule {rule!r}; use fixed, curves, budget or a ranking ({', '.join(RANKINGS)})")
    ckpts = checkpoints or open_checkpoints(source, base, device)
    out = out_dir(source, out)
    n_layers = block_count(ckpts)
    record: dict = {}
    if rule == "fixed":
        selection = select_fixed(n_layers, fraction)
    elif rule == "curves":
        if not (out / SWEEPS).exists():
            raise CogprobeError(f"no {SWEEPS} in {out}; run `cogprobe sweep {source}` first, or use --rule fixed")
        sweeps = io.read_parquet(out / SWEEPS)
        selection = select_curves(sweeps, tau=tau, step=step, input_task=o.input_task, output_task=o.output_task,
                                  n_layers=n_layers, criterion=o.criterion, gain=o.gain)
        meta = metadata(out / SWEEPS)
        record["evalset"] = ({k: v for k, v in identity(io.read_json(meta)).items() if k != "source"}
                             if meta.is_file() else None)
        rows = sweeps[(sweeps["mode"] == "revert") & (sweeps["checkpoint_step"] == selection.params["step"])]
        rows = conditional_rows(rows) if o.gain == "conditional" else rows   # resampled pairwise with the controls
        selection.stability = _stability(curves_decider(tau, input_task=o.input_task, output_task=o.output_task,
                                                        n_layers=n_layers, criterion=o.criterion, gain=o.gain),
                                         selection, rows)
    else:
        evalset = evalset or EvalSet.for_run(source)
        step = ckpts.steps[-1] if step is None else step
        known = _swept_candidates(out, evalset, source_id(source, ckpts), step, n_layers, o.gain)
        with bar("select budget", total=None, unit="candidate", enabled=progress) as ticks:
            selection, rows = _budget(ckpts, n_layers, tau=tau, step=step, max_total=o.max_total,
                                      batch_size=o.batch_size, evalset=evalset, known=known, search=o.search,
                                      log=log, on_scored=ticks.update, engine=o.engine, max_memory=o.max_memory,
                                      gain=o.gain)
        record["evalset"] = evalset.to_dict()
        pairs = [(c["k_in"], c["k_out"]) for c in selection.candidates]
        selection.stability = _stability(budget_decider(tau, selection.params["tasks"], pairs), selection, rows)
    io.write_json(out / name, {**selection.to_json(), **record})
    return selection


def _stability(decide, selection: Selection, rows: pd.DataFrame) -> dict | None:
    """The rule rerun on resamples of the probe pairs (None for tables written before per-example scores)."""
    if "example_nll" not in rows.columns or rows["example_nll"].isna().any():
        return None
    return stability(decide, rows.reset_index(drop=True), (selection.k_in, selection.k_out))


def _swept_candidates(out: Path, evalset: EvalSet, source: dict, step: int, n_layers: int,
                      gain: str = SelectOptions.gain) -> pd.DataFrame | None:
    """The budget candidates the sweep table in `out` holds for `step` (None if it holds none of
    this evaluation set and these checkpoints, or lacks a task, a control the gain needs, or a
    per-example column)."""
    path = out / SWEEPS
    if not path.exists() or not metadata(path).is_file():
        return None
    if identity(io.read_json(metadata(path))) != wanted(evalset, source):
        return None
    tasks = _tasks(gain)
    rows = sweep_candidates(io.read_parquet(path), step, n_layers)
    rows = rows[rows["task"].isin(tasks)]
    if set(rows["task"]) != set(tasks) or rows["example_nll"].isna().any():
        return None
    # an adaptive grid (`probe.grid`) refines each task's curve on its own: a k one task has alone is
    # no candidate yet (the search scores it for every task if it needs it)
    every_task = rows.groupby(["k_in", "k_out"])["task"].transform("nunique") == len(tasks)
    return rows[every_task]


def _tasks(gain: str) -> tuple[str, ...]:
    """The tasks a budget search scores: the conditional gain needs each task's shuffled control too."""
    return (*TASKS, *CONTROLS) if gain == "conditional" else TASKS


def _budget(ckpts: Checkpoints, n_layers: int, *, tau, step, max_total, batch_size, evalset, known, search,
            log, on_scored, engine=SelectOptions.engine, max_memory=None,
            gain=SelectOptions.gain) -> tuple[Selection, pd.DataFrame]:
    """The budget set and every keep-outer row it read or scored, in the view the rule read them (their
    per-example scores feed the stability check). In memory, one engine serves the whole search
    (reference prefixes scored once, the checkpoint's kept); streamed, each batch of candidates reads
    the blocks from the files again."""
    if step == ckpts.reference_step:
        raise CogprobeError("the budget rule needs a trained checkpoint besides the reference; train longer "
                            "or pass --step")
    streamed = _streamed_runner(engine, ckpts, evalset, batch_size, n_layers, max_memory, _tasks(gain))
    if streamed is not None:
        examples, source, runner = evalset.examples(ckpts.reference_tokenizer(), _tasks(gain)), ckpts, streamed
    else:
        ref, tok = ckpts.load(ckpts.reference_step)
        model = ckpts.load(step)[0]
        examples = evalset.examples(tok, _tasks(gain))
        source, runner = [(ckpts.reference_step, ref), (step, model)], FastEngine(ref)

    scored = [] if known is None else [known]

    most = 2 * n_layers if streamed is not None else None   # the streamed engine's memory was fit to this many

    def evaluate(pairs):
        log(f"select: scoring {len(pairs)} candidate(s): {pairs}")
        parts = [pairs[i:i + most] for i in range(0, len(pairs), most)] if most else [pairs]
        t = pd.concat([sweep(source, examples, mode="keep-outer", keep_outer=part, batch_size=batch_size,
                             steps=[step], runner=runner, remember=True) for part in parts], ignore_index=True)
        scored.append(t[t["checkpoint_step"] == step])
        on_scored(len(pairs))
        return scored[-1]

    selection = select_budget(evaluate, n_layers, tau=tau, max_total=max_total, search=search, known=known, gain=gain)
    rows = pd.concat(scored, ignore_index=True)
    return selection, conditional_rows(rows) if gain == "conditional" else rows


def _streamed_runner(engine: str, ckpts: Checkpoints, evalset: EvalSet, batch_size: int, n_layers: int,
                     max_memory, tasks=TASKS) -> StreamedEngine | None:
    """The streamed engine where `engine` asks for it or (auto) two models do not fit; else None."""
    skeleton = skeleton_for(engine, ckpts)
    if skeleton is None:
        return None
    examples = evalset.examples(ckpts.reference_tokenizer(), tasks)
    _, _, runner = pick(engine, ckpts, skeleton, max_memory=max_memory,
                             batch_tokens=largest_batch(examples, batch_size), n_configs=2 * n_layers)
    return runner
