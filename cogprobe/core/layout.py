"""Where everything lives: the names of a run folder's and a study folder's files, in one place.

A run folder (`cogprobe train`), and the probe tables written into it or into `--out`:

    manifest.json  train_log.parquet  cost.json  train-config.json (a study's handoff)
    dev_curve.parquet (+ .json)   dev NLL at the evaluation steps, and its dev set (`train --eval-steps`,
                                  see `devcurve`)
    checkpoints/step-N/           (see `checkpoints`)
    sweeps.parquet (+ .json)      sweeps of its checkpoints, and the evaluation set they scored
    activations.parquet (+ .json) capture of its checkpoints
    alignment.parquet (+ .json)   cross-lingual alignment per block of its checkpoints (written by capture)
    selection.json                a layer set (`select --name` picks another name)

A study folder (`cogprobe run`) holds the probe tables of its probe run, and:

    study.json          the config (and the wall seconds of each stage)
    evalsets.json       the three evaluation sets every score comes from
    baseline.csv        the base model's scores          compare.parquet   one row per tuned run
    scores.parquet      per-example NLL sums of every arm, translations.parquet every translation
    prose.parquet       per-passage NLL sums of every arm on held-out English prose (`prose_passages`)
    selection-fixed.json, selection-budget.json
    lr_search.parquet   the learning rates tried per row on dev, and their dev NLL (runs/lr-trials/)
    dev_curves.parquet  every tuned run's dev NLL along its steps (with eval_steps)
    runs/{row}-s{seed}/ one run folder per comparison row and seed ("arm" names it in the tables)
    figures/, report.md, report.html
"""
from __future__ import annotations

from pathlib import Path

from cogprobe.core.errors import CogprobeError

# a run folder
MANIFEST = "manifest.json"
TRAIN_LOG = "train_log.parquet"
COST = "cost.json"
TRAIN_CONFIG = "train-config.json"   # the TrainConfig a study hands its training child (`train --config`)
DEV_CURVE = "dev_curve.parquet"      # per (step, task): dev NLL and per-example sums, see `devcurve`
STOP = "stop"                        # in manifest.json: stopped_at, stop_reason, the plateau rule's checks

# probe tables (in a run folder or --out; in a study folder for its probe run)
SWEEPS = "sweeps.parquet"
ACTIVATIONS = "activations.parquet"
ALIGNMENT = "alignment.parquet"
SELECTION = "selection.json"

# a study folder
STUDY = "study.json"
PROBE_ENGINE = "probe_engine"          # in study.json: how the probe run's sweeps were computed (engine, peak)
STAGE_SECONDS = "stage_seconds"        # in study.json: wall seconds per stage, of the invocation that finished it
STAGE_MACHINES = "stage_machines"      # in study.json: the machine of each stage's recorded time (runfolder.machine)
RUN_LENGTH = "run_length"              # in study.json (converge): the steps every run trains, where full stopped
EVALSETS = "evalsets.json"
BASELINE = "baseline.csv"
COMPARE = "compare.parquet"
PROBE_PAIRS = "probe_pairs.json"       # a sequential probe's rule, chunks and decision (study.sequential)
COMPARE_STEPS = "compare_steps.parquet"  # compare's rows at a study's earlier `compare_steps` (+ step)
SCORES = "scores.parquet"              # per example: arm, task, pair_id, nll_sum, n_tokens
TRANSLATIONS = "translations.parquet"  # per sentence: arm, task, pair_id, hypothesis, reference
PROSE = "prose.parquet"                # per English passage: arm, task, pair_id, nll_sum, n_tokens, passage_set
DEV_CURVES = "dev_curves.parquet"      # every tuned run's dev curve (DEV_CURVE rows + arm, row, seed)
SELECTION_FIXED = "selection-fixed.json"
SELECTION_BUDGET = "selection-budget.json"
LR_SEARCH = "lr_search.parquet"        # one row per (row, lr) tried on dev: the learning-rate choice
LR_TRIALS = "lr-trials"                # runs/lr-trials/{row}-lr{lr}/: the short trial runs
RUNS = "runs"
FIGURES = "figures"


def metadata(table: Path) -> Path:
    """The JSON beside a probe table: which evaluation set and checkpoints its rows come from."""
    return table.parent / f"{table.name}.json"


def arm(row: str, seed: int) -> str:
    """A tuned run's name in a study's tables and its folder name: `{row}-s{seed}`."""
    return f"{row}-s{seed}"


def arm_at(row: str, seed: int, step: int) -> str:
    """A run's name at an earlier step it was scored at (`compare_steps`): `{row}-s{seed}@{step}`."""
    return f"{arm(row, seed)}@{step}"


def row_run(study: Path, row: str, seed: int) -> Path:
    """The run folder of one comparison row and seed."""
    return Path(study) / RUNS / arm(row, seed)


def claim(folder: Path, record: str, want: dict, have: dict | None, *, what: str, overwrite: bool,
          ignore: tuple[str, ...] = ()) -> bool:
    """Whether `folder` already holds this `what` (the identity `have` read from its `record` file
    equals `want`), refusing in one line a folder that holds a different one or files that are not
    cogprobe's (names in `ignore` excepted), unless `overwrite`. The caller writes the record and,
    with `overwrite`, decides what of the old contents goes."""
    folder = Path(folder)
    if overwrite:
        return False
    if have is not None:
        return same(want, have, f"{folder} holds a different {what}", "choose another --out or pass --overwrite to "
                    "replace it")
    if folder.is_dir() and any(p.name not in ignore for p in folder.iterdir()):
        raise CogprobeError(f"{folder} is not empty and holds no cogprobe {what} (no {record}); choose an empty or "
                            "new --out folder, or pass --overwrite")
    return False


def same(want: dict, have: dict, what: str, fix: str) -> bool:
    """True if two identity records are equal; else one line: `what (differs in KEYS); fix`. Every
    claim on a folder or a table says it this way."""
    if have == want:
        return True
    raise CogprobeError(f"{what} (differs in {', '.join(differing(want, have))}); {fix}")


def differing(want: dict, have: dict) -> list[str]:
    """The keys whose values differ between two identity records."""
    return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
