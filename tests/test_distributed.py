"""Several processes (torchrun, gloo on CPU) give what one process gives.

Training: `--batch-size` is the global batch, so 2 processes follow the 1-process
loss curve to float tolerance and save the same checkpoints; only rank 0 writes.
Sweeps and capture: the ranks' parts merge into the 1-process table exactly
(same per-process thread count: torchrun sets one thread, as conftest does here).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import cogprobe.probe.folders as probe
from cogprobe.core.distributed import World
from cogprobe.data.evalset import EvalSet
from cogprobe.probe.folders import capture_run, sweep_run
from cogprobe.tuning.loop import TrainConfig, train
from helpers import write_corpus
from helpers import ThreadWorld, run_as_ranks
from tiny import save_tiny

TRAIN_FLAGS = dict(strategy="full", steps=4, batch_size=4, seq_len=24, lr=1e-2, warmup=0, save_steps="0,2",
                   threads=1, progress=False)
EVAL = dict(n=3, max_sentence_tokens=32)


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m cogprobe ARGS` (a free port, 2 processes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cogprobe", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        name = "--" + k.replace("_", "-")
        out += [name] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [name, str(v)]
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return dict(model=save_tiny(root / "llama", "llama"), corpus=write_corpus(root / "corpus.csv"), root=root)


@pytest.fixture(scope="module")
def single_run(inputs):
    """The 1-process reference run of the same command."""
    return train(TrainConfig(model=inputs["model"], corpus=inputs["corpus"], out=inputs["root"] / "one",
                             **TRAIN_FLAGS))


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def test_two_process_training_follows_the_single_process_run(inputs, single_run):
    out = inputs["root"] / "two"
    done = torchrun("train", *flags(model=inputs["model"], corpus=inputs["corpus"], out=out, **TRAIN_FLAGS))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(out)]  # printed once, by rank 0
    one, two = (pd.read_parquet(r / "train_log.parquet") for r in (single_run, out))
    assert two["tokens"].tolist() == one["tokens"].tolist()  # the global batch, not N times it
    for col in ("loss", "grad_norm", "lr"):
        assert two[col].to_numpy() == pytest.approx(one[col].to_numpy(), rel=1e-5, abs=1e-6)
    assert files(out) == files(single_run)  # nothing extra from rank 1
    for step in (2, 4):
        a = load_file(str(single_run / f"checkpoints/step-{step}/trainable.safetensors"))
        b = load_file(str(out / f"checkpoints/step-{step}/trainable.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            # Adam divides by the gradient's own scale, so a float-order difference in a near-zero
            # gradient moves its weight by up to ~1e-5 of lr=1e-2 steps: far below one step (1e-2)
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)


def test_two_process_lora_layers_training_follows_the_single_process_run(inputs):
    cfg = dict(TRAIN_FLAGS, strategy="lora-layers", layers="0,5", lora_dropout=0.0)
    one = train(TrainConfig(model=inputs["model"], corpus=inputs["corpus"], out=inputs["root"] / "lora1", **cfg))
    out = inputs["root"] / "lora2"
    done = torchrun("train", *flags(model=inputs["model"], corpus=inputs["corpus"], out=out, **cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (pd.read_parquet(r / "train_log.parquet") for r in (one, out))
    assert b["loss"].to_numpy() == pytest.approx(a["loss"].to_numpy(), rel=1e-5, abs=1e-6)
    assert files(out) == files(one)


def test_two_process_training_with_the_chunked_loss_follows_the_single_process_run(inputs, single_run):
    """--loss-chunk-tokens goes through the model's own forward, so DDP syncs its gradients as for the own loss."""
    out = inputs["root"] / "two-chunked"
    done = torchrun("train", *flags(model=inputs["model"], corpus=inputs["corpus"], out=out, loss_chunk_tokens=5,
                                    **TRAIN_FLAGS))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (pd.read_parquet(r / "train_log.parquet") for r in (single_run, out))
    for col in ("loss", "grad_norm"):
        assert two[col].to_numpy() == pytest.approx(one[col].to_numpy(), rel=1e-5, abs=1e-6)
    a = load_file(str(single_run / "checkpoints/step-4/trainable.safetensors"))
    b = load_file(str(out / "checkpoints/step-4/trainable.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4)


def test_two_processes_score_the_same_dev_curve_and_stop_at_the_same_step(inputs):
    """Every process scores the dev set (DDP's forward collectives stay in step) and the main process's
    plateau decision is everyone's: the curve and the stop are the single-process run's."""
    import json
    cfg = dict(TRAIN_FLAGS, steps=200, save_steps="6", eval_steps="every:2", dev_pairs=3, schedule="constant",
               stop_on_plateau=True)
    one = train(TrainConfig(model=inputs["model"], corpus=inputs["corpus"], out=inputs["root"] / "curve1", **cfg))
    out = inputs["root"] / "curve2"
    done = torchrun("train", *flags(model=inputs["model"], corpus=inputs["corpus"], out=out, **cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (pd.read_parquet(r / "dev_curve.parquet") for r in (one, out))
    assert list(zip(a["step"], a["task"])) == list(zip(b["step"], b["task"]))
    assert b["nll"].to_numpy() == pytest.approx(a["nll"].to_numpy(), rel=1e-4)
    stops = [json.loads((r / "manifest.json").read_text())["stop"] for r in (one, out)]
    assert stops[0]["stop_reason"] == "plateau" and stops[1]["stopped_at"] == stops[0]["stopped_at"]
    assert files(out) == files(one)


def test_a_global_batch_that_does_not_split_fails_in_one_line(inputs):
    out = inputs["root"] / "odd"
    done = torchrun("train", *flags(model=inputs["model"], corpus=inputs["corpus"], out=out,
                                    **dict(TRAIN_FLAGS, batch_size=3)))
    assert done.returncode != 0
    assert "--batch-size 3 is the global batch and does not split over 2 processes" in done.stderr
    assert not out.exists()


def test_two_process_sweep_and_capture_equal_the_single_process_tables(inputs, single_run):
    one, two = inputs["root"] / "tables1", inputs["root"] / "tables2"
    sweep_run(single_run, evalset=EvalSet.for_run(single_run, **EVAL), batch_size=2, out=one, log=lambda _: None)
    capture_run(single_run, evalset=EvalSet.for_run(single_run, **EVAL), batch_size=2, out=one, log=lambda _: None)
    common = [str(single_run), "--out", str(two), "--pairs", "3", "--max-sentence-tokens", "32", "--batch-size", "2"]
    for verb in ("sweep", "capture"):
        done = torchrun(verb, *common)
        assert done.returncode == 0, done.stderr[-3000:]
    for table in ("sweeps.parquet", "activations.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(two / table), pd.read_parquet(one / table), check_exact=True)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # parts merged, gone


def test_ranks_write_parts_and_the_main_one_merges_in_single_process_order(inputs, single_run, monkeypatch):
    one, out = inputs["root"] / "order1", inputs["root"] / "order3"
    kw = dict(evalset=EvalSet.for_run(single_run, **EVAL), batch_size=2, log=lambda _: None)
    sweep_run(single_run, out=one, **kw)
    expected = pd.read_parquet(one / probe.SWEEPS)
    opened = [probe.open_checkpoints(single_run) for _ in range(3)]  # loading models is not thread-safe
    for c in opened:
        c.reference()
    tables = run_as_ranks(monkeypatch, 3, lambda: sweep_run(opened[probe.world().rank], out=out, **kw))
    for table in tables:
        pd.testing.assert_frame_equal(table, expected, check_exact=True)
    assert not list(out.glob(".*part-*"))


def test_overwrite_drops_parts_of_an_interrupted_sharded_sweep(inputs, single_run):
    out = inputs["root"] / "stale"
    kw = dict(evalset=EvalSet.for_run(single_run, **EVAL), batch_size=2, log=lambda _: None)
    table = sweep_run(single_run, out=out, **kw)
    stale = World(1, 2, None).part(out / probe.SWEEPS)  # as an interrupted 2-process sweep leaves it
    table.head(3).to_parquet(stale)
    again = sweep_run(single_run, out=out, overwrite=True, **kw)
    assert not stale.exists()
    pd.testing.assert_frame_equal(again, table, check_exact=True)


def test_world_shares_cover_every_item_once():
    items = list(range(11))
    for size in (1, 2, 3, 4):
        chunks = [World(r, size, None).chunk(items) for r in range(size)]
        shares = [World(r, size, None).share(items) for r in range(size)]
        assert sum(chunks, []) == items  # contiguous, in order
        assert sorted(sum(shares, [])) == items
    assert World(0, 1, None).part(Path("t.parquet")) == Path("t.parquet")
    assert World(1, 2, None).part(Path("d/t.parquet")) == Path("d/.t.parquet.part-1-of-2")
