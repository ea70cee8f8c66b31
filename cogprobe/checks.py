"""`cogprobe verify RUN|STUDY`: check a folder the way `git fsck` checks a repository.

Every file is read with the same checks the verbs use (see `artifacts`), but
instead of stopping at the first damaged one, each problem becomes one line, so
one call lists everything that needs fixing:
  - the manifest, and every checkpoint it lists (up to the last one written);
  - each checkpoint's files against the SHA-256s its meta.json recorded when they
    were written (a weight file without one is a problem), its kind against its step and
    files, and its base model fingerprint against the manifest's;
  - the base model itself, rehashed, against the manifest's fingerprint (never a cached hash);
  - the manifest's layer set against its config and the blocks the checkpoints store;
  - the training log (every step once, in order; each checkpoint's loss and tokens
    seen are the log's) and cost.json (as many steps as the log); a run stopped on a plateau is
    finished at the step its manifest's stop record names;
  - the dev curve, if any: readable, with its set's record, each (step, task) once;
  - every table and its metadata: readable, no duplicate rows, rows only from
    checkpoints of this run, computed from this run's config;
  - the training health the manifest recorded (a stopped or diverged run);
  - a study: study.json, baseline.csv, compare.parquet, its selections, tables and
    every tuned run under runs/.
Nothing is written. An empty list means all is well.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cogprobe.core import io
from cogprobe.core.artifacts import damaged
from cogprobe.models.loading import EMBEDDED, embedded_dir, model_fingerprint
from cogprobe.tuning.checkpoints import CHECKPOINTS, META, layer_problems, problems, step_dir, step_folders
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import (ACTIVATIONS, BASELINE, COMPARE, COST, DEV_CURVE, MANIFEST, RUNS, STOP, STUDY, SWEEPS,
                             TRAIN_LOG, arm, metadata)
from cogprobe.tuning.config import EXECUTION_ONLY, current

TABLES = {SWEEPS: ["checkpoint_step", "task", "direction", "mode", "k", "ends"],
          ACTIVATIONS: ["checkpoint_step", "block", "site", "stat", "task"]}
Problems = list[str]


def verify(folder: str | Path) -> Problems:
    """One line per problem in a run folder or study folder; empty when all is well."""
    folder = Path(folder)
    if (folder / MANIFEST).exists() or (folder / CHECKPOINTS).is_dir():
        return verify_run(folder)
    if (folder / STUDY).exists() or (folder / "runs").is_dir():
        return verify_study(folder)
    if folder.is_dir() and any((folder / t).exists() for t in TABLES):
        return verify_tables(folder, None)
    raise CogprobeError(f"{folder} is neither a cogprobe run (manifest.json), a study (study.json) nor a folder "
                        "of tables; give the folder that `cogprobe train`, `run` or `sweep --out` wrote")


def _read(found: Problems, read: Callable, *args):
    """`read(*args)`, or None with its one-line error added to `found`."""
    try:
        return read(*args)
    except CogprobeError as e:
        found.append(str(e))
        return None


# ------------------------------------------------------------------ a run


def verify_run(run: Path) -> Problems:
    found: Problems = []
    manifest = _read(found, io.read_json, run / MANIFEST)
    metas = _checkpoints(run, manifest, found)
    found += _log_and_cost(run, metas, manifest)
    found += _dev_curve(run)
    if manifest is not None:
        found += _health_problems(run, manifest)
        found += [str(damaged(file, problem)) for file, problem in layer_problems(run, manifest)]
        found += _base_problems(run, manifest)
    found += _selections(run)
    return found + verify_tables(run, (set(metas), manifest))


def _log_and_cost(run: Path, metas: dict[int, dict], manifest: dict | None) -> Problems:
    """A run with a checkpoint past step 0 has written its log and cost.json: the log holds every step
    once and agrees with the checkpoints; a finished run's cost.json counts the log's steps, and its
    trainable parameters are the manifest's."""
    found: Problems = []
    trained = any(metas)
    log = _read(found, io.read_parquet, run / TRAIN_LOG) if trained or (run / TRAIN_LOG).exists() else None
    cost = _read(found, io.read_json, run / COST) if trained or (run / COST).exists() else None
    if log is not None:
        found += _log_problems(run, log, metas)
    finished = manifest is not None and max(metas, default=0) == _final_step(manifest)
    if finished and cost is not None and log is not None and cost.get("steps_logged") != len(log):
        found.append(str(damaged(run / COST, f"counts {cost.get('steps_logged')} steps, the log has {len(log)}")))
    params = (manifest or {}).get("trainable_params")
    if cost is not None and params is not None and cost.get("trainable_params") != params:  # a study copies it
        found.append(str(damaged(run / COST, f"counts {cost.get('trainable_params')} trainable parameters, the "
                                             f"manifest {params}")))
    return found


def _checkpoints(run: Path, manifest: dict | None, found: Problems) -> dict[int, dict]:
    """Each checkpoint's meta.json (those readable), its files' problems added to `found`; and every
    step the manifest lists, up to the last checkpoint written, is present."""
    metas = {}
    for step, path in step_folders(run):
        meta = _read(found, io.read_json, path / META)
        if meta is None:
            continue
        metas[step] = meta
        found += [str(damaged(file, problem)) for file, problem in problems(path, meta)]
        fingerprint = (manifest or {}).get("base", {}).get("fingerprint")
        if fingerprint and meta.get("base_fingerprint") != fingerprint:
            found.append(str(damaged(path / META, "names another base model than the manifest")))
        strategy = (manifest or {}).get("strategy")
        if strategy and meta.get("strategy", strategy) != strategy:
            found.append(str(damaged(path / META, f"names strategy {meta['strategy']!r}, the manifest {strategy!r}")))
    if manifest is None:
        return metas
    last, total = max(metas, default=0), _final_step(manifest)
    for step in manifest["save_steps"]:
        if step <= last and not step_dir(run, step).is_dir():
            found.append(f"{step_dir(run, step)} is missing (manifest.json lists it); retrain with "
                         "`cogprobe train ... --overwrite`, or ignore it if you deleted it on purpose")
    if last < total and not _stopped(manifest):
        found.append(f"{run} is an unfinished run (last checkpoint step-{last} of {total} steps); rerun the same "
                     "`cogprobe train` with --resume to finish it")
    return metas


def _base_problems(run: Path, manifest: dict) -> Problems:
    """The base model the run was trained from, rehashed (never from a cache or a record): checkpoints
    store only what training changed, so every number of the run is also a number of the base's bytes."""
    info = manifest["base"]
    embedded = info.get("spec") == EMBEDDED
    path = embedded_dir() if embedded else Path(str(info.get("path")))
    fix = ("run `cogprobe prepare` to prepare it again" if embedded else
           "put the base model the run was trained from back at that path")
    if not path.exists():
        return [f"{path}, the base model of {run}, is missing, so the run cannot be checked or read; {fix}"]
    try:
        found = model_fingerprint(path, fresh=True)
    except (OSError, CogprobeError) as e:
        return [f"{path}, the base model of {run}, cannot be read ({e}); {fix}"]
    if found != info["fingerprint"]:
        return [f"{path}, the base model of {run}, has weights whose SHA-256 ({found[:12]}) is not the one the "
                f"run was trained from ({info['fingerprint'][:12]}, in its manifest.json); {fix}"]
    return []


def _final_step(manifest: dict) -> int:
    """The step of a run's final checkpoint: where it stopped (a plateau), else its `steps`."""
    return manifest.get(STOP, {}).get("stopped_at", manifest["config"]["steps"])


def _dev_curve(run: Path) -> Problems:
    """The dev curve (when there is one) and its set's record read back; each (step, task) once."""
    path, found = run / DEV_CURVE, []
    if not path.exists():
        return found
    table = _read(found, io.read_parquet, path)
    _read(found, io.read_json, metadata(path))
    if table is None:
        return found
    if table.duplicated(["step", "task"]).any():
        found.append(str(damaged(path, "holds some rows twice")))
    return found


def _log_problems(run: Path, log, metas: dict[int, dict]) -> Problems:
    path, steps = run / TRAIN_LOG, list(log["step"])
    if steps != list(range(1, len(steps) + 1)):
        return [str(damaged(path, "does not hold every step once, in order"))]
    losses, tokens = dict(zip(log["step"], log["loss"])), dict(zip(log["step"], log["tokens"]))
    wrong = [s for s, m in metas.items() if s and s in losses and m.get("train_loss") != losses[s]]
    miscounted = [s for s, m in metas.items() if s and s in tokens and m.get("tokens_seen") != tokens[s]]
    short = [s for s in metas if s > len(steps)]
    found = []
    if wrong:
        found.append(str(damaged(path, f"disagrees with the checkpoints' losses at step(s) {wrong}")))
    if miscounted:
        found.append(str(damaged(path, f"disagrees with the checkpoints' tokens seen at step(s) {miscounted}")))
    if short:
        found.append(str(damaged(path, f"ends at step {len(steps)}, before checkpoint(s) {short}")))
    return found


def _stopped(manifest: dict) -> bool:
    """A run with a health event that ended early stopped on purpose: its line says why, not "resume it"."""
    return bool(manifest.get("health", {}).get("events"))


def _health_problems(run: Path, manifest: dict) -> Problems:
    """A run that stopped on a non-finite value, or diverged, is not well even if every file is."""
    return [f"{run}: {event['message']}" for event in manifest.get("health", {}).get("events", [])]


def _selections(folder: Path) -> Problems:
    found: Problems = []
    for path in sorted(folder.glob("selection*.json")):
        _read(found, io.read_json, path)
    return found


# ------------------------------------------------------------------ tables


def verify_tables(folder: Path, run: tuple[set[int], dict | None] | None) -> Problems:
    """Each table beside `folder`'s checkpoints (`run`: their steps and manifest, when it is a run)."""
    found: Problems = []
    for name, key in TABLES.items():
        path = folder / name
        for part in sorted(folder.glob(f".{name}.part-*")):
            _read(found, io.read_parquet, part)
        if not path.exists():
            continue
        table = _read(found, io.read_parquet, path)
        meta = _read(found, io.read_json, metadata(path))
        if table is None or meta is None:
            continue
        if table.duplicated(key).any():
            found.append(str(damaged(path, "holds some rows twice")))
        if run is not None:
            found += _same_run(path, table, meta, *run)
    return found


def _same_run(path: Path, table, meta: dict, steps: set[int], manifest: dict | None) -> Problems:
    """A table in a run folder holds rows of that run's checkpoints, computed from that run's config."""
    found = []
    source = meta.get("source", {})
    if manifest is not None and "run" in source:
        config = {k: v for k, v in current(manifest["config"]).items() if k not in EXECUTION_ONLY}
        if current(source["run"]) != config or source.get("base") != manifest["base"]["fingerprint"]:
            found.append(str(damaged(path, "was computed from another run than this folder's")))
    stray = sorted(int(s) for s in set(table["checkpoint_step"]) - steps)
    if stray and "run" in source:
        found.append(str(damaged(path, f"holds rows of step(s) {stray}, which are not checkpoints of this run")))
    return found


# ------------------------------------------------------------------ a study


def verify_study(study: Path) -> Problems:
    found: Problems = []
    _read(found, io.read_json, study / STUDY)
    if (study / BASELINE).exists():
        _read(found, io.read_csv, study / BASELINE)
    compare = _read(found, io.read_parquet, study / COMPARE) if (study / COMPARE).exists() else None
    found += _selections(study)
    found += verify_tables(study, None)
    runs = sorted(p for p in (study / RUNS).iterdir() if p.is_dir()) if (study / RUNS).is_dir() else []
    for run in runs:
        found += verify_run(run)
    if compare is not None and "seed" in compare:
        names = {p.name for p in runs}
        for row, seed in zip(compare["row"], compare["seed"]):
            if arm(row, seed) not in names:
                found.append(str(damaged(study / COMPARE, f"has a row for {arm(row, seed)}, whose run "
                                                          "folder is missing")))
    return found
