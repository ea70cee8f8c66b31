"""`StudyConfig`: every knob of `cogprobe run`, with presets as data (TOML).

Precedence: the dataclass defaults < the preset (`cogprobe/study/presets/NAME.toml`) <
a `--config` TOML file < flags given on the command line. Unknown keys and
wrong types fail with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import knob
from cogprobe.models.layersets import DEFAULT_FRACTION, check_fraction
from cogprobe.models.loading import EMBEDDED
from cogprobe.probe.options import CaptureOptions
from cogprobe.probe.conditional import GAINS
from cogprobe.selection.options import TAU, SelectOptions
from cogprobe.tuning.config import TrainConfig
from cogprobe.core.layout import STUDY
from cogprobe.data.evalset import EvalSet
from cogprobe.data.prose import PASSAGE_TOKENS
from cogprobe.study.rows import LORA_ROWS, PIVOT_ONLY, ROWS, controlled, expand, kind

PRESETS = Path(__file__).parent / "presets"
DEFAULT_PRESET = "quick"   # `make run`: the smoke test of the whole chain, minutes on a CPU
# how a study runs, not what it computes
EXECUTION_ONLY = ("out", "threads", "overwrite", "isolate_runs", "parallel_runs", "report_to", "resume_every",
                  "gradient_checkpointing", "loss_chunk_tokens")
# what a study accepts a change of on a rerun: its `chrf` stages score every compared run again from
# its kept weights, so no row is scored on other sentences than the rest (`study.rescore_chrf`); its
# `prose` stages score every arm on the new English passages, and an arm whose weights are gone keeps
# no English score rather than one of another set (`study.rescore_prose`)
RESCORED = ("chrf_pairs", "prose_passages")
SWEEP_GRIDS = ("full", "adaptive")   # every k asked for, or `probe.grid`'s coarse grid and its refinement
BUDGET_NO_SET = ("fixed", "skip")    # the budget row when its rule finds no set: the fixed set, or none
CONTROLS_AT = ("every", "read")      # the controls at every k the tasks are swept at, or at the k's the report reads

_TRAIN_KNOBS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def run_knob(name: str, default=dataclasses.MISSING) -> dataclasses.Field:
    """A study knob that is `TrainConfig`'s knob `name`, handed to the study's runs by name
    (`pipeline.train_config`; a row may fix its own `lora_r`, and `dev_pairs` goes with a dev curve
    only): declared once, in TrainConfig, whose help it shows; its default is
    TrainConfig's unless the study gives its own (a study's runs pack shorter sequences than a lone
    run, and checkpoint to resume)."""
    train = _TRAIN_KNOBS[name]
    return dataclasses.field(default=train.default if default is dataclasses.MISSING else default,
                             metadata={**train.metadata, "run_knob": True})


@dataclass
class StudyConfig:
    out: str = knob(help="the study folder (rerun the same command to continue it)")
    model: str = run_knob("model", EMBEDDED)
    corpus: str = run_knob("corpus", EvalSet.corpus)
    pivot_col: str | None = run_knob("pivot_col")
    target_col: str | None = run_knob("target_col")
    seeds: str = knob("0", "comma list of tuning seeds (every run of a seed shares data order)")
    steps: int = knob(24, "optimizer steps of every tuning run")
    batch_size: int = run_knob("batch_size")
    seq_len: int = run_knob("seq_len", 64)
    lr: float = knob(TrainConfig.lr, "peak lr of full and layer-restricted tuning")
    lora_lr: float = knob(1e-3, "peak lr of the LoRA runs (adapters start at zero and need a larger step)")
    lora_r: int = run_knob("lora_r")
    bf16: bool = run_knob("bf16")
    gradient_checkpointing: bool = run_knob("gradient_checkpointing")
    loss_chunk_tokens: int = run_knob("loss_chunk_tokens")
    threads: int | None = run_knob("threads")
    save_steps: str = knob("0,6,12,24", "checkpoints of the first full fine-tuning run, probed by the sweeps")
    fraction: float = knob(DEFAULT_FRACTION, "CogSym fraction of blocks (the paper's 25%)")
    tau: float = knob(TAU, "share of the gain the budget set must keep")
    budget_max_total: int | None = knob(None, "largest k_in + k_out the budget search tries (default: L)")
    budget_gain: str = knob(SelectOptions.gain, "the budget set keeps tau of the total gain, or of the conditional "
                            "gain (the part that uses the source; its search scores the shuffled controls too)",
                            choices=GAINS)
    budget_no_set: str = knob("fixed", "when the budget rule finds no set on dev: train the fixed CogSym set as the "
                              "budget row, labelled 'budget: no set, fixed used' (fixed), or leave the row out, "
                              "its reason in the report (skip)", choices=BUDGET_NO_SET)
    rows: str = knob("full,lora,cogsym,cogsym-lora,budget,middle,bottom,top,random",
                     "comparison rows to run (full is always run; every kind: cogprobe/study/rows.py); ROW@pivot "
                     "adds ROW's pivot-only control (ROW tuned on the pivot side alone), whose gain the report "
                     "subtracts (a finished study accepts added controls on a rerun)")
    pivot_steps: int = knob(0, "steps of each ROW@pivot control (0: its row's). Fewer, one of compare_steps: the "
                            "control trains the first steps of its row's schedule and is read against its row's "
                            "test scores at that step, so the two stay matched in steps, tokens and rate")
    random_draws: int = knob(1, "sets drawn for the random row (several: rows random-1 ... random-N)")
    probe_row: str = knob("full", "the row whose first-seed run is probed (checkpoints swept, budget derived)")
    schedule: str = run_knob("schedule")
    warmup: float = run_knob("warmup")
    converge: bool = knob(False, "full fine-tuning (first seed) runs until its dev NLL plateaus, `steps` "
                          "being the cap; every other run then trains as many steps (needs eval_steps). With a "
                          "decaying schedule every run, the learning-rate trials too, keeps the schedule of "
                          "`steps` (needs plateau_min_steps)")
    plateau_window: float = run_knob("plateau_window")
    plateau_min_improvement: float = run_knob("plateau_min_improvement")
    plateau_min_steps: int = run_knob("plateau_min_steps")
    eval_steps: str = knob(TrainConfig.eval_steps,
                           "dev-NLL curve points of every tuning run (save_steps syntax; empty: none)")
    dev_pairs: int = run_knob("dev_pairs")
    lr_grid: str = knob("", "peak lrs tried per full-parameter row on dev, e.g. '1e-4,3e-4,1e-3' (empty: lr)")
    lora_lr_grid: str = knob("", "peak lrs tried per LoRA row on dev (empty: lora_lr)")
    lr_steps: int = knob(20, "steps of each learning-rate trial run")
    sweep_ks: str | None = knob(None, "k grid of the sweeps, e.g. '0-30' or '0,2,4,8' (default every k; with "
                                "sweep_grid adaptive: its coarse grid, default probe.grid's)")
    sweep_grid: str = knob("full", "full: every k of sweep_ks; adaptive: a coarse grid, then a k only where a "
                           "curve moves by more than its 95% interval (probe.grid)", choices=SWEEP_GRIDS)
    eval_pairs: int = knob(64, "test pairs sampled for the NLL scores (baseline and comparison rows)")
    compare_steps: str = knob("", "also score every run on test at these earlier steps (e.g. '400'; its "
                              "checkpoints kept for them), into compare_steps.parquet: whether a row's standing "
                              "moves with the length of the run")
    probe_pairs: int = knob(16, "dev pairs sampled for sweeps, capture and budget selection (with probe_chunk: "
                            "the most the probe may score)")
    probe_chunk: int = knob(0, "score the probe's pairs in chunks of this many, stopping once its intervals at "
                            "the read k's are narrow enough or its time is spent (cogprobe/study/sequential.py; "
                            "0: all probe_pairs at once)")
    probe_half_width: float = knob(0.1, "probe_chunk: stop once every share at the read k's of the last "
                                   "checkpoint has a 95% half-width at most this")
    probe_seconds: float = knob(0.0, "probe_chunk: stop before a chunk that would take the sweeping past this "
                                "many seconds (0: no budget)")
    chrf_pairs: int = knob(16, "test pairs sampled per direction for chrF (0: the NLL pairs themselves)")
    prose_passages: int = knob(0, f"passages of {PASSAGE_TOKENS} tokens of held-out English prose (Python's "
                               "pydoc_data.topics) every arm scores: the quantisation control, whose NLL change "
                               "from the base model reads as repair or format adaptation (a fall) or forgetting "
                               "(a rise); 0: off")
    max_new_tokens: int = knob(40, "greedy translation length cap")
    max_sentence_tokens: int = knob(TrainConfig.dev_max_sentence_tokens,
                                    "evaluated pairs with a longer side are left out (never cut)")
    train_max_sentence_tokens: int = run_knob("train_max_sentence_tokens")
    loss_on: str = run_knob("loss_on")
    split_seed: int = run_knob("split_seed")
    sample_seed: int = knob(0, "seed of the evaluation samples (stratified by document)")
    sweep_controls: bool = knob(True, "sweep the shuffled-source controls too (conditional gain per k)")
    sweep_controls_at: str = knob("every", "every: the controls at every k and checkpoint the tasks are swept at; "
                                  "read: only at the k's the report and the selector read (with 0 and every "
                                  "block), of the last checkpoint: the report's conditional-gain findings at a "
                                  "fraction of the cost, its conditional curves a few points", choices=CONTROLS_AT)
    capture_backend: str = knob(CaptureOptions.backend, "torch | nnsight | transformerlens")
    isolate_runs: bool = knob(True, "train each row in its own process, so its peak memory is its own")
    parallel_runs: int = knob(1, "comparison runs trained at once after the probe, each in its own process at "
                              "`threads` threads, in row order, the study scoring each in that order once it has "
                              "finished (e.g. 2 on 2 cores at threads 1); the same runs as one at a time")
    resume_every: int = run_knob("resume_every", 50)
    overwrite: bool = knob(False, "replace a different study in `out`")
    report_to: str = run_knob("report_to")

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_pairs", "probe_pairs", "chrf_pairs", "prose_passages",
                     "max_new_tokens", "max_sentence_tokens", "train_max_sentence_tokens", "lora_r",
                     "random_draws", "dev_pairs", "lr_steps", "probe_chunk", "pivot_steps", "parallel_runs"):
            value = getattr(self, name)
            least = 0 if name in ("chrf_pairs", "prose_passages", "probe_chunk", "pivot_steps") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise CogprobeError(f"{name}={value!r}: give a whole number >= {least}")
        check_fraction(self.fraction, "fraction")
        check_fraction(self.tau, "tau")
        bad = [s for s in self.row_list() if kind(controlled(s)) not in ROWS]
        if bad:
            raise CogprobeError(f"rows {bad} are unknown; choose from {', '.join(ROWS)} (or ROW{PIVOT_ONLY})")
        alone = [s for s in self.row_list() if controlled(s) not in self.row_list()]
        if alone:
            raise CogprobeError(f"rows {alone}: a pivot-only control needs its own row beside it; add "
                                f"{', '.join(controlled(s) for s in alone)} to rows")
        if self.probe_row not in ("full", "blocks"):
            raise CogprobeError(f"probe_row={self.probe_row!r}: the probe run is full or blocks (a run of every block)")
        for name, allowed in (("sweep_grid", SWEEP_GRIDS), ("budget_no_set", BUDGET_NO_SET), ("budget_gain", GAINS),
                              ("sweep_controls_at", CONTROLS_AT)):
            if getattr(self, name) not in allowed:
                raise CogprobeError(f"{name}={getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if not self.probe_half_width > 0 or not self.probe_seconds >= 0:
            raise CogprobeError(f"probe_half_width={self.probe_half_width}, probe_seconds={self.probe_seconds}: give a "
                                "half-width > 0 (e.g. 0.1) and seconds >= 0 (0: no budget)")
        if self.parallel_runs > 1 and not self.isolate_runs:
            raise CogprobeError(f"parallel_runs={self.parallel_runs} needs isolate_runs: runs trained at once "
                                "each need a process of their own (torch's threads and seeds are per process)")
        if self.converge and not self.eval_steps:
            raise CogprobeError("converge needs a dev-NLL curve: set eval_steps, e.g. 'log:8'")
        if self.converge and self.schedule != "constant" and not self.plateau_min_steps:
            raise CogprobeError(f"converge with a {self.schedule} schedule needs plateau_min_steps (e.g. 3/4 of "
                                "steps), or schedule constant")
        self.compare_step_list()
        if self.pivot_steps and self.pivot_steps not in self.compare_step_list():
            raise CogprobeError(f"pivot_steps={self.pivot_steps}: the controls are read against their rows at that "
                                f"step, so add it to compare_steps (now {self.compare_steps!r}), or give 0")
        self.seed_list()
        self.lrs("full"), self.lrs("lora")

    def row_list(self) -> list[str]:
        """The rows in run order: full first, the probe row next, the random row as its draws."""
        rows = [s.strip() for s in str(self.rows).split(",") if s.strip()]
        first = ["full"] + ([self.probe_row] if self.probe_row != "full" else [])
        return expand(first + [s for s in rows if s not in first], self.random_draws)

    def lrs(self, row: str) -> list[float]:
        """The learning rates tried for `row` on dev (one: no choice to make)."""
        lora = controlled(row) in LORA_ROWS
        grid, default = (self.lora_lr_grid, self.lora_lr) if lora else (self.lr_grid, self.lr)
        try:
            values = [float(v) for v in str(grid or "").split(",") if v.strip()]
        except ValueError:
            raise CogprobeError(f"{'lora_lr_grid' if lora else 'lr_grid'}={grid!r}: give numbers like "
                                "'1e-4,3e-4,1e-3'") from None
        if any(not v > 0 for v in values):
            raise CogprobeError(f"learning rates must be > 0, got {grid!r}")
        return sorted(set(values)) or [default]

    def compare_step_list(self) -> list[int]:
        """The earlier steps every run is also scored at on test (`compare_steps`), sorted."""
        try:
            found = sorted({int(s) for s in str(self.compare_steps or "").split(",") if s.strip()})
        except ValueError:
            raise CogprobeError(f"compare_steps={self.compare_steps!r}: give steps like '400' or '200,400'") from None
        bad = [s for s in found if not 0 < s < self.steps]
        if bad:
            raise CogprobeError(f"compare_steps {bad} are not inside the runs (1..{self.steps - 1}); give earlier steps")
        return found

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError:
            raise CogprobeError(f"seeds={self.seeds!r}: give whole numbers like '0,1,2'") from None
        if not seeds:
            raise CogprobeError("seeds is empty; give at least one seed, e.g. '0'")
        return seeds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What makes two studies the same (execution-only fields left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in EXECUTION_ONLY}

    @classmethod
    def read(cls, study: str | Path) -> "StudyConfig":
        """The config recorded in a study folder's study.json (keys it no longer has are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in renamed(io.read_json(Path(study) / STUDY)).items() if k in names})


# the knobs every run of a study takes from it unchanged, by name
RUN_KNOBS = tuple(f.name for f in dataclasses.fields(StudyConfig) if f.metadata.get("run_knob"))


RENAMED = {"strategies": "rows"}   # keys renamed since studies were first written (old -> new)
# keys added since whose default does otherwise than studies did before them: what those studies did
BEFORE_ADDED = {"budget_no_set": "skip"}


def renamed(recorded: dict) -> dict:
    """A study.json written before a key was renamed or added, with the new names, and for keys added
    since what studies did before the key existed (its default, or `BEFORE_ADDED`: a budget rule that
    found no set left its row out), so old studies resume as they ran."""
    recorded = {RENAMED.get(k, k) if RENAMED.get(k, k) not in recorded else k: v for k, v in recorded.items()}
    added = {f.name: BEFORE_ADDED.get(f.name, f.default) for f in dataclasses.fields(StudyConfig)
             if f.name not in recorded and f.name not in EXECUTION_ONLY and f.default is not dataclasses.MISSING}
    return {**added, **recorded}


def _check_types(values: dict, where: str) -> dict:
    fields = {f.name: str(f.type) for f in dataclasses.fields(StudyConfig)}
    for key, value in values.items():
        if key in RENAMED:
            raise CogprobeError(f"{where}: key {key!r} is now called {RENAMED[key]!r}; rename it")
        if key not in fields:
            raise CogprobeError(f"{where}: unknown key {key!r}; known keys: {', '.join(fields)}")
        kind = fields[key].replace(" | None", "")
        ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, (str, int))}[kind]
        if not (ok(value) or (value is None and "None" in fields[key])):
            raise CogprobeError(f"{where}: key {key!r} should be {kind}, got {type(value).__name__} {value!r}")
    return {k: str(v) if fields[k].startswith("str") and v is not None else v for k, v in values.items()}


# The tables of a preset or `--config` file, one per stage, and the StudyConfig keys each holds. A
# file may also give the keys flat, without tables (as files written before the tables did).
TABLES = {
    "data": ("model", "corpus", "pivot_col", "target_col", "split_seed", "sample_seed"),
    "train": ("seeds", "steps", "batch_size", "seq_len", "lr", "lora_lr", "lora_r", "bf16", "schedule", "warmup",
              "loss_on", "train_max_sentence_tokens", "save_steps", "eval_steps", "dev_pairs", "converge",
              "plateau_window", "plateau_min_improvement", "plateau_min_steps", "resume_every", "report_to",
              "gradient_checkpointing", "loss_chunk_tokens"),
    "lr": ("lr_grid", "lora_lr_grid", "lr_steps"),
    "rows": ("rows", "pivot_steps", "random_draws", "probe_row", "fraction"),
    "sweep": ("probe_pairs", "probe_chunk", "probe_half_width", "probe_seconds", "sweep_ks", "sweep_grid", "sweep_controls", "sweep_controls_at", "capture_backend"),
    "select": ("tau", "budget_max_total", "budget_gain", "budget_no_set"),
    "compare": ("eval_pairs", "compare_steps", "chrf_pairs", "prose_passages", "max_new_tokens", "max_sentence_tokens"),
    "run": ("out", "threads", "isolate_runs", "parallel_runs", "overwrite"),
}


def flattened(data: dict, where: str) -> dict:
    """The keys of a TOML file's tables (and its flat keys) as one flat dict; a key in the wrong table
    or an unknown table is one line naming the right one."""
    home = {key: table for table, keys in TABLES.items() for key in keys}
    flat = {}
    for name, value in data.items():
        if not isinstance(value, dict):
            flat[name] = value
            continue
        if name not in TABLES:
            raise CogprobeError(f"{where}: unknown table [{name}]; tables: {', '.join(TABLES)}")
        for key, item in value.items():
            if home.get(key, name) != name:
                raise CogprobeError(f"{where}: key {key!r} belongs in table [{home[key]}], not [{name}]")
            flat[key] = item
    return flat


def read_toml(path: str | Path, where: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CogprobeError(f"config file {path} does not exist; give a TOML file with StudyConfig keys")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CogprobeError(f"{path} is not valid TOML ({e}); fix the file") from None
    return _check_types(flattened(data, where or str(path)), where or str(path))


def preset(name: str) -> dict:
    path = PRESETS / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise CogprobeError(f"unknown preset {name!r}; presets: {names}")
    return read_toml(path, f"preset {name}")


def presets() -> pd.DataFrame:
    """Every preset's knobs, one line per (preset, knob, value), presets by name: `cogprobe ls presets`."""
    return pd.DataFrame([dict(preset=p.stem, knob=k, value=v) for p in sorted(PRESETS.glob("*.toml"))
                         for k, v in preset(p.stem).items()], columns=["preset", "knob", "value"])


def build_config(out: str | Path, *, preset_name: str | None = DEFAULT_PRESET, config_file: str | Path | None = None,
                 **overrides) -> StudyConfig:
    """Defaults < preset < config file < overrides (None values in overrides are ignored)."""
    values: dict = {}
    if preset_name:
        values.update(preset(preset_name))
    if config_file:
        values.update(read_toml(config_file))
    values.update(_check_types({k: v for k, v in overrides.items() if v is not None}, "flags"))
    values["out"] = str(out)
    return StudyConfig(**values)
