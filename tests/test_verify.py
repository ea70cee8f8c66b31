"""`cogprobe verify`: each kind of problem is found and named on its own line, and a sound folder is "all is well".

The fault matrix (test_faults.py) checks that verify names every damaged file;
these tests cover what only verify looks for: a changed file of the right size,
a checkpoint the manifest lists but the folder lacks, tables from another run,
a log that disagrees with the checkpoints, an unfinished run.
"""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.tuning.checkpoints import step_dir
from cogprobe.checks import verify
from helpers import SWEEP, Stop, cli, corpus_rows, train_argv
from tiny import save_tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, trained_run):
    run = shutil.copytree(trained_run["run"], tmp_path_factory.mktemp("verify") / "run")
    assert cli(["sweep", run, *SWEEP]) == 0
    return dict(run=run, model=trained_run["model"], corpus=trained_run["corpus"])


@pytest.fixture
def run(pristine, tmp_path):
    return shutil.copytree(pristine["run"], tmp_path / "run")


def _edit_json(path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def test_a_sound_run_is_all_well(run, capsys):
    assert verify(run) == []
    assert cli(["verify", run]) == 0
    assert capsys.readouterr().out.strip().endswith("all is well")


def test_a_changed_byte_is_found_by_its_checksum_and_refused_by_every_reader(run, capsys):
    """Same size, header intact: only the SHA-256 recorded when the file was written tells."""
    path = step_dir(run, 2) / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify(run) == [f"{path} (checkpoint tensors) differs from what was written (its SHA-256 is not the one "
                           f"recorded when it was saved); delete {path.parent} to leave that checkpoint out, or "
                           "retrain with `cogprobe train ... --overwrite`"]
    assert cli(["sweep", run, *SWEEP, "--overwrite"]) == 2
    assert "differs from what was written" in capsys.readouterr().err


def test_a_listed_checkpoint_that_is_gone(run):
    shutil.rmtree(step_dir(run, 2))
    lines = verify(run)
    assert len(lines) == 2 and f"{step_dir(run, 2)} is missing (manifest.json lists it)" in lines[0]
    assert "sweeps.parquet (the sweep table) holds rows of step(s) [2], which are not checkpoints" in lines[1]


def test_a_table_of_another_run(run):
    _edit_json(run / "sweeps.parquet.json", lambda meta: meta["source"]["run"].update(lr=0.5))
    assert [l.split(" (")[0] for l in verify(run)] == [str(run / "sweeps.parquet")]
    assert "was computed from another run than this folder's" in verify(run)[0]


def test_rows_twice_and_rows_of_steps_the_run_lacks(run):
    table = pd.read_parquet(run / "sweeps.parquet")
    extra = table[table["checkpoint_step"] == 4].assign(checkpoint_step=3)
    pd.concat([table, table.iloc[:1], extra]).to_parquet(run / "sweeps.parquet")
    lines = verify(run)
    assert len(lines) == 2
    assert "holds some rows twice" in lines[0] and "holds rows of step(s) [3], which are not checkpoints" in lines[1]


def test_a_log_that_disagrees_with_the_checkpoints(run):
    _edit_json(step_dir(run, 2) / "meta.json", lambda meta: meta.update(train_loss=1.0))
    lines = verify(run)
    assert len(lines) == 1 and "train_log.parquet (the training log) disagrees with the checkpoints' losses at " \
                               "step(s) [2]" in lines[0]
    log = pd.read_parquet(run / "train_log.parquet")
    log.iloc[[0, 2, 1, 3]].to_parquet(run / "train_log.parquet")
    assert any("does not hold every step once, in order" in line for line in verify(run))


@pytest.mark.parametrize("change, says", [
    (dict(tokens_seen=10**9), "train_log.parquet (the training log) disagrees with the checkpoints' tokens seen at "
                              "step(s) [4]"),
    (dict(strategy="layers"), "step-4/meta.json (a checkpoint's record) names strategy 'layers', the manifest 'full'"),
])
def test_a_checkpoint_record_that_the_run_contradicts(run, change, says):
    _edit_json(step_dir(run, 4) / "meta.json", lambda meta: meta.update(change))
    lines = verify(run)
    assert len(lines) == 1 and says in lines[0], lines


def test_a_cost_record_that_the_manifest_contradicts(run):
    """compare.parquet copies cost.json's trainable_params: it must be the count the manifest recorded."""
    _edit_json(run / "cost.json", lambda cost: cost.update(trainable_params=1))
    lines = verify(run)
    assert len(lines) == 1 and "cost.json (the run's cost record) counts 1 trainable parameters, the manifest" \
        in lines[0], lines


def test_several_problems_one_line_each(run, capsys):
    (run / "cost.json").write_text("{")
    (step_dir(run, 4) / "trainable.safetensors").write_bytes(b"")
    (run / "sweeps.parquet.json").unlink()
    assert cli(["verify", run]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"{run}: 3 problem(s)"
    assert [next(w for w in ("step-4", "cost.json", "sweeps.parquet.json") if w in line) for line in lines[:-1]] == \
           ["step-4", "cost.json", "sweeps.parquet.json"]


def test_an_unfinished_run(pristine, tmp_path):
    from cogprobe.tuning.loop import train
    from cogprobe.tuning.config import TrainConfig

    def stop(step, model, loss):
        if step == 3:
            raise Stop()

    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(TrainConfig(model=str(pristine["model"]), corpus=str(pristine["corpus"]), out=str(out), strategy="full",
                          steps=4, save_steps="0,2,4", batch_size=2, seq_len=24, threads=1, progress=False),
              on_step=stop)
    assert verify(out) == [f"{out} is an unfinished run (last checkpoint step-2 of 4 steps); rerun the same "
                           "`cogprobe train` with --resume to finish it"]


def test_a_checkpoint_without_recorded_checksums_is_a_problem(run, capsys):
    """A weight file with no SHA-256 in its meta.json could change unseen: verify names it, and a reader
    refuses it, even before a bit of it changes (then only the header would have been checked)."""
    _edit_json(step_dir(run, 4) / "meta.json", lambda meta: meta.pop("sha256"))
    path = step_dir(run, 4) / "trainable.safetensors"
    assert verify(run) == [f"{path} (checkpoint tensors) has no SHA-256 in meta.json, so a change to its bytes "
                           f"would go unseen; delete {path.parent} to leave that checkpoint out, or retrain with "
                           "`cogprobe train ... --overwrite`"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert len(verify(run)) == 1 and "has no SHA-256 in meta.json" in verify(run)[0]
    assert cli(["sweep", run, *SWEEP, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no SHA-256 in meta.json" in err[0]


@pytest.mark.parametrize("step, kind, says", [
    (4, "base", "says kind 'base' but the folder holds trainable.safetensors"),
    (2, "lora", "says kind 'lora' but the folder holds trainable.safetensors"),
    (0, "tensors", "says kind 'tensors' at step-0: only step 0 is the base model"),
    (4, "model", "names kind 'model', which is none of base, tensors, lora"),
])
def test_a_checkpoint_kind_that_its_folder_contradicts(run, capsys, step, kind, says):
    """`kind` decides how a checkpoint is read: step 4 read as the base would give the base's scores
    under step 4's name (and a merged export of the base), with exit 0."""
    _edit_json(step_dir(run, step) / "meta.json", lambda meta: meta.update(kind=kind))
    assert any(says in line for line in verify(run)), verify(run)
    for argv in (["sweep", run, *SWEEP, "--overwrite"], ["export", run, "--step", step, "--merged", run.parent / "m"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "meta.json" in err[0], err
    assert not (run.parent / "m").exists()


def test_the_base_model_is_rehashed(pristine, tmp_path, capsys):
    """Checkpoints store only what training changed: a damaged base changes every number of the run,
    so verify rehashes it, and a reader refuses it."""
    model = shutil.copytree(pristine["model"], tmp_path / "llama")
    run = tmp_path / "run"
    assert cli(train_argv(model, pristine["corpus"], run, steps=2, save_steps="0,2")) == 0
    assert verify(run) == []
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40   # an exponent bit of the last tensor's last value
    weights.write_bytes(bytes(data))
    lines = verify(run)
    assert len(lines) == 1 and lines[0].startswith(f"{model}, the base model of {run}, has weights whose SHA-256")
    capsys.readouterr()
    assert cli(["sweep", run, *SWEEP]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"base model {model}" in err[0] and "is not the base of" in err[0], err
    assert not (run / "sweeps.parquet").exists()
    shutil.rmtree(model)
    assert verify(run) == [f"{model}, the base model of {run}, is missing, so the run cannot be checked or read; "
                           "put the base model the run was trained from back at that path"]


@pytest.fixture(scope="module")
def layered(pristine, tmp_path_factory):
    run = tmp_path_factory.mktemp("layered") / "run"
    assert cli(train_argv(pristine["model"], pristine["corpus"], run, strategy="layers", layers="0,4-5",
                          steps=2, save_steps="0,2")) == 0
    return run


@pytest.mark.parametrize("change, says", [
    (lambda m: m.update(layers=list(range(8))[:4], layers_string="0-3"),
     "lists blocks 0-3, but {ckpt} stores blocks 0,4-5"),
    (lambda m: m.update(layers_string="0-3"), "gives the layer set as '0-3' and as [0, 4, 5]"),
    (lambda m: (m.update(layers=[0, 1], layers_string="0-1"), m["config"].update(layers="0-1")),
     "lists blocks 0-1, but {ckpt} stores blocks 0,4-5"),
])
def test_a_manifest_whose_layer_set_lies(layered, tmp_path, capsys, change, says):
    """The manifest's layer set is what a study copies into its comparison table: where it is not
    what the checkpoints store, verify says so and readers refuse the run."""
    run = shutil.copytree(layered, tmp_path / "run")
    _edit_json(run / "manifest.json", change)
    says = says.format(ckpt=step_dir(run, 2) / "trainable.safetensors")
    lines = verify(run)   # the config's own set may disagree too: one line each
    assert any(says in line for line in lines) and all("manifest.json (the run's manifest)" in l for l in lines), lines
    assert cli(["sweep", run, *SWEEP]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json (the run's manifest)" in err[0], err


def test_a_folder_that_is_no_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert cli(["verify", tmp_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is neither a cogprobe run (manifest.json), a study (study.json)" in err[0]


def test_a_selection_file_rewritten_after_training_is_no_lie(pristine, tmp_path):
    """A run trained from a selection.json records the file's path in its config; the file may be
    rewritten later (select run again), so the run is held to the blocks it stores, not to the file."""
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps(dict(rule="fixed", layers=[0, 4, 5], n_layers=6)))
    run = tmp_path / "run"
    assert cli(train_argv(pristine["model"], pristine["corpus"], run, strategy="layers", layers=selection,
                          steps=2, save_steps="0,2")) == 0
    selection.write_text(json.dumps(dict(rule="fixed", layers=[1, 2], n_layers=6)))
    assert verify(run) == []
