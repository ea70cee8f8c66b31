"""Atomic file writes: a reader never sees a half-written file or folder.

Everything is written under a temporary name in the same directory and then
renamed into place (`os.replace` is atomic on POSIX), so an interrupted run
leaves either the old file, the new file, or a `.tmp-*` leftover that nothing
mistakes for a result.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from cogprobe.errors import CogprobeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir(path: str | os.PathLike) -> Path:
    """`mkdir -p`, failing with one line when `path` cannot be a folder (e.g. a file is in the way)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CogprobeError(f"cannot create folder {path} ({e.strerror or e}); choose an output path "
                            "in a writable folder") from None
    return path


def _unwritable(path: Path, e: OSError) -> CogprobeError:
    return CogprobeError(f"cannot write into {path} ({e.strerror or e}); choose an output path in a writable folder")


def _tmp_path(path: Path) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; results should be readable like any file
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    make_dir(path.parent)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def append_parquet(path: str | os.PathLike, rows: pd.DataFrame) -> pd.DataFrame:
    """Append `rows` to a parquet table by atomic rewrite; returns the whole table.

    Tables here are small (thousands of rows), so a rewrite per finished unit of
    work is cheap and keeps the file valid after every unit.
    """
    path = Path(path)
    table = pd.concat([pd.read_parquet(path), rows], ignore_index=True) if path.exists() else rows
    write_parquet(path, table)
    return table


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; it becomes `path` only if the block succeeds.

    An existing `path` is replaced. Used for checkpoints and model folders, so a
    folder that exists under its final name is always complete.
    """
    path = Path(path)
    make_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".old-{path.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
