"""Fault injection: every artifact kind, damaged every way, read by every verb that reads it.

The folders are built once per module (a finished full run with its tables, a
LoRA run, a run interrupted after its step-2 checkpoint, and a study folder
around a copy of the full run) and copied per case. Each case damages one file
(deleted, truncated, emptied, overwritten with random bytes, or replaced by a
valid file of the wrong content), runs one verb through `cogprobe.cli.main`,
and asserts:
  - a refusal: exit 2 (verify: 1), one `cogprobe: error:` line naming the file,
    no traceback, and every other file of the folder byte-identical;
  - or, where a missing file is legitimate (a table not computed yet) or is
    rebuilt (a derived table), exit 0 and the rebuilt table equal to the original.
The last tests cover a full disk (a real small tmpfs when this process may mount
one, a writer patched to fail otherwise) and a second writer on one run folder.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.cli import main
from cogprobe.studyconfig import StudyConfig
from cogprobe.train import train
from cogprobe.trainconfig import TrainConfig
from test_reliability import corpus_rows, train_argv
from tiny import save_tiny

SWEEP = ["--limit", "2"]
RUN = dict(steps=4, save_steps="0,2,4")


# ------------------------------------------------------------------ the folders, built once


class Stop(Exception):
    """Raised from on_step: the run is interrupted like a killed one (its finally blocks run)."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny(root / "llama", "llama")
    corpus = root / "pairs.csv"
    pd.DataFrame(corpus_rows()).to_csv(corpus, index=False)
    folders = dict(run=root / "run", lora=root / "lora", unfinished=root / "unfinished", study=root / "study")
    inputs = dict(model=model, corpus=corpus, toml=root / "study.toml", folders=folders)
    run = folders["run"]
    assert cli(train_argv(model, corpus, run, **RUN)) == 0
    assert cli(["sweep", run, *SWEEP]) == 0
    assert cli(["capture", run, "--limit", "2"]) == 0
    assert cli(["select", run, "--rule", "curves", "--limit", "2"]) == 0
    shutil.copy(run / "sweeps.parquet", run / ".sweeps.parquet.part-0-of-2")  # left by an interrupted 2-process sweep
    assert cli(train_argv(model, corpus, folders["lora"], strategy="lora", steps=2, save_steps="0,2")) == 0
    _interrupted_run(inputs)
    _study(inputs)
    return inputs


def _interrupted_run(inputs) -> None:
    """The run of `train_argv(**RUN)` stopped during step 3: step-2 holds the resume state."""
    args = dict(model=str(inputs["model"]), corpus=str(inputs["corpus"]), out=str(inputs["folders"]["unfinished"]),
                strategy="full", batch_size=2, seq_len=24, threads=1, lr=1e-2, warmup=0.0, progress=False, **RUN)

    def stop(step, model, loss):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        train(TrainConfig(**args), on_step=stop)


def _study(inputs) -> None:
    """A study folder as `cogprobe run` leaves it, around a copy of the full run (not recomputed: only
    its files matter here)."""
    study = inputs["folders"]["study"]
    settings = dict(model=str(inputs["model"]), corpus=str(inputs["corpus"]), sweep_ks="0-6", steps=4)
    inputs["toml"].write_text("".join(f'{k} = {v if isinstance(v, int) else repr(v)}\n' for k, v in settings.items()))
    (study / "runs").mkdir(parents=True)
    shutil.copytree(inputs["folders"]["run"] / "checkpoints", study / "runs" / "full-s0" / "checkpoints")
    for name in ("manifest.json", "train_log.parquet", "cost.json"):
        shutil.copy(inputs["folders"]["run"] / name, study / "runs" / "full-s0" / name)
    for name in ("sweeps.parquet", "sweeps.parquet.json"):
        shutil.copy(inputs["folders"]["run"] / name, study / name)
    assert cli(["verify", study / "runs" / "full-s0"]) == 0
    import json
    (study / "study.json").write_text(json.dumps(StudyConfig(out=str(study), **settings).to_dict()))
    pd.DataFrame([dict(perception_nll=5.0, production_nll=6.0, chrf_perception=1.0, chrf_production=1.0)]).to_csv(
        study / "baseline.csv", index=False)
    pd.DataFrame([dict(strategy="full", seed=0, perception_nll=4.0, production_nll=5.0)]).to_parquet(
        study / "compare.parquet")


# ------------------------------------------------------------------ damages


def _foreign(path: Path) -> None:
    """A valid file of the right format and the wrong content."""
    if path.name.endswith(".json"):
        path.write_text('{"valid": "json"}')
    elif ".parquet" in path.name:
        pd.DataFrame({"x": [1]}).to_parquet(path)
    elif path.suffix == ".safetensors":
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path.write_text("x\n1\n")


DAMAGES = {
    "deleted": lambda p: p.unlink(),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(max(p.stat().st_size, 64))),
    "foreign": _foreign,
}


# ------------------------------------------------------------------ artifacts and the verbs that read them


def _verbs(inputs) -> dict:
    m, c = inputs["model"], inputs["corpus"]
    return {
        "sweep": lambda f: ["sweep", f, *SWEEP],
        "capture": lambda f: ["capture", f, "--limit", "2"],
        "select": lambda f: ["select", f, "--rule", "curves", "--limit", "2"],
        "plot": lambda f: ["plot", f],
        "train": lambda f: train_argv(m, c, f, **RUN),  # the same command again
        "train --resume": lambda f: train_argv(m, c, f, **RUN) + ["--resume"],
        "train --layers": lambda f: train_argv(m, c, f.parent / "new", strategy="layers", layers=f / "selection.json"),
        "run": lambda f: ["run", "--out", f, "--config", inputs["toml"]],
        "verify": lambda f: ["verify", f],
    }


# artifact: (folder, file, verbs that read it, verbs for which its absence is fine, verbs that rebuild it)
ARTIFACTS = {
    "manifest": ("run", "manifest.json", ["sweep", "capture", "select", "train", "verify"], [], []),
    "checkpoint meta": ("run", "checkpoints/step-2/meta.json", ["sweep", "capture", "select", "verify"], [], []),
    "checkpoint tensors": ("run", "checkpoints/step-2/trainable.safetensors", ["sweep", "capture", "select", "verify"],
                           [], []),
    "training log": ("run", "train_log.parquet", ["plot", "verify"], ["plot"], []),
    "cost": ("run", "cost.json", ["verify"], [], []),
    "sweep table": ("run", "sweeps.parquet", ["sweep", "select", "plot", "verify"], ["plot", "verify"], ["sweep"]),
    "sweep metadata": ("run", "sweeps.parquet.json", ["sweep", "verify"], [], []),
    "sweep part": ("run", ".sweeps.parquet.part-0-of-2", ["verify"], ["verify"], []),
    "capture table": ("run", "activations.parquet", ["capture", "plot", "verify"], ["plot", "verify"], ["capture"]),
    "capture metadata": ("run", "activations.parquet.json", ["capture", "verify"], [], []),
    "selection": ("run", "selection.json", ["train --layers", "verify"], ["verify"], []),
    "adapter tensors": ("lora", "checkpoints/step-2/adapter_model.safetensors", ["sweep", "verify"], [], []),
    "adapter config": ("lora", "checkpoints/step-2/adapter_config.json", ["sweep", "verify"], [], []),
    "resume manifest": ("unfinished", "manifest.json", ["train --resume", "verify"], [], []),
    "resume tensors": ("unfinished", "checkpoints/step-2/trainable.safetensors", ["train --resume", "verify"], [], []),
    "resume log": ("unfinished", "train_log.parquet", ["train --resume", "verify"], [], []),
    "optimizer state": ("unfinished", "checkpoints/step-2/resume/optimizer.safetensors", ["train --resume", "verify"],
                        [], []),
    "optimizer state json": ("unfinished", "checkpoints/step-2/resume/state.json", ["train --resume", "verify"], [], []),
    "study config": ("study", "study.json", ["run", "verify"], [], []),
    "study baseline": ("study", "baseline.csv", ["verify"], ["verify"], []),
    "study comparison": ("study", "compare.parquet", ["plot", "verify"], ["plot", "verify"], []),
    "study run tensors": ("study", "runs/full-s0/checkpoints/step-4/trainable.safetensors", ["verify"], [], []),
}
CASES = [(a, d, v) for a, (_, _, verbs, _, _) in ARTIFACTS.items() for d in DAMAGES for v in verbs]
# Refusals whose line names the folder's state rather than the file (the file is gone: there is nothing to name).
NAMED_OTHERWISE = {("study config", "deleted", "run"): "holds no cogprobe study"}


def cli(argv: list) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes (folders: "dir")."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_the_matrix_is_what_the_report_says():
    kinds = len(ARTIFACTS)
    assert (kinds, len(DAMAGES), len(CASES)) == (22, 5, 250)  # the note quotes these numbers
    assert {v for a in ARTIFACTS.values() for v in a[2]} == {"sweep", "capture", "select", "plot", "train",
                                                             "train --resume", "train --layers", "run", "verify"}


@pytest.mark.parametrize("artifact, damage, verb", CASES)
def test_damaged_artifact(inputs, tmp_path, capsys, artifact, damage, verb):
    key, name, _, absent_ok, rebuilds = ARTIFACTS[artifact]
    folder = shutil.copytree(inputs["folders"][key], tmp_path / key)
    DAMAGES[damage](folder / name)
    before = snapshot(folder)
    capsys.readouterr()
    code = cli(_verbs(inputs)[verb](folder))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if damage == "deleted" and verb in rebuilds:
        assert code == 0, err
        pd.testing.assert_frame_equal(pd.read_parquet(folder / name), pd.read_parquet(inputs["folders"][key] / name))
        return
    if damage == "deleted" and verb in absent_ok:
        assert code == 0, err
        return
    named = NAMED_OTHERWISE.get((artifact, damage, verb), Path(name).name)
    if verb == "verify":
        lines = out.strip().splitlines()
        assert code == 1 and lines[-1].endswith("problem(s)"), out
        assert any(named in line for line in lines[:-1]), out
    else:
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("cogprobe: error: ") and named in lines[0], err
    assert snapshot(folder) == before, "the refusal changed the folder"
