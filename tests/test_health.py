"""Training health: the divergence rule, what a diverging or non-finite run records, and who refuses it.

The rule (cogprobe/tuning/health.py): the loss stays above FACTOR x the first logged loss
for PATIENCE steps in a row. The tests build a diverging run from a learning
rate that is far too high (the loss climbs from ~6 to ~24 on the tiny model) and
check the event against the rule applied to the run's own log.
"""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.core.errors import CogprobeError
from cogprobe.tuning.health import FACTOR, PATIENCE, Monitor, check_healthy
from helpers import cli, corpus_rows, train_argv
from tiny import save_tiny

DIVERGING = dict(steps=8, save_steps="0,2,8", lr=1.0, max_grad_norm=0, schedule="constant")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    corpus = root / "pairs.csv"
    pd.DataFrame(corpus_rows()).to_csv(corpus, index=False)
    return dict(model=save_tiny(root / "llama", "llama"), corpus=corpus)


def _first_divergence(losses: list[float]) -> int | None:
    """The rule, written out over a whole log: the step whose loss completes PATIENCE in a row above FACTOR x the first."""
    run = 0
    for step, loss in enumerate(losses[1:], start=2):
        run = run + 1 if loss > FACTOR * losses[0] else 0
        if run == PATIENCE:
            return step
    return None


def test_the_rule():
    m = Monitor()
    first = 6.0
    said = [m.update(s, loss, 1.0) for s, loss in enumerate([first, 13, 13, 5, 13, 13, 13, 13, 13], start=1)]
    assert [s for s, text in enumerate(said, start=1) if text] == [7]  # a dip resets the count; said once
    assert "training diverged at step 7: the loss (13) has stayed above 2x the first loss (6) for 3 steps" in said[6]
    assert Monitor(first_loss=6.0).update(1, 12.5, 1.0) is None  # one high loss is not a divergence


def test_a_diverging_run_warns_and_records_it(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [a for a in train_argv(inputs["model"], inputs["corpus"], out, **DIVERGING) if a != "--no-progress"]
    assert cli(argv) == 0
    err = capsys.readouterr().err
    losses = list(pd.read_parquet(out / "train_log.parquet")["loss"])
    step = _first_divergence(losses)
    assert step is not None, losses  # the premise: this lr does diverge
    warnings = [l for l in err.splitlines() if l.startswith("cogprobe: warning:")]
    assert len(warnings) == 1 and f"training diverged at step {step}: " in warnings[0]
    assert "health=DIVERGED" in err  # the progress bar
    events = json.loads((out / "manifest.json").read_text())["health"]["events"]
    assert [(e["kind"], e["step"]) for e in events] == [("divergence", step)]
    assert Checkpoints.open(out).steps == [0, 2, 8]  # warn: the run goes on


def test_on_divergence_stop(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(train_argv(inputs["model"], inputs["corpus"], out, on_divergence="stop", **DIVERGING)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"training diverged at step (\d+): .*training stopped \(--on-divergence "
                                         r"stop\); checkpoints up to step-2 are kept", lines[0]), lines
    step = int(re.search(r"at step (\d+)", lines[0]).group(1))
    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log["step"]) == list(range(1, step + 1)) and _first_divergence(list(log["loss"])) == step
    assert Checkpoints.open(out).steps == [0, 2]
    assert json.loads((out / "manifest.json").read_text())["health"]["events"][0]["step"] == step


def test_a_non_finite_loss_is_recorded(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(train_argv(inputs["model"], inputs["corpus"], out, steps=6, save_steps="0,1,3", lr=1e30)) == 2
    events = json.loads((out / "manifest.json").read_text())["health"]["events"]
    assert [(e["kind"], e["step"]) for e in events] == [("non-finite", 2)]
    assert re.fullmatch(r"training stopped at step 2 on a non-finite value \((loss|gradient norm) (nan|inf)\)",
                        events[0]["message"])
    from cogprobe.checks import verify
    assert verify(out) == [f"{out}: {events[0]['message']}"]  # stopped on purpose: no "unfinished" nagging


def test_a_healthy_run_records_nothing(inputs, tmp_path):
    out = tmp_path / "run"
    assert cli(train_argv(inputs["model"], inputs["corpus"], out, steps=4, save_steps="0,4", lr=1e-3)) == 0
    assert "health" not in json.loads((out / "manifest.json").read_text())


def test_the_study_refuses_shares_of_a_diverged_full_run(inputs, tmp_path):
    from cogprobe.study.pipeline import compare_one
    from cogprobe.study.config import StudyConfig
    study = tmp_path / "study"
    run = study / "runs" / "full-s0"
    assert cli(train_argv(inputs["model"], inputs["corpus"], run, **DIVERGING)) == 0
    config = StudyConfig(out=str(study), model=str(inputs["model"]), corpus=str(inputs["corpus"]), sweep_ks="0-6")
    with pytest.raises(CogprobeError, match=r"full-s0: training diverged at step \d+: .*; shares of its gain would be "
                                            r"meaningless: retrain it with a lower learning rate"):
        compare_one(config, study, "full", 0)
    assert not (study / "compare.parquet").exists()


def test_check_healthy_passes_a_healthy_manifest(tmp_path):
    check_healthy(tmp_path, {"config": {}}, "anything")
    with pytest.raises(CogprobeError, match="went wrong; x would be"):
        check_healthy(tmp_path, {"health": {"events": [{"message": "went wrong"}]}}, "x")


def test_on_divergence_takes_warn_or_stop(inputs, tmp_path, capsys):
    assert cli(train_argv(inputs["model"], inputs["corpus"], tmp_path / "run", on_divergence="maybe")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cogprobe: error: on_divergence='maybe': use warn or stop"]
    assert not (tmp_path / "run").exists()
