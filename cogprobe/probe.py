"""Probing a run folder: sweeps, capture and layer selection, each writing its table there.

These are the functions behind `cogprobe sweep|capture|select RUN`. They read the
evaluation data from the run's manifest (same corpus, columns, split seed and
sentence bound as training), so a run folder is all they need. Any other
checkpoint source (an HF Trainer folder, a list of model folders) works too,
given the corpus and an `out` folder.

Every table is appended per finished checkpoint and written atomically, so an
interrupted call loses at most one checkpoint's work and a rerun continues: a
checkpoint whose rows are already there (for the same mode and `ends`) is not
recomputed. The evaluation set and the checkpoints' source (a run's config and
base model) are recorded next to the table; a rerun with different ones, or a
sweep with other tasks, directions or ks, is refused unless `overwrite`. Bad
requests and data fail before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from cogprobe import io
from cogprobe.backends import check_sites
from cogprobe.blocks import find_blocks
from cogprobe.capture import ACTIVATIONS, capture
from cogprobe.checkpoints import MANIFEST, Checkpoints
from cogprobe.corpora import load_corpus, split_corpus
from cogprobe.errors import CogprobeError
from cogprobe.layersets import check_fraction
from cogprobe.select import Selection, select_budget, select_curves, select_fixed
from cogprobe.sweep import DIRECTIONS, FastEngine, sweep, sweep_configs
from cogprobe.tasks import TASKS, batches, build_examples
from cogprobe.trainconfig import NOT_IDENTITY

SWEEPS = "sweeps.parquet"
SELECTION = "selection.json"


@dataclass(frozen=True)
class EvalSet:
    """Which held-out pairs a probe scores: recorded beside each table it writes."""
    corpus: str = "axolotl"
    split: str = "test"
    limit: int = 32                 # pairs per task
    max_sentence_tokens: int = 32
    split_seed: int = 0
    pivot_col: str | None = None
    target_col: str | None = None

    @classmethod
    def for_run(cls, source, **overrides) -> "EvalSet":
        """The run's own corpus settings (from manifest.json), with `overrides` on top."""
        manifest = Path(source) / MANIFEST if isinstance(source, (str, Path)) else None
        base = {}
        if manifest is not None and manifest.is_file():
            cfg = io.read_json(manifest)["config"]
            base = dict(corpus=str(cfg["corpus"]), split_seed=cfg.get("split_seed", 0),
                        pivot_col=cfg.get("pivot_col"), target_col=cfg.get("target_col"))
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def examples(self, tokenizer, tasks: Sequence[str] = TASKS) -> dict:
        data = split_corpus(load_corpus(self.corpus, pivot_col=self.pivot_col, target_col=self.target_col),
                            seed=self.split_seed)
        part = getattr(data, self.split)
        return {t: build_examples(tokenizer, part, t, limit=self.limit,
                                  max_sentence_tokens=self.max_sentence_tokens) for t in tasks}


def open_checkpoints(source, base=None) -> Checkpoints:
    return source if isinstance(source, Checkpoints) else Checkpoints.open(source, base=base)


def _out_dir(source, out) -> Path:
    if out is not None:
        return Path(out)
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        return Path(source)
    raise CogprobeError("these checkpoints are not a cogprobe run folder; pass --out DIR for the tables")


def _source_id(source, ckpts: Checkpoints) -> dict:
    """What a table's rows come from: a run's config and base model (so a moved run folder is the
    same run, a retrained one with other settings is not), else the checkpoint folders."""
    if isinstance(source, (str, Path)) and (Path(source) / MANIFEST).is_file():
        manifest = io.read_json(Path(source) / MANIFEST)
        config = {k: v for k, v in manifest["config"].items() if k not in NOT_IDENTITY}
        return dict(run=config, base=manifest["base"]["fingerprint"])
    return dict(checkpoints=ckpts.source)


def _claim_table(out: Path, table: str, evalset: EvalSet, source: dict, overwrite: bool) -> None:
    """Refuse to mix rows of other checkpoints or another evaluation set into an existing table."""
    meta_path = out / f"{table}.json"
    want = json.loads(json.dumps(dict(asdict(evalset), source=source), default=str))
    if (out / table).exists() and meta_path.exists() and not overwrite:
        have = io.read_json(meta_path)
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise CogprobeError(f"{out / table} holds rows of other checkpoints or another evaluation set (differs "
                                f"in {', '.join(diff)}); pass the same run and options, another --out, or "
                                "--overwrite to start the table again")
    if overwrite:
        (out / table).unlink(missing_ok=True)
    if not meta_path.exists() or io.read_json(meta_path) != want:
        io.write_json(meta_path, want)


def sweep_run(source, *, mode: str = "revert", directions: Sequence[str] = DIRECTIONS, tasks: Sequence[str] = TASKS,
              ks: Sequence[int] | None = None, ends: bool = False, engine: str = "fast", batch_size: int = 8,
              evalset: EvalSet | None = None, out=None, base=None, overwrite: bool = False,
              log=print) -> pd.DataFrame:
    """Revert/skip sweeps of every checkpoint into `sweeps.parquet`; returns the whole table."""
    ckpts = open_checkpoints(source, base)
    out = _out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    reference, tok = ckpts.base()
    configs = sweep_configs(find_blocks(reference).n, mode=mode, directions=directions, ks=ks, ends=ends)
    examples = evalset.examples(tok, tasks)
    _claim_table(out, SWEEPS, evalset, _source_id(source, ckpts), overwrite)
    path = out / SWEEPS
    done = _done_steps(path, mode, ends, {(t, c.labels["direction"], c.labels["k"]) for t in tasks for c in configs})
    todo = [s for s in ckpts.steps if s not in done]
    if not todo:
        log(f"sweep: every checkpoint of {out} is already in {SWEEPS}")
        return pd.read_parquet(path)

    def save(step, rows):
        log(f"sweep: step {step} done ({len(rows)} rows)")
        io.append_parquet(path, rows)

    sweep(ckpts, examples, mode=mode, directions=directions, ks=ks, ends=ends, engine=engine,
          batch_size=batch_size, steps=todo, on_checkpoint=save)
    return pd.read_parquet(path)


def _done_steps(path: Path, mode: str, ends: bool, want: set[tuple]) -> set[int]:
    """Steps already swept (same mode, ends); refused if their (task, direction, k) rows are not `want`."""
    if not path.exists():
        return set()
    t = pd.read_parquet(path)
    t = t[(t["mode"] == mode) & (t["ends"] == ends)]
    for step, rows in t.groupby("checkpoint_step"):
        if set(zip(rows["task"], rows["direction"], rows["k"].astype(int))) != want:
            raise CogprobeError(f"{path} holds a {mode} sweep of step {step} with other tasks, directions or ks; "
                                "pass the same options as before, another --out, or --overwrite")
    return set(t["checkpoint_step"].unique())


def capture_run(source, *, sites: Sequence[str] = ("resid",), backend: str = "torch", batch_size: int = 8,
                evalset: EvalSet | None = None, out=None, base=None, overwrite: bool = False,
                log=print) -> pd.DataFrame:
    """Drift, CKA, norms and logit lens of every checkpoint into `activations.parquet`."""
    ckpts = open_checkpoints(source, base)
    out = _out_dir(source, out)
    evalset = evalset or EvalSet.for_run(source)
    check_sites(sites)
    examples = evalset.examples(ckpts.base()[1])  # bad data fails before anything is written
    _claim_table(out, ACTIVATIONS, evalset, _source_id(source, ckpts), overwrite)
    path = out / ACTIVATIONS
    done = set(pd.read_parquet(path)["checkpoint_step"].unique()) if path.exists() else set()
    todo = [s for s in ckpts.steps if s not in done]
    if not todo:
        log(f"capture: every checkpoint of {out} is already in {ACTIVATIONS}")
        return pd.read_parquet(path)
    ref_step = ckpts.reference_step
    ref, tok = ckpts.load(ref_step)
    batched = {t: list(batches(sorted(ex, key=lambda e: -len(e.input_ids)), batch_size, pad_id=0))
               for t, ex in examples.items()}
    for step in todo:
        model = ref if step == ref_step else ckpts.load(step)[0]
        rows = capture([(ref_step, ref, tok), (step, model, tok)] if step != ref_step else [(ref_step, ref, tok)],
                       batched, sites=sites, backend=backend)
        io.append_parquet(path, rows[rows["checkpoint_step"] == step])
        log(f"capture: step {step} done")
    return pd.read_parquet(path)


def select_run(source, *, rule: str = "budget", tau: float = 0.8, fraction: float = 0.25, step: int | None = None,
               input_task: str = "perception", output_task: str = "production", max_total: int | None = None,
               batch_size: int = 8, evalset: EvalSet | None = None, out=None, base=None,
               name: str = SELECTION, log=print) -> Selection:
    """A CogSym layer set by `rule` (fixed | curves | budget), written to `selection.json`."""
    check_fraction(tau, "tau")
    if rule not in ("fixed", "curves", "budget"):
        raise CogprobeError(f"unknown rule {rule!r}; use fixed, curves or budget")
    ckpts = open_checkpoints(source, base)
    out = _out_dir(source, out)
    n_layers = ckpts.base()[0].config.get_text_config().num_hidden_layers
    if rule == "fixed":
        selection = select_fixed(n_layers, fraction)
    elif rule == "curves":
        if not (out / SWEEPS).exists():
            raise CogprobeError(f"no {SWEEPS} in {out}; run `cogprobe sweep {source}` first, or use --rule fixed")
        selection = select_curves(pd.read_parquet(out / SWEEPS), tau=tau, step=step, input_task=input_task,
                                  output_task=output_task, n_layers=n_layers)
    else:
        selection = _budget(ckpts, n_layers, tau=tau, step=step, max_total=max_total, batch_size=batch_size,
                            evalset=evalset or EvalSet.for_run(source), log=log)
    io.write_json(out / name, selection.to_json())
    return selection


def _budget(ckpts: Checkpoints, n_layers: int, *, tau, step, max_total, batch_size, evalset, log) -> Selection:
    step = ckpts.steps[-1] if step is None else step
    if step == ckpts.reference_step:
        raise CogprobeError("the budget rule needs a trained checkpoint besides the reference; train longer "
                            "or pass --step")
    ref, tok = ckpts.load(ckpts.reference_step)
    model = ckpts.load(step)[0]
    examples = evalset.examples(tok)
    runner = FastEngine(ref)  # one engine for the whole search: reference prefixes are scored once

    def evaluate(pairs):
        log(f"select: scoring {len(pairs)} candidate(s) of size {sum(pairs[0])}")
        t = sweep([(ckpts.reference_step, ref), (step, model)], examples, mode="keep-outer", keep_outer=pairs,
                  batch_size=batch_size, steps=[step], runner=runner)
        return t[t["checkpoint_step"] == step]

    return select_budget(evaluate, n_layers, tau=tau, max_total=max_total)
