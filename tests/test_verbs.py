"""The in-memory verbs (`cogprobe.sweep`, `capture`, `select`, `compare`, `ablate`) give what their
folder forms write, and `ablate` is the experiment one sweep row measures."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cogprobe
from cogprobe.core.errors import CogprobeError
from cogprobe.core.io import read_parquet, write_parquet
from cogprobe.data.tasks import score
from cogprobe.models.blocks import find_blocks
from tiny import LAYERS, tiny_model


@pytest.fixture(scope="module")
def folders(trained_run, tmp_path_factory):
    """The folder forms' tables of the shared tiny run, written once into a copy-free output folder."""
    out = tmp_path_factory.mktemp("verbs")
    dev = cogprobe.EvalSet.for_run(trained_run["run"], split="dev", n=3)
    cogprobe.sweep_run(trained_run["run"], ks=(0, 1, 3, 6), evalset=dev, out=out, progress=False, log=lambda m: None)
    cogprobe.capture_run(trained_run["run"], alignment=False, evalset=dev, out=out, progress=False,
                         log=lambda m: None)
    return dict(out=out, dev=dev, run=trained_run["run"])


def test_sweep_in_memory_equals_the_folder_table(folders):
    table = cogprobe.sweep(folders["run"], folders["dev"], cogprobe.SweepOptions(ks=(0, 1, 3, 6)))
    pd.testing.assert_frame_equal(table, read_parquet(folders["out"] / "sweeps.parquet"), check_dtype=False)


def test_capture_in_memory_equals_the_folder_table(folders):
    acts, aligned = cogprobe.capture(folders["run"], folders["dev"], alignment=False)
    assert aligned.empty
    pd.testing.assert_frame_equal(acts, read_parquet(folders["out"] / "activations.parquet"), check_dtype=False)


def test_select_in_memory_equals_the_folder_form(folders):
    sweeps = read_parquet(folders["out"] / "sweeps.parquet")
    fixed = cogprobe.select(sweeps, rule="fixed", n_blocks=LAYERS)
    assert fixed.layers == cogprobe.select_run(folders["run"], rule="fixed", out=folders["out"],
                                               name="fixed.json").layers
    with pytest.raises(CogprobeError, match="use cogprobe.select_run"):
        cogprobe.select(sweeps, rule="budget")
    with pytest.raises(CogprobeError, match="n_blocks"):
        cogprobe.select(sweeps, cogprobe.SelectOptions(rule="fixed"))


def test_ablate_reverting_k_input_blocks_scores_the_sweep_row_of_that_k(folders):
    ckpts = cogprobe.Checkpoints.open(folders["run"])
    (ref, tok), ck = ckpts.load(0), ckpts.load(4)[0]
    row = read_parquet(folders["out"] / "sweeps.parquet").query(
        "checkpoint_step == 4 and task == 'perception' and direction == 'input' and k == 3").iloc[0]
    before = [p.detach().clone() for p in ck.parameters()]
    with torch.no_grad(), cogprobe.ablate(ck, ref, range(3)) as ablated:
        nll = score(ablated, folders["dev"].examples(tok, ["perception"])["perception"]).nll
    assert nll == pytest.approx(row["nll"], abs=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, ck.parameters()))      # restored
    assert not set(map(id, find_blocks(ck).modules)) & set(map(id, find_blocks(ref).modules))


def test_ablate_restores_on_error_and_refuses_what_it_cannot_do():
    ref, ck = tiny_model("llama"), tiny_model("llama", seed=1)
    blocks = list(find_blocks(ck).modules)
    with pytest.raises(RuntimeError, match="inside"):
        with cogprobe.ablate(ck, None, "0-1", mode="skip"):
            raise RuntimeError("inside")
    assert list(find_blocks(ck).modules) == blocks
    with pytest.raises(CogprobeError, match="needs the reference"):
        with cogprobe.ablate(ck, None, [0]):
            pass
    with pytest.raises(CogprobeError, match="out of range"):
        with cogprobe.ablate(ck, ref, [LAYERS]):
            pass


def test_compare_reads_a_study_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for task in ("perception", "production"):
        for arm, mean in {"base": 5.0, "full-s0": 4.0, "cogsym-s0": 4.1}.items():
            sums = rng.normal(mean, 0.1, 32) * 10
            rows.append(pd.DataFrame(dict(arm=arm, task=task, pair_id=range(32), nll_sum=sums, n_tokens=10)))
    write_parquet(tmp_path / "scores.parquet", pd.concat(rows, ignore_index=True))
    write_parquet(tmp_path / "compare.parquet", pd.DataFrame(dict(row=["full", "cogsym"], seed=[0, 0])))
    table = cogprobe.compare(tmp_path)
    share = table[(table["row"] == "cogsym") & (table["task"] == "perception") & (table["quantity"] == "share")]
    assert share.iloc[0]["low"] < 0.9 < share.iloc[0]["high"]
    with pytest.raises(CogprobeError, match="no compare.parquet"):
        cogprobe.compare(tmp_path / "missing")
