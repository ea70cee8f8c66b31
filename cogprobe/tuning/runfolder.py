"""Bookkeeping of a training run folder: claiming it, the manifest, costs.

A folder belongs to one run, identified by its config (less execution-only
fields such as `threads`; a knob an older manifest lacks reads as its default)
and the base model's fingerprint. `claim` refuses a folder that holds another
run unless `overwrite`, returns the step to resume from, or None when the run
there is already finished: its final checkpoint is written, at the step the
manifest's "stop" record names (a run stopped on a plateau) or else at `steps`.
What a resume reads back (the optimizer state) is `resume`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from cogprobe.core import io
from cogprobe.tuning import resume
from cogprobe.tuning.checkpoints import CHECKPOINTS, META, check, own_steps, step_dir
from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import to_string
from cogprobe.core.layout import COST, DEV_CURVE, MANIFEST, STOP, TRAIN_CONFIG, TRAIN_LOG
from cogprobe.core.layout import metadata as beside
from cogprobe.core.layout import claim as claim_folder
from cogprobe.tuning.config import EXECUTION_ONLY, current

OWN = (MANIFEST, TRAIN_LOG, COST, DEV_CURVE, beside(Path(DEV_CURVE)).name, CHECKPOINTS, "tracking")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "pandas")


def lock(out: Path, log=print) -> int | None:
    """Hold an exclusive lock on the run folder (an open fd: close it to release) so that two processes
    never train into one folder; a second one waits. The OS drops the lock when its holder dies, even
    by kill -9: a `cogprobe train` orphaned by a killed `cogprobe run` finishes before the rerun's
    own training continues the folder (and finds it done)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fd = os.open(io.make_dir(out), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"waiting for another cogprobe process that is writing into {out} ...")
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


@contextlib.contextmanager
def locked(folder: Path, log=print) -> Iterator[None]:
    """`lock` held for the span of a block, when `folder` exists already (a new one has no writer yet):
    two sweeps, captures or selections into one folder would each rewrite the other's table."""
    fd = lock(folder, log) if Path(folder).is_dir() else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def claim(out: Path, cfg, fingerprint: str, *, main: bool = True) -> int | None:
    """Decide what to do with `out`: the step to start from, or None if this run is finished."""
    out = Path(out)
    identity = io.jsonable(dict(cfg.identity(), base_fingerprint=fingerprint))
    have, old = None, {}
    if (out / MANIFEST).is_file() and not cfg.overwrite:  # --overwrite replaces even a damaged manifest
        old = io.read_json(out / MANIFEST)
        have = {k: v for k, v in {**_defaults(cfg), **current(old.get("config", {}))}.items() if k not in EXECUTION_ONLY}
        have["base_fingerprint"] = old.get("base", {}).get("fingerprint")
    if claim_folder(out, MANIFEST, identity, have, what="run", overwrite=cfg.overwrite, ignore=(TRAIN_CONFIG,)):
        final = old.get(STOP, {}).get("stopped_at", cfg.steps)
        if (step_dir(out, final) / "meta.json").is_file():
            if main:  # killed between the last checkpoint and dropping the optimizer state: finish that
                resume.drop(own_steps(out), keep=None)
            return None
        if not cfg.resume:
            raise CogprobeError(f"{out} holds an unfinished run of this config; pass --resume to continue "
                                "it or --overwrite to start again")
        return _resume_from(out, main)
    if main:  # a new run, or --overwrite: only cogprobe's own files are replaced
        io.make_dir(out)  # first: a file in the way fails here, as one line
        doomed = [out / name for name in OWN if (out / name).exists() or (out / name).is_symlink()]
        _check_replaceable(out, doomed)  # all of it, before anything is deleted
        for path in doomed:
            _remove(path)
    return 0


def _check_replaceable(out: Path, doomed: list[Path]) -> None:
    """One line naming the first folder that stops --overwrite from deleting the old run and writing the
    new one, found before anything is deleted: a half-deleted run is neither the old run nor a new one.
    Deleting an entry needs write and search access to its folder (and listing a folder, read access)."""
    folders = [out] + [Path(root) for path in doomed if path.is_dir() and not path.is_symlink()
                       for root, _, _ in os.walk(path)]
    for folder in folders:
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK, **_effective()):
            raise CogprobeError(f"cannot replace the run in {out}: {folder.resolve()} is not writable (or not "
                                "readable), so its files cannot be deleted; nothing was deleted; make it writable "
                                f"(chmod -R u+rwX {out.resolve()}) or choose another --out")


def _effective() -> dict:
    """Check with the effective ids, as the deletion will run (where the platform can)."""
    return {"effective_ids": True} if os.access in os.supports_effective_ids else {}


def _remove(path: Path) -> None:
    """Delete a file or folder; a failure names the full path of what could not be deleted."""
    def failed(function, name, exc_info):
        err = exc_info[1]
        raise CogprobeError(f"cannot delete {Path(name).resolve()} ({getattr(err, 'strerror', None) or err}) while "
                            f"replacing the run in {path.parent}; make it writable and rerun") from None
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=failed)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            failed(None, str(path), (type(e), e, None))


def _defaults(cfg) -> dict:
    """Every knob's default: what a manifest written before the knob existed ran with."""
    return io.jsonable({f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING})


def _resume_from(out: Path, main: bool) -> int:
    """The last checkpoint with resume state (0 if none); what the run recorded after it removed: log
    and dev-curve rows, a stop record (written just before a final checkpoint that was never finished),
    leftovers. The resumed run records them again.

    What the rerun reads is checked first (that checkpoint, its optimizer state, the log and the dev
    curve), so a damaged file fails in one line before anything in the folder is changed."""
    start = max((s for s, p in own_steps(out) if resume.present(p)), default=0)
    if start:
        path = step_dir(out, start)
        check(path, io.read_json(path / META))
        io.read_json(path / resume.STATE)
    log, curve = out / TRAIN_LOG, out / DEV_CURVE
    tables = {log: io.read_parquet(log) if start or log.is_file() else None,  # a run with checkpoints has its log
              curve: io.read_parquet(curve) if curve.is_file() else None}
    if main:
        for leftover in (out / CHECKPOINTS).glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for path, table in tables.items():
            if table is not None:
                io.write_parquet(path, table[table["step"] <= start])
        manifest = io.read_json(out / MANIFEST)
        if manifest.pop(STOP, None) is not None:
            io.write_json(out / MANIFEST, manifest)
    return start


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("cogprobe",) + PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> str:
    """Where this process runs, e.g. "Intel(R) Xeon(R) Processor (avx512_bf16), 2 cores": wall times
    depend on it, and so do bf16 results (the kernels differ with the processor's instructions), so
    a run retrained on another machine is a sibling of the first, not a copy."""
    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    bf16 = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    text = f"{cpu} ({bf16}), {os.cpu_count()} cores" if bf16 else f"{cpu}, {os.cpu_count()} cores"
    return text + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")


def manifest(cfg, model, blocks, layers, fingerprint: str, corpus: dict) -> dict:
    from cogprobe.models.loading import model_source
    from cogprobe.models.params import n_trainable
    lora = getattr(model, "peft_config", {}).get("default")
    return io.jsonable(dict(
        config=cfg.to_dict(), seed=cfg.seed, strategy=cfg.strategy,
        layers=layers, layers_string=to_string(layers) if layers else None,
        lora_targets=sorted(lora.target_modules) if lora else None,
        base=dict(spec=str(cfg.model), path=str(model_source(model)), fingerprint=fingerprint,
                  architecture=type(blocks.model).__name__, n_layers=blocks.n),
        trainable_params=n_trainable(model),
        total_params=sum(p.numel() for p in blocks.model.parameters()),
        save_steps=cfg.save_step_list(), corpus=corpus, versions=versions(), machine=machine(),
    ))


def write_cost(out: Path, n_trainable: int, optimizer, peak_memory: int, memory_kind: str) -> dict:
    """cost.json from the optimizer's state tensors and the log's timings (all sessions)."""
    state = resume.torch_optimizer(optimizer).state
    opt_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values()
                    if torch.is_tensor(t))
    log = io.read_parquet(out / TRAIN_LOG) if (out / TRAIN_LOG).is_file() else pd.DataFrame(columns=["seconds", "tokens"])
    previous = io.read_json(out / COST) if (out / COST).is_file() else {}
    seconds = float(log["seconds"].sum())
    cost = dict(
        trainable_params=n_trainable, optimizer_state_bytes=opt_bytes,
        peak_memory_bytes=max(peak_memory, previous.get("peak_memory_bytes", 0)),
        peak_memory_kind=memory_kind,
        sec_per_step=seconds / len(log) if len(log) else None,
        tokens_per_sec=float(log["step_tokens"].sum()) / seconds if seconds and "step_tokens" in log else None,
        tokens_total=int(log["step_tokens"].sum()) if "step_tokens" in log else None,
        loss_tokens_total=int(log["loss_tokens"].sum()) if "loss_tokens" in log else None,
        steps_logged=len(log), seconds_total=seconds,
    )
    io.write_json(out / COST, cost)
    return cost
