"""The study: where does a model learn to perceive and produce a language, and what do the outer layers buy?

`run(config)` chains every stage, each writing its own files into the study
folder and skipped when they are already there, so rerunning the same command
continues an interrupted study and redoes nothing that finished:

  1. baseline     base model's NLL, control and chrF on test      baseline.csv
  2. choose lr    short dev trials per row (a grid in the config) lr_search.parquet, runs/lr-trials/
  3. tune full    full fine-tuning (first seed); with `converge`  runs/full-s{seed}/
                  it stops on a dev plateau and sets every run's length
     tune probe   the probe row's run with checkpoints (full, or blocks: ends frozen like CogSym's)
  4. probe        revert sweeps and capture on its checkpoints    sweeps.parquet, activations.parquet
  5. select       the fixed CogSym set, and the derived budget    selection-fixed.json, selection-budget.json
                  set where a row trains it
  6. tune         every comparison row (see `rows`), same data,   runs/{row}-s{seed}/
                  steps and seed, each at its own lr
  7. compare      NLL, control and chrF of each run on test;      compare.parquet,
                  NLL on English prose (`prose_passages`, the     prose.parquet
                  quantisation control), the base model's too;
                  the same at earlier `compare_steps`             compare_steps.parquet
  8. report       figures and the plain-language report           figures/, report.md, report.html

Dev for decisions, test once: the probe and the budget selection score a sample
of the dev split; only the baseline and the final comparison rows score test.
Every score comes from an `EvalSet` (`evaluation_sets` names the three), recorded
in `evalsets.json`.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.study import lr_choice, prose_control, sequential
from cogprobe.tuning.checkpoints import CHECKPOINTS, Checkpoints
from cogprobe.data.corpora import load_corpus
from cogprobe.core.distributed import default_device, torch_threads
from cogprobe.core.errors import CogprobeError
from cogprobe.data.evalset import EvalSet
from cogprobe.tuning.health import check_healthy
from cogprobe.models.layersets import cogsym, parse_range_list
from cogprobe.core.layout import (BASELINE, COMPARE, COMPARE_STEPS, COST, DEV_CURVE, DEV_CURVES, EVALSETS, LR_SEARCH, LR_TRIALS, MANIFEST,
                             PROBE_ENGINE, RUN_LENGTH, RUNS, SCORES, SELECTION_BUDGET, SELECTION_FIXED, STAGE_MACHINES, STAGE_SECONDS,
                             STOP, STUDY, SWEEPS, TRAIN_CONFIG, TRANSLATIONS, arm, arm_at, claim, metadata, row_run)
from cogprobe.models.loading import block_count, load_model
from cogprobe.probe.folders import capture_run, sweep_run
from cogprobe.probe.grid import adaptive_sweep_run
from cogprobe.probe.options import CaptureOptions, SweepOptions
from cogprobe.probe.tables import COMPUTED
from cogprobe.selection.folders import select_run
from cogprobe.selection.options import SelectOptions
from cogprobe.study.report import probe_ks, write_report
from cogprobe.study.rows import Plan, Skip, controlled, derives_budget, kind, plan
from cogprobe.tuning.runfolder import machine
from cogprobe.selection.rules import select_fixed
from cogprobe.study.config import EXECUTION_ONLY, RESCORED, RUN_KNOBS, StudyConfig, renamed
from cogprobe.probe.sweep import check_ks
from cogprobe.data.tasks import CONTROLS, TASKS, score
from cogprobe.tuning.loop import train
from cogprobe.tuning.config import TrainConfig, step_list
from cogprobe.data.translate import chrf, translate

MIN_CHRF_GAIN = 1.0  # chrF points: a share of a smaller full-FT gain is noise, not a ratio worth printing


class Progress:
    """One line per event: stage, elapsed time and an ETA from the stage times this study measured.

    A stage still to run is expected to take what the finished stages of its verb took on average
    ("tune", "compare": study.json's `stage_seconds`, over every invocation), else its weight times
    the measured seconds per unit of weight (the median over finished stages). Fixed weights alone
    misled: a learning-rate search weighed as half a baseline took two hours in the standard
    preset, and the ETA read 107 hours."""

    def __init__(self, weights: dict[str, float], measured: dict[str, float] | None = None, log=print):
        self.weights, self.measured, self.log = weights, dict(measured or {}), log
        self.start = time.perf_counter()

    def stage(self, name: str, detail: str = "") -> None:
        eta = self.eta()
        eta_s = f", ETA ~{_mmss(eta)}" if eta is not None else ""
        self.log(f"[{_mmss(time.perf_counter() - self.start)}{eta_s}] {name}{': ' + detail if detail else ''}")

    def finished(self, name: str, seconds: float) -> None:
        self.measured[name] = seconds

    def eta(self) -> float | None:
        """Seconds the stages not yet finished should take; None before any stage is measured."""
        weighed = [s for s in self.measured if self.weights.get(s)]
        if not weighed:
            return None
        # the median, so one odd stage (a two-hour learning-rate search) moves it little
        per_weight = float(np.median([self.measured[s] / self.weights[s] for s in weighed]))
        left = [s for s in self.weights if s not in self.measured]
        return sum(self._expected(s, per_weight) for s in left)

    def _expected(self, name: str, per_weight: float) -> float:
        verb = name.split()[0]
        alike = [t for s, t in self.measured.items() if s.split()[0] == verb and verb in ("tune", "compare", "chrf")]
        return sum(alike) / len(alike) if alike else self.weights[name] * per_weight


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def run(config: StudyConfig, log=print) -> Path:
    """Run (or continue) the whole study; returns the study folder. `threads` holds for the scoring
    done in this process as for each run's training (before 2026-11-29 it held for the training only)."""
    with torch_threads(config.threads):
        return _run(config, log)


def _run(config: StudyConfig, log) -> Path:
    out = Path(config.out)
    _check_inputs(config)
    stale = _claim(out, config)
    rows = run_order(config)
    names, seed0 = config.row_list(), config.seed_list()[0]
    # rows whose learning rate is chosen on dev (a pivot-only control takes its row's)
    searched = [r for r in names if len(config.lrs(kind(r))) > 1 and controlled(r) == r]
    progress = Progress(_weights(rows, searched), io.read_json(out / STUDY).get(STAGE_SECONDS, {}), log)
    stage = functools.partial(run_stage, progress, out)
    compared = lambda row, seed: _finished(out, f"compare {arm(row, seed)}")  # noqa: E731  (its weights no longer needed)
    stage("baseline", lambda: baseline(config, out))
    for name, (row, seed) in prose_control.stale(config.prose_passages, config.model, out).items():
        stage(f"prose {name}", lambda: rescore_prose(config, out, name, row, seed, log), again=True)
    for name, (row, seed) in stale.items():   # chrf_pairs changed since they were scored
        stage(f"chrf {name}", lambda: rescore_chrf(config, out, row, seed), again=True)
    if [r for r in searched if r != "budget"]:
        stage("choose lr", lambda: choose_lrs(config, out, [r for r in searched if r != "budget"]))
    first = list(dict.fromkeys([("full", seed0), (config.probe_row, seed0)]))  # the length, then the probe
    for row, seed in first:
        if not compared(row, seed) or _weights_needed(config, out, row, seed):
            stage(f"tune {arm(row, seed)}", lambda: tune(config, out, row, seed), again=True)
        # scored at once, not after the probe: a machine lost before then loses no finished row
        stage(f"compare {arm(row, seed)}", lambda: compare_one(config, out, row, seed))
    # the probe run, opened on first use and shared by the probe and select stages (its base read once)
    probe_run = functools.cache(lambda: Checkpoints.open(probe_run_dir(config, out)).to(default_device()))
    stage("probe", lambda: probe(config, out, probe_run()))
    stage("select", lambda: select_sets(config, out, log, probe_run))
    if "budget" in searched:
        stage("choose lr budget", lambda: choose_lrs(config, out, ["budget"]))
    left = [(row, seed) for row, seed in rows if (row, seed) not in first and not compared(row, seed)]
    with trained_ahead(config, out, left) as trained:
        for row, seed in rows:
            if (row, seed) in left:
                stage(f"tune {arm(row, seed)}", lambda: trained(row, seed), again=True)
            stage(f"compare {arm(row, seed)}", lambda: compare_one(config, out, row, seed))
    stage("report", lambda: write_report(out), again=True)
    progress.stage("done", str(out / "report.md"))
    return out


def run_order(config: StudyConfig) -> list[tuple[str, int]]:
    """(row, seed) in the order they train: every seed of the compared rows, then the pivot-only
    controls. The rows are what the headline reads and the controls qualify them, so a study cut
    short (a session's end, a machine lost with its unfinished runs) has its rows' seeds first; a
    control also trains after the row it is read against."""
    seeds, names = config.seed_list(), config.row_list()
    return ([(r, seed) for seed in seeds for r in names if controlled(r) == r]
            + [(r, seed) for seed in seeds for r in names if controlled(r) != r])


@contextlib.contextmanager
def trained_ahead(config: StudyConfig, out: Path, arms: list[tuple[str, int]]):
    """`trained(row, seed)`: trains the arm and returns the seconds its training took. With
    `parallel_runs` N > 1 the arms train N at a time, in order, in threads that each wait on a training
    child, ahead of the study's loop: `trained` then waits for the arm's run and returns its own
    seconds, not the wait, so a stage's recorded time stays what the run cost."""
    def timed(row: str, seed: int) -> float:
        start = time.perf_counter()
        tune(config, out, row, seed)
        return time.perf_counter() - start
    if config.parallel_runs < 2 or len(arms) < 2:
        yield timed
        return
    for a in arms:
        run_length(config, out, *a)   # any record it writes, written here, not from the threads
    TRAINING_CHILDREN.open()
    pool = concurrent.futures.ThreadPoolExecutor(config.parallel_runs, thread_name_prefix="cogprobe-run")
    runs = {a: pool.submit(timed, *a) for a in arms}
    try:
        yield lambda row, seed: runs[(row, seed)].result()
    except BaseException:   # a failed run or an interrupt: start no more, stop those running (they resume)
        pool.shutdown(wait=False, cancel_futures=True)
        TRAINING_CHILDREN.stop()
        raise
    pool.shutdown(wait=True)


def _weights(rows: list[tuple[str, int]], searched: list[str]) -> dict[str, float]:
    """Every stage this study runs, with a rough relative cost (the ETA's guess until one is measured)."""
    weights = {"baseline": 1, "probe": 4, "select": 2, "report": 0.5}
    if [r for r in searched if r != "budget"]:
        weights["choose lr"] = 0.5
    if "budget" in searched:
        weights["choose lr budget"] = 0.2
    weights.update({f"tune {arm(s, seed)}": 3 for s, seed in rows})
    weights.update({f"compare {arm(s, seed)}": 1 for s, seed in rows})
    return weights


def run_stage(progress: Progress, out: Path, name: str, fn, again: bool = False) -> None:
    """Run one stage and record its wall time in study.json's `stage_seconds` (or, for a stage whose
    work ran elsewhere, a run trained ahead with `parallel_runs`, the seconds `fn` returns: its own).

    A stage run `again` after it finished keeps the longer of its two times: a no-op rerun (its
    run is complete) adds nothing, and a run retrained because its weights were lost with the
    machine counts once, not twice, so the cost of one (language, seed) stays what one run costs.

    A stage recorded there has finished, and is not run again (`again`: it is, because it is cheap
    when done, like the report, or because its own files say whether it is done, like a training
    run). So a study folder whose tables are kept without its runs/ (the weights, never committed)
    continues on another machine where it stopped, recomputing nothing that finished."""
    if _finished(out, name) and not again:
        return
    progress.stage(name)
    start = time.perf_counter()
    own = fn()   # a stage whose work ran elsewhere (a run trained ahead) returns the seconds it took there
    record = io.read_json(out / STUDY)
    seconds = record.setdefault(STAGE_SECONDS, {})
    took = round(own if isinstance(own, float) else time.perf_counter() - start, 1)
    if took >= seconds.get(name, 0.0):  # kept with its machine: costs differ between machines
        seconds[name], record.setdefault(STAGE_MACHINES, {})[name] = took, machine()
    io.write_json(out / STUDY, record)
    progress.finished(name, seconds[name])


def _finished(out: Path, name: str) -> bool:
    return name in io.read_json(out / STUDY).get(STAGE_SECONDS, {})


def _check_inputs(config: StudyConfig) -> None:
    """A bad model, corpus, fraction or k grid fails here, before the folder is claimed, not after the tuning."""
    evaluation_sets(config)  # bad sizes fail here
    load_corpus(config.corpus, pivot_col=config.pivot_col, target_col=config.target_col)
    n = _block_count(str(config.model))
    cogsym(n, config.fraction)
    if config.sweep_ks:
        check_ks(parse_range_list(config.sweep_ks, 10**6), n)


RECORDS = (STAGE_SECONDS, STAGE_MACHINES, RUN_LENGTH, PROBE_ENGINE)   # what study.json records of a study's progress, beside its config


def _claim(out: Path, config: StudyConfig) -> dict[str, tuple[str | None, int | None]]:
    """Refuse a folder holding a different study (unless overwrite); record this one. A changed
    `RESCORED` knob is no different study: returns the arms to score again (`stale_chrf`), after
    checking that each can be (refused here, before anything is written, if not)."""
    path = out / STUDY
    old = renamed(io.read_json(path)) if path.is_file() and not config.overwrite else None
    want, have = compared_identities(config, old)
    claim(out, STUDY, want, have, what="study", overwrite=config.overwrite)
    stale = stale_chrf(config, out) if old is not None else {}
    _check_weights_kept(out, stale)
    if config.overwrite and out.is_dir():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    io.write_json(path, {**config.to_dict(), STAGE_SECONDS: {},
                         **{k: v for k, v in (old or {}).items() if k in RECORDS}})
    return stale


def compared_identities(config: StudyConfig, recorded: dict | None) -> tuple[dict, dict | None]:
    """(this config's identity, the recorded study's) as a rerun compares them: without the knobs a
    study accepts a change of (`RESCORED`) and its progress records, and with added pivot-only controls
    accepted (`with_added_controls`). `recorded`: study.json through `renamed`, or None."""
    want = {k: v for k, v in config.identity().items() if k not in RESCORED}
    if recorded is None:
        return want, None
    have = {k: v for k, v in recorded.items() if k not in (*EXECUTION_ONLY, *RECORDS, *RESCORED)}
    return want, with_added_controls(have, want)


def with_added_controls(have: dict, want: dict) -> dict:
    """The recorded study as `want` has it where `want` only adds pivot-only controls (ROW@pivot of rows
    it has, and while it has none, their `pivot_steps`): a rerun that asks for them continues the study
    and trains them, as their rate is their row's and no finished stage reads them. Any other change
    stays a different study."""
    rows = lambda d: [r.strip() for r in str(d.get("rows", "")).split(",") if r.strip()]  # noqa: E731
    added = [r for r in rows(want) if r not in rows(have)]
    if not added or set(rows(have)) - set(rows(want)) or any(controlled(r) == r for r in added):
        return have
    had_controls = any(controlled(r) != r for r in rows(have))
    return {**have, "rows": want["rows"], **({} if had_controls else {"pivot_steps": want.get("pivot_steps")})}


# --- data --------------------------------------------------------------------------


def evaluation_sets(config: StudyConfig) -> dict[str, EvalSet]:
    """The study's three evaluation sets: NLL and chrF on test (final rows), probe on dev (decisions).
    With `chrf_pairs` 0, chrF scores the NLL pairs themselves: one test set for every metric."""
    common = dict(corpus=str(config.corpus), pivot_col=config.pivot_col, target_col=config.target_col,
                  split_seed=config.split_seed, sample_seed=config.sample_seed,
                  max_sentence_tokens=config.max_sentence_tokens)
    nll = EvalSet(split="test", n=config.eval_pairs, **common)
    return {"nll": nll,
            "chrf": EvalSet(split="test", n=config.chrf_pairs, **common) if config.chrf_pairs else nll,
            "probe": EvalSet(split="dev", n=config.probe_pairs, **common)}


def _scores(model, tokenizer, config: StudyConfig, arm: str, out: Path) -> dict:
    """NLL and conditional gain per task on the test set, chrF per direction on its chrF set, and (with
    `prose_passages`) NLL on English prose, the quantisation control, into prose.parquet.

    Each example's NLL sum and token count go to `scores.parquet`, and each translation to
    `translations.parquet`, under `arm` (base, or the row's run name), so every interval
    can be recomputed without scoring again."""
    prose_control.score_arm(model, tokenizer, config.prose_passages, arm, out)   # first: a bad size fails at once
    summary = _nll_scores(model, tokenizer, config, arm, out)
    chrfs, translations = _translations(model, tokenizer, config, arm)
    io.replace_rows(out / TRANSLATIONS, translations)
    return {**summary, **chrfs}


def _nll_scores(model, tokenizer, config: StudyConfig, arm: str, out: Path) -> dict:
    sets = evaluation_sets(config)
    pairs = list(sets["nll"].pairs(tokenizer).pairs["pair_id"])
    examples = sets["nll"].examples(tokenizer, (*TASKS, *CONTROLS))
    summary, per_example = {}, []
    for task, ex in examples.items():
        s = score(model, ex)
        summary[f"{task.replace('-', '_')}_nll"] = s.nll
        per_example.append(pd.DataFrame(dict(arm=arm, task=task, pair_id=pairs, nll_sum=s.example_nll,
                                             n_tokens=s.example_tokens)))
    for task in TASKS:
        summary[f"{task}_conditional_gain"] = summary[f"{task}_shuffled_nll"] - summary[f"{task}_nll"]
    io.replace_rows(out / SCORES, pd.concat(per_example, ignore_index=True))
    return summary


def _translations(model, tokenizer, config: StudyConfig, arm: str) -> tuple[dict, pd.DataFrame]:
    """chrF per direction on the study's chrF set, and each translation under `arm` (the rows of
    `translations.parquet`: the caller writes them)."""
    chrf_set = evaluation_sets(config)["chrf"]
    pair_ids = list(chrf_set.pairs(tokenizer).pairs["pair_id"])
    summary, translations = {}, []
    for task in TASKS:
        hyps, refs = translate(model, tokenizer, chrf_set.examples(tokenizer, [task])[task],
                               max_new_tokens=config.max_new_tokens)
        summary[f"chrf_{task}"] = chrf(hyps, refs)
        translations.append(pd.DataFrame(dict(arm=arm, task=task, pair_id=pair_ids, hypothesis=hyps,
                                              reference=refs)))
    return summary, pd.concat(translations, ignore_index=True)


def baseline(config: StudyConfig, out: Path) -> None:
    if (out / BASELINE).is_file():
        return
    model, tok = load_model(config.model)
    model.to(default_device())
    _record_evalsets(config, out, tok)
    io.write_text(out / BASELINE, pd.DataFrame([_scores(model, tok, config, "base", out)]).to_csv(index=False))


def _record_evalsets(config: StudyConfig, out: Path, tokenizer) -> None:
    io.write_json(out / EVALSETS, {name: dict(e.to_dict(), **e.report(tokenizer))
                                   for name, e in evaluation_sets(config).items()})


# --- tuning -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _block_count(model_spec: str) -> int:
    """L of a model spec (any spec load_model takes: alias, folder, .gguf); read once per process."""
    return block_count(model_spec)


def row_plan(config: StudyConfig, out: Path, row: str, seed: int) -> Plan:
    """What `row` trains (see `rows`); raises `Skip` for a row that cannot run yet or at all."""
    return plan(row, n_layers=_block_count(str(config.model)), fraction=config.fraction, lora_r=config.lora_r,
                seed=seed, study=out)


def train_config(config: StudyConfig, out: Path, row: str, seed: int, *, lr: float, steps: int,
                 folder: Path | None = None) -> TrainConfig:
    """The TrainConfig of one run of `row`: the study's run knobs (`RUN_KNOBS`, each handed on as it
    is) and curve points, the row's plan and learning rate. Only the first seed's probe row keeps checkpoints along the way (the
    probe sweeps them); only the first seed's full run may stop on a plateau (it sets the length)."""
    p = row_plan(config, out, row, seed)
    seed0 = config.seed_list()[0]
    probed = (row, seed) == (config.probe_row, seed0) and folder is None
    decays = config.converge and config.schedule != "constant"   # every run keeps the cap's schedule
    # a shorter pivot-only control (`pivot_steps`) trains the first steps of its row's schedule
    shortened = bool(config.pivot_steps) and controlled(row) != row and folder is None
    knobs = {name: getattr(config, name) for name in RUN_KNOBS}
    knobs.pop("dev_pairs")                        # given with a dev curve only (`_dev_curve`)
    knobs["lora_r"] = p.lora_r or config.lora_r   # a row may fix its own rank
    return TrainConfig(
        **knobs, out=folder or row_run(out, row, seed), strategy=p.strategy, layers=p.layers, steps=steps, lr=lr,
        schedule_steps=config.steps if decays else (run_length(config, out, controlled(row), seed) if shortened else 0),
        train_embeddings=p.train_ends, train_head=p.train_ends, seed=seed,
        save_steps=_save_steps(config, steps, probed, trial=folder is not None),
        stop_on_plateau=config.converge and (row, seed) == ("full", seed0) and folder is None,
        **_dev_curve(config, str(steps) if folder is not None else config.eval_steps), **_text(p),
        resume=True, progress=False)


def _save_steps(config: StudyConfig, steps: int, probed: bool, trial: bool) -> str | list[int]:
    """A run's checkpoints: the probe run's `save_steps`, any other run's last step; with `compare_steps`,
    those too (a trial's never: it is not compared). Without them the knob is as before they existed."""
    spec = config.save_steps if probed else str(steps)
    extra = [] if trial else [s for s in config.compare_step_list() if s < steps]
    return sorted(step_list(spec, steps, "save_steps") | set(extra)) if extra else spec


def _text(p: Plan) -> dict:
    """TrainConfig's mixture of a row: TrainConfig's own (both directions and target text), or for a
    pivot-only control the pivot side alone (none given otherwise: a run's identity stays as before)."""
    return dict(mix_perception=0.0, mix_production=0.0, mix_plain=0.0, mix_pivot=1.0) if p.pivot_only else {}


def _dev_curve(config: StudyConfig, eval_steps: str) -> dict:
    """TrainConfig's dev-curve knobs (none when there is no curve: a run's identity stays as before
    the knobs existed): the study's dev pairs, sentence cap and sample seed."""
    if not eval_steps:
        return {}
    return dict(eval_steps=eval_steps, dev_pairs=config.dev_pairs, dev_max_sentence_tokens=config.max_sentence_tokens,
                dev_sample_seed=config.sample_seed)


def _weights_needed(config: StudyConfig, out: Path, row: str, seed: int) -> bool:
    """Whether a compared run must still be trained (again, if its weights went with the machine):
    the probe run until the sets are selected from it, the length-setting full run until its
    length is recorded."""
    if (row, seed) == (config.probe_row, config.seed_list()[0]) and not _finished(out, "select"):
        return True
    return _sets_length(config, row, seed) and RUN_LENGTH not in io.read_json(out / STUDY)


def _sets_length(config: StudyConfig, row: str, seed: int) -> bool:
    """The first seed's full run, with `converge`: it stops on its own plateau, every other run trains as long."""
    return config.converge and (row, seed) == ("full", config.seed_list()[0])


def tune(config: StudyConfig, out: Path, row: str, seed: int) -> None:
    """Train one comparison row, at its learning rate (chosen on dev) and the study's length."""
    try:
        row_plan(config, out, row, seed)
    except Skip:
        return   # a row that cannot run (no budget set): the report says why
    steps = config.pivot_steps if config.pivot_steps and controlled(row) != row else run_length(config, out, row, seed)
    cfg = train_config(config, out, row, seed, lr=chosen_lr(config, out, row), steps=steps)
    _train(cfg, config.isolate_runs, arm(row, seed))
    if _sets_length(config, row, seed):
        _record_length(out, stopped_at(Path(cfg.out)))


def _record_length(out: Path, steps: int) -> None:
    record = io.read_json(out / STUDY)
    record[RUN_LENGTH] = steps
    io.write_json(out / STUDY, record)


def _train(cfg: TrainConfig, isolate: bool, name: str) -> None:
    """Train in this process, or in a child of its own, so its peak memory is its own."""
    if not isolate:
        train(cfg)
        return
    handoff = Path(cfg.out) / TRAIN_CONFIG   # the config itself, not flags that could drift from it
    io.write_json(handoff, cfg.to_dict())
    _prctl()   # loaded here, before the fork
    with TRAINING_CHILDREN.start([sys.executable, "-m", "cogprobe", "train", "--config", str(handoff)],
                                 name) as child:
        _, stderr = child.communicate()
    if child.returncode != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CogprobeError(f"training {name} failed: {last}")


class Children:
    """The training children running now, so that a study that stops (a failed run, an interrupt)
    stops the runs training beside it (`parallel_runs`), and no thread starts another after that."""

    def __init__(self):
        self._lock, self._running, self._stopped = threading.Lock(), set(), False

    @contextlib.contextmanager
    def start(self, argv: list[str], name: str):
        with self._lock:   # a stop either comes first and no child starts, or after and kills it
            if self._stopped:
                raise CogprobeError(f"training {name} was not started: the study is stopping (a rerun trains it)")
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=die_with_parent)
            self._running.add(child)
        try:
            with child:
                yield child
        finally:
            with self._lock:
                self._running.discard(child)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for child in self._running:
                child.kill()

    def open(self) -> None:
        """Let children start again (a new set of runs in this process)."""
        with self._lock:
            self._stopped = False


TRAINING_CHILDREN = Children()


def run_length(config: StudyConfig, out: Path, row: str, seed: int) -> int:
    """Steps of a run: `steps`, or with `converge` where the first seed's full run stopped (that run
    itself gets `steps` as its cap). Every other run then trains exactly as long: matched rows."""
    if not config.converge or _sets_length(config, row, seed):
        return config.steps
    if RUN_LENGTH not in io.read_json(out / STUDY):   # recorded when it finished; a study begun before then
        _record_length(out, stopped_at(_full_run(config, out)))
    return int(io.read_json(out / STUDY)[RUN_LENGTH])


def stopped_at(run: Path) -> int:
    """The step a finished run stopped at (a plateau, or its cap): its manifest's stop record."""
    stop = io.read_json(run / MANIFEST).get(STOP) if (run / MANIFEST).is_file() else None
    if not stop:
        raise CogprobeError(f"{run} has not finished (no stop record in its {MANIFEST}); rerun the study to finish it")
    return int(stop["stopped_at"])


def final_dev_nll(run: Path) -> float:
    """The mean over the translation tasks of the dev NLL at the run's last curve point."""
    curve = io.read_parquet(run / DEV_CURVE)
    last = curve[curve["step"] == curve["step"].max()]
    return float(last[last["task"].isin(TASKS)]["nll"].mean())


# --- learning rates, chosen on dev ------------------------------------------------------------


def lr_trial(out: Path, row: str, lr: float) -> Path:
    return out / RUNS / LR_TRIALS / f"{row}-lr{lr:g}"


def choose_lrs(config: StudyConfig, out: Path, rows: list[str]) -> None:
    """For each row with several candidate learning rates, a short run (`lr_steps`) at each on the
    first seed (and past the grid's edge while the best sits there: `lr_choice`), scored on the dev
    curve's last point (mean NLL of the two translation tasks); the lowest wins. Rows of one kind
    share the choice of the first (the random draws). Recorded in lr_search.parquet, one row per
    (row, lr); a rerun skips the trials already recorded."""
    path = out / LR_SEARCH
    table = io.read_parquet(path) if path.exists() else pd.DataFrame(columns=lr_choice.COLUMNS)
    seed0 = config.seed_list()[0]
    for row in dict.fromkeys(kind(r) for r in rows):
        if len(config.lrs(row)) < 2:
            continue
        first = row if row != "random" else next(r for r in rows if kind(r) == "random")
        try:
            row_plan(config, out, first, seed0)
        except Skip:
            continue   # no budget set: no row to choose for

        def trial(lr: float, row=row, first=first) -> float:
            cfg = train_config(config, out, first, seed0, lr=lr, steps=config.lr_steps, folder=lr_trial(out, row, lr))
            _train(cfg, config.isolate_runs, f"{row} at lr {lr:g}")
            return final_dev_nll(Path(cfg.out))
        table = lr_choice.search(row, config.lrs(row), table, trial, config.lr_steps,
                                 lambda t: _record_trials(out, path, t))


def _record_trials(out: Path, path: Path, table: pd.DataFrame) -> None:
    """Write lr_search.parquet, then drop the weights of every trial it holds: a recorded trial is
    never read or run again, and ~400 MB a full-parameter trial over ~40 trials per language would
    fill a disk (its logs and dev curve stay)."""
    io.write_parquet(path, table)
    for row, lr in zip(table["row"], table["lr"]):
        shutil.rmtree(lr_trial(out, row, lr) / CHECKPOINTS, ignore_errors=True)


def chosen_lr(config: StudyConfig, out: Path, row: str) -> float:
    """The row's learning rate: its only candidate, or the one with the lowest dev NLL in lr_search (a
    pivot-only control: its row's, so the two differ in their text alone)."""
    grid = config.lrs(kind(controlled(row)))
    if len(grid) == 1:
        return grid[0]
    path = out / LR_SEARCH
    lr = lr_choice.chosen(io.read_parquet(path), kind(controlled(row)), grid) if path.exists() else None
    if lr is None:
        raise CogprobeError(f"{row}: its learning-rate trials are missing from {path}; rerun the study (its lr "
                            "stage runs them)")
    return lr


@functools.cache
def _prctl():
    """libc's prctl, loaded in the parent: the child between fork and exec only calls it (with runs
    trained at once, another thread may hold the import lock at the fork, so nothing is imported there)."""
    import ctypes
    return ctypes.CDLL("libc.so.6", use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """Linux: the training child gets SIGKILL when the study process dies (even by kill -9)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(1, 9)  # 1 = PR_SET_PDEATHSIG, 9 = SIGKILL


# --- probing and selection -------------------------------------------------------------------


def _probe_set(config: StudyConfig, out: Path) -> EvalSet:
    """The probe's pairs: its sample, or with `probe_chunk` the part of it the sequential probe used."""
    whole = evaluation_sets(config)["probe"]
    return (sequential.used_set(whole, out) or whole) if config.probe_chunk else whole


def _full_run(config: StudyConfig, out: Path) -> Path:
    """The first seed's full fine-tuning run: every share is a fraction of its gain; it sets the length."""
    return row_run(out, "full", config.seed_list()[0])


def probe_run_dir(config: StudyConfig, out: Path) -> Path:
    """The run whose checkpoints are swept and captured, and the budget derived from (`probe_row`)."""
    return row_run(out, config.probe_row, config.seed_list()[0])


def probe(config: StudyConfig, out: Path, checkpoints: Checkpoints | None = None) -> None:
    """Sweeps and capture of the probe run (`checkpoints`: the run already opened); with `probe_chunk`,
    its pairs in chunks until its intervals are narrow enough (`sequential`), then the controls on the
    pairs it used (a shuffled source is drawn from the set scored, so they are not swept per chunk)."""
    run, whole = probe_run_dir(config, out), evaluation_sets(config)["probe"]
    checkpoints = checkpoints or Checkpoints.open(run).to(default_device())
    if config.probe_chunk:
        used = sequential.probe(whole, out, chunk=config.probe_chunk, half_width=config.probe_half_width,
                                seconds=config.probe_seconds, read_ks=read_ks(config),
                                sweep=lambda e, folder, ks: _sweep_tasks(config, run, e, folder, checkpoints, ks,
                                                                         controls=False))
        record = io.read_json(out / EVALSETS)   # the probe's entry: the pairs it used
        record["probe"] = dict(used.to_dict(), **used.report(checkpoints.reference_tokenizer()))
        io.write_json(out / EVALSETS, record)
        table = io.read_parquet(out / SWEEPS)
        if config.sweep_controls and config.sweep_controls_at == "every":
            sweep_run(run, SweepOptions(ks=tuple(sorted(set(table["k"]))), tasks=tuple(CONTROLS)), progress=False,
                      evalset=used, out=out, log=lambda m: None, checkpoints=checkpoints)
    else:
        used = whole
        table = _sweep_tasks(config, run, whole, out, checkpoints, None, controls=True)
    if config.sweep_controls and config.sweep_controls_at == "read":
        _read_controls(config, run, used, out, checkpoints, int(max(table["checkpoint_step"])))
    _record_engine(out)
    capture_run(run, CaptureOptions(backend=config.capture_backend), progress=False, evalset=used, out=out,
                log=lambda m: None, checkpoints=checkpoints)


def _sweep_tasks(config: StudyConfig, run: Path, evalset: EvalSet, out: Path, checkpoints: Checkpoints,
                 ks: list[int] | None, controls: bool) -> pd.DataFrame:
    """The probe's sweep of `evalset` into `out` on the study's grid (ks None) or at these k's (a later
    chunk of a sequential probe: the k's its first chunk scored); `controls`: the shuffled-source
    controls beside every k too, where `sweep_controls_at` is every. The table."""
    if ks is None and config.sweep_ks:
        ks = parse_range_list(config.sweep_ks, 10**6)
    every = controls and config.sweep_controls and config.sweep_controls_at == "every"
    tasks = (*TASKS, *CONTROLS) if every else TASKS
    quiet = dict(evalset=evalset, out=out, log=lambda m: None, checkpoints=checkpoints)
    if config.sweep_grid == "adaptive" and not (evalset.window and evalset.window[0] > 0):
        return adaptive_sweep_run(run, SweepOptions(ks=ks, tasks=tasks), keep=read_ks(config), **quiet)
    return sweep_run(run, SweepOptions(ks=ks, tasks=tasks), progress=False, **quiet)


def _read_controls(config: StudyConfig, run: Path, evalset: EvalSet, out: Path, checkpoints: Checkpoints,
                   last: int) -> None:
    """The controls where the report reads them: k = 0, the read k's and every block, of the last checkpoint."""
    read = sorted({0, *read_ks(config), _block_count(str(config.model))})
    sweep_run(run, SweepOptions(ks=tuple(read), tasks=tuple(CONTROLS)), progress=False, steps=[last], evalset=evalset,
              out=out, log=lambda m: None, checkpoints=checkpoints)


def read_ks(config: StudyConfig) -> list[int]:
    """The k's the report and the selector read, scored on any grid: the report's two (`probe_ks` of
    every k) and the fixed CogSym set's ends and size (the set every layer-restricted row matches)."""
    n = _block_count(str(config.model))
    size = len(cogsym(n, config.fraction))
    return sorted((set(probe_ks(range(n + 1))) | {(size + 1) // 2, size // 2, size}) - {0})


def _record_engine(out: Path) -> None:
    """study.json names the engine, precision and peak memory of the probe's sweeps (`probe.folders`)."""
    computed = io.read_json(metadata(out / SWEEPS)).get(COMPUTED, [])
    if computed:
        record = io.read_json(out / STUDY)
        record[PROBE_ENGINE] = computed
        io.write_json(out / STUDY, record)


def select_sets(config: StudyConfig, out: Path, log, checkpoints=lambda: None) -> None:
    """The fixed set, and the budget set from the probe run (`checkpoints()`: the run, opened) where a row
    trains it: the budget rule's search is a study's costliest decision (263 s of the quick study's
    901 on a 2-core AMD EPYC when it had a budget row), so a study without one does not pay for it."""
    n = _block_count(str(config.model))
    if not (out / SELECTION_FIXED).is_file():
        io.write_json(out / SELECTION_FIXED, select_fixed(n, config.fraction).to_json())
    if (out / SELECTION_BUDGET).is_file() or not derives_budget(config.row_list()):
        return
    try:
        budget = SelectOptions(rule="budget", tau=config.tau, max_total=config.budget_max_total, gain=config.budget_gain,
                               name=SELECTION_BUDGET)
        select_run(probe_run_dir(config, out), budget, evalset=_probe_set(config, out), out=out, log=lambda m: None,
                   progress=False, checkpoints=checkpoints())
    except CogprobeError as e:  # an honest "no set": recorded, reported, and the row as budget_no_set says
        io.write_json(out / SELECTION_BUDGET, no_budget_set(config, n, str(e)))
        log(f"budget selection failed: {e}" + ("; the budget row trains the fixed set"
                                               if config.budget_no_set == "fixed" else "; the budget row is skipped"))


def no_budget_set(config: StudyConfig, n_layers: int, error: str) -> dict:
    """selection-budget.json where the budget rule found no set: its error, and with budget_no_set
    "fixed" the fixed CogSym set the row trains instead (`rows.label` names the row so); with "skip"
    the error alone (the row is not trained, and the report says why)."""
    record = {"rule": "budget", "error": error, "no_set": config.budget_no_set}
    if config.budget_no_set == "fixed":
        fixed = select_fixed(n_layers, config.fraction).to_json()
        record.update({k: fixed[k] for k in ("n_layers", "layers", "k_in", "k_out", "layers_arg")}, fallback="fixed")
    return record


# --- comparison --------------------------------------------------------------------------


def compare_one(config: StudyConfig, out: Path, row: str, seed: int) -> None:
    """Score one run on test into compare.parquet (its earlier `compare_steps` first, into
    compare_steps.parquet), each part skipped when already there."""
    path = out / COMPARE
    table = io.read_parquet(path) if path.exists() else pd.DataFrame()
    if len(table) and ((table["row"] == row) & (table["seed"] == seed)).any():
        return
    run = row_run(out, row, seed)
    if not (run / COST).is_file():
        return  # a skipped row (e.g. no budget set): the report says why
    ckpts = Checkpoints.open(run).to(default_device())
    for step in [s for s in config.compare_step_list() if s in ckpts.steps[:-1]]:
        _compare_at(config, out, run, row, seed, ckpts, step)
    manifest = io.read_json(run / MANIFEST)
    if row == "full":  # every row's share is a fraction of this run's gain
        check_healthy(run, manifest, "shares of its gain")
    record = _record(config, out, run, row, seed, ckpts, ckpts.steps[-1], arm(row, seed))
    if (run / DEV_CURVE).is_file():   # kept beside the scores: the run's weights need not stay
        io.replace_rows(out / DEV_CURVES, io.read_parquet(run / DEV_CURVE).assign(arm=arm(row, seed), row=row, seed=seed))
    table = pd.concat([table, pd.DataFrame([record])], ignore_index=True)
    io.write_parquet(path, with_shares(table, io.read_csv(out / BASELINE).iloc[0]))


def _record(config: StudyConfig, out: Path, run: Path, row: str, seed: int, ckpts: Checkpoints, step: int,
            name: str) -> dict:
    """compare's row of one run at one of its checkpoints, scored under the arm name `name`."""
    model, tok = ckpts.load(step)
    cost = io.read_json(run / COST)
    manifest = io.read_json(run / MANIFEST)
    return dict(row=row, seed=seed, blocks=manifest.get("layers_string") or "all",
                trainable_params=cost["trainable_params"], optimizer_bytes=cost["optimizer_state_bytes"],
                sec_per_step=cost["sec_per_step"], peak_mem_mb=cost["peak_memory_bytes"] / 2**20,
                weights_sha256=ckpts.weights_sha256(step), **_scores(model, tok, config, name, out))


def _compare_at(config: StudyConfig, out: Path, run: Path, row: str, seed: int, ckpts: Checkpoints,
                step: int) -> None:
    """One run scored at an earlier step into compare_steps.parquet (arm `row-sSEED@STEP`); shares are
    of full fine-tuning's gain at the same step and seed (full is compared first).

    A row already there stands if it was scored from the weights on disk. A study stopped after this
    step was scored but before the run's end was, on a machine that took the run's weights with it,
    trains the run again; on another machine that is a sibling, not a copy. So a row whose recorded
    weights differ from the checkpoint's, or that records none (written before the record existed),
    is scored again: the run's step and its end then come from one training."""
    path = out / COMPARE_STEPS
    table = io.read_parquet(path) if path.exists() else pd.DataFrame()
    mine = (table["row"] == row) & (table["seed"] == seed) & (table["step"] == step) if len(table) else None
    if mine is not None and mine.any():
        recorded = table.loc[mine, "weights_sha256"].iloc[0] if "weights_sha256" in table else None
        if isinstance(recorded, str) and recorded == ckpts.weights_sha256(step):
            return
        table = table[~mine]   # scored from other weights: scored again below (its per-example rows replaced)
    record = dict(_record(config, out, run, row, seed, ckpts, step, arm_at(row, seed, step)), step=step)
    table = pd.concat([table, pd.DataFrame([record])], ignore_index=True)
    base = io.read_csv(out / BASELINE).iloc[0]
    io.write_parquet(path, pd.concat([with_shares(t, base) for _, t in table.groupby("step", sort=True)],
                                     ignore_index=True))


def with_shares(table: pd.DataFrame, base: pd.Series) -> pd.DataFrame:
    """Share of full fine-tuning's gain each run keeps (per seed): run gain / full gain."""
    table = table.copy()
    full = table[table["row"] == "full"].set_index("seed")
    for task in TASKS:
        nll, share = f"{task}_nll", f"{task}_share"
        full_gain = table["seed"].map(base[nll] - full[nll])
        table[share] = (base[nll] - table[nll]) / full_gain.where(full_gain > 0)  # no gain, no share
        c, cshare = f"chrf_{task}", f"chrf_{task}_share"
        full_c = table["seed"].map(full[c] - base[c])
        table[cshare] = (table[c] - base[c]) / full_c.where(full_c >= MIN_CHRF_GAIN)
    return table


def _final_model(run: Path):
    ckpts = Checkpoints.open(run).to(default_device())
    return ckpts.load(ckpts.steps[-1])


# --- chrF scored again, after `chrf_pairs` changed ---------------------------------------------


def stale_chrf(config: StudyConfig, out: Path) -> dict[str, tuple[str | None, int | None]]:
    """{arm: (row, seed)} of every scored arm whose translations are not of the study's chrF set
    (`chrf_pairs` changed since it was scored): the base model first (row None), then each compared run."""
    path = out / TRANSLATIONS
    if not path.is_file():
        return {}
    _, tok = load_model(config.model)
    want = frozenset(evaluation_sets(config)["chrf"].pairs(tok).pairs["pair_id"])
    have = io.read_parquet(path).groupby("arm")["pair_id"].agg(frozenset)
    scored = {"base": (None, None)}
    if (out / COMPARE).is_file():
        table = io.read_parquet(out / COMPARE)
        scored.update({arm(r, int(s)): (r, int(s)) for r, s in zip(table["row"], table["seed"])})
    return {a: rs for a, rs in scored.items() if have.get(a) != want}


def _check_weights_kept(out: Path, stale: dict[str, tuple[str | None, int | None]]) -> None:
    """Refuse, before any arm is scored again, a change no run can follow: one whose weights are gone."""
    gone = [a for a, (row, seed) in stale.items() if row and not (row_run(out, row, seed) / CHECKPOINTS).is_dir()]
    if gone:
        t = io.read_parquet(out / TRANSLATIONS)
        n = t[(t["arm"] == gone[0]) & (t["task"] == TASKS[0])]["pair_id"].nunique()
        raise CogprobeError(f"{', '.join(gone)} scored chrF on other sentences than chrf_pairs now asks for, and "
                            f"their weights are gone, so they cannot be scored again; rerun with --chrf-pairs {n} "
                            "(the pairs they were scored on)")


def rescore_chrf(config: StudyConfig, out: Path, row: str | None, seed: int | None) -> None:
    """Translate the study's chrF set again with an arm's own weights and replace its chrF: the base
    model's in baseline.csv, a run's in compare.parquet (every share with it). The translations are
    written last, so an interruption leaves the arm stale and a rerun scores it again."""
    if row is None:
        model, tok = load_model(config.model)
        model.to(default_device())
    else:
        model, tok = _final_model(row_run(out, row, seed))
    chrfs, translations = _translations(model, tok, config, arm(row, seed) if row else "base")
    base = io.read_csv(out / BASELINE)
    if row is None:
        base = base.assign(**chrfs)
        io.write_text(out / BASELINE, base.to_csv(index=False))
        _record_evalsets(config, out, tok)
    if (out / COMPARE).is_file():
        table = io.read_parquet(out / COMPARE)
        if row is not None:
            at = (table["row"] == row) & (table["seed"] == seed)
            for name, value in chrfs.items():
                table.loc[at, name] = value
        io.write_parquet(out / COMPARE, with_shares(table, base.iloc[0]))
    io.replace_rows(out / TRANSLATIONS, translations)


# --- English prose scored again, after `prose_passages` changed (or was turned on) -------------------


def rescore_prose(config: StudyConfig, out: Path, name: str, row: str | None, seed: int | None, log) -> None:
    """Score one scored arm on the study's English passages from its own weights; an arm whose weights
    are gone keeps no English score rather than one of another passage set (the report names it)."""
    if row is not None and not (row_run(out, row, seed) / CHECKPOINTS).is_dir():
        prose_control.drop_arm(out, name)
        log(f"{name}: its weights are gone, so it has no English-prose score on this passage set")
        return
    if row is None:
        model, tok = load_model(config.model)
        model.to(default_device())
    else:
        model, tok = _final_model(row_run(out, row, seed))
    prose_control.score_arm(model, tok, config.prose_passages, name, out)
