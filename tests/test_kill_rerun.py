"""Kill -9 at a random point of `train`, `sweep` and `run`, rerun the same command: nothing lost, nothing doubled.

Each test runs the command once uninterrupted (in-process, the reference), then
starts it as `python -m cogprobe ...` in a subprocess, waits until it first
writes into its folder, sleeps a seeded random part of the reference's
duration and sends SIGKILL. The same arguments are then run again to the end,
and the results must equal the reference's exactly, with no duplicate rows and
no file under a final name that the reference lacks (interrupted writes may
leave only `.tmp-*` / `.old-*` names, which no reader looks at).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.tuning.checkpoints import Checkpoints, step_dir
from cogprobe.cli import main
from tiny import save_tiny
from helpers import corpus_rows

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # as the in-process runs (conftest)
SEED = os.environ.get("COGPROBE_KILL_SEED", "0")  # other values kill at other points (a stress run)
LEFTOVER = (".tmp-", ".old-")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "pairs.csv"
    pd.DataFrame(corpus_rows()).to_csv(corpus, index=False)
    return dict(root=root, model=save_tiny(root / "llama", "llama"), corpus=corpus)


def _state(folder: Path) -> dict:
    """Path -> (size, mtime) of everything under `folder`, tolerant of files vanishing mid-walk."""
    found = {}
    for p in folder.rglob("*") if folder.exists() else ():
        try:
            st = p.stat()
        except OSError:
            continue
        found[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return found


def final_names(folder: Path) -> set[str]:
    """Files and folders under their final names (interrupted writes' `.tmp-*`/`.old-*` left out)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if not any(part.startswith(LEFTOVER) for part in p.relative_to(folder).parts)}


def timed(argv: list) -> float:
    start = time.perf_counter()
    assert main([str(a) for a in argv]) == 0
    return time.perf_counter() - start


def kill_mid_work(argv: list, folder: Path, seconds: float, rng: random.Random) -> float:
    """Run `cogprobe argv` in a subprocess and SIGKILL it a random part of `seconds` after it first
    writes under `folder` (its output folder). A command that finished before the kill is retried
    from scratch with half the delay, so the kill always lands mid-work; returns the delay that did."""
    for _ in range(4):
        before = _state(folder)
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-m", "cogprobe", *map(str, argv)], env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + 300
            while _state(folder) == before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            delay = rng.uniform(0.05, 0.8) * seconds
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL
                return delay
            err.seek(0)
            assert proc.returncode == 0, err.read().decode()[-3000:]
        shutil.rmtree(folder)
        seconds /= 2
    pytest.fail("the command kept finishing before it could be killed")


def test_train_killed_and_resumed_equals_uninterrupted(inputs, tmp_path):
    def argv(out):
        return ["train", "--model", inputs["model"], "--corpus", inputs["corpus"], "--out", out,
                "--strategy", "full", "--steps", 40, "--save-steps", "0,8,16,24,32", "--batch-size", 2,
                "--seq-len", 32, "--lr", 3e-3, "--warmup", 4, "--weight-decay", 0.01, "--threads", 1,
                "--no-progress", "--resume"]  # --resume from the start: the rerun is the same command

    ref, out = tmp_path / "ref", tmp_path / "killed"
    seconds = timed(argv(ref))
    kill_mid_work(argv(out), out, seconds, random.Random(f"train-{SEED}"))
    assert main([str(a) for a in argv(out)]) == 0

    a, b = (pd.read_parquet(run / "train_log.parquet") for run in (ref, out))
    assert list(b["step"]) == list(range(1, 41))  # every step once
    for col in ("loss", "lr", "grad_norm", "tokens"):
        assert np.array_equal(a[col].to_numpy(), b[col].to_numpy()), col  # bit for bit
    assert Checkpoints.open(out).steps == Checkpoints.open(ref).steps == [0, 8, 16, 24, 32, 40]
    for step in (8, 16, 24, 32, 40):
        ta, tb = (load_file(str(step_dir(run, step) / "trainable.safetensors")) for run in (ref, out))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), step
    assert final_names(out) == final_names(ref)  # e.g. no optimizer state left in a finished run


def test_sweep_killed_and_rerun_equals_uninterrupted(inputs, tmp_path):
    run = tmp_path / "run"
    assert main([str(a) for a in ["train", "--model", inputs["model"], "--corpus", inputs["corpus"], "--out", run,
                                  "--strategy", "full", "--steps", 12, "--save-steps", ",".join(map(str, range(13))),
                                  "--batch-size", 2, "--seq-len", 32, "--lr", 3e-3, "--threads", 1,
                                  "--no-progress"]]) == 0

    def argv(out):
        return ["sweep", run, "--out", out, "--pairs", 3, "--batch-size", 4]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    seconds = timed(argv(ref))
    kill_mid_work(argv(out), out, seconds, random.Random(f"sweep-{SEED}"))
    partial = pd.read_parquet(out / "sweeps.parquet") if (out / "sweeps.parquet").exists() else None
    assert main([str(a) for a in argv(out)]) == 0

    a, b = (pd.read_parquet(folder / "sweeps.parquet") for folder in (ref, out))
    key = ["checkpoint_step", "task", "direction", "mode", "k", "ends"]
    assert not b.duplicated(key).any()
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    if partial is not None:  # what the killed process had written is a prefix, kept as it was
        pd.testing.assert_frame_equal(partial, b.iloc[:len(partial)], check_exact=True)
    assert final_names(out) == final_names(ref)


def test_run_killed_and_rerun_equals_uninterrupted(inputs, tmp_path):
    toml = tmp_path / "tiny.toml"  # every key of the default `quick` preset is set here, so it overrides them
    toml.write_text("\n".join([
        f'model = "{inputs["model"]}"', f'corpus = "{inputs["corpus"]}"', "steps = 4", "batch_size = 2",
        "seq_len = 32", 'save_steps = "0,2,4"', "eval_pairs = 3", "probe_pairs = 3", "chrf_pairs = 2",
        "max_new_tokens = 4", "max_sentence_tokens = 32", "threads = 1", "isolate_runs = false", "bf16 = false",
        "lr = 0.003", "lora_lr = 0.003", 'rows = "full,cogsym,middle"', 'sweep_ks = "0-6"', ""]))

    def argv(out):
        return ["run", "--out", out, "--config", toml]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    seconds = timed(argv(ref))
    kill_mid_work(argv(out), out, seconds, random.Random(f"run-{SEED}"))
    assert main([str(a) for a in argv(out)]) == 0

    timing = ["sec_per_step", "peak_mem_mb"]  # measured, not computed: they differ between any two runs
    a, b = (pd.read_parquet(folder / "compare.parquet").drop(columns=timing) for folder in (ref, out))
    assert not b.duplicated(["row", "seed"]).any()
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    for table, key in [("sweeps.parquet", ["checkpoint_step", "task", "direction", "mode", "k", "ends"]),
                       ("activations.parquet", ["checkpoint_step", "block", "site", "stat", "task"])]:
        ta, tb = (pd.read_parquet(folder / table) for folder in (ref, out))
        assert not tb.duplicated(key).any(), table
        pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert (ref / "baseline.csv").read_text() == (out / "baseline.csv").read_text()
    assert final_names(out) == final_names(ref)


# ------------------------------------------------------------------ one writer per run folder


def test_a_second_trainer_waits_for_the_first_and_a_killed_one_lets_go(inputs, tmp_path):
    """`cogprobe run` trains rows in child processes; killing it can orphan a child that is still
    writing. The run folder's lock makes the rerun's trainer wait for that child, and the OS
    releases the lock of a process killed with -9."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    argv = ["train", "--model", inputs["model"], "--corpus", inputs["corpus"], "--out", out, "--strategy", "full",
            "--steps", 2, "--save-steps", "0,2", "--batch-size", 2, "--seq-len", 24, "--threads", 1, "--no-progress"]
    codes = []
    trainer = threading.Thread(target=lambda: codes.append(main([str(a) for a in argv])), daemon=True)
    trainer.start()
    trainer.join(timeout=3)
    assert trainer.is_alive() and not any(out.iterdir())  # waiting, nothing written
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    trainer.join(timeout=120)
    assert not trainer.is_alive() and codes == [0]
    assert Checkpoints.open(out).steps == [0, 2]
