"""Atomic file writes and checked reads: a reader never sees a half-written file, nor a traceback.

Everything is written under a temporary name in the same directory and then
renamed into place (`os.replace` is atomic on POSIX), so an interrupted run
leaves either the old file, the new file, or a `.tmp-*` leftover that nothing
mistakes for a result. A write that fails for want of space or permission is
one line naming the file (the temporary is removed, the old file stays).

Every JSON file, table and tensor file is read through `read_json`,
`read_parquet` and `read_tensors`: a missing, empty, truncated or foreign file
is one line naming it, what is wrong and the fix (see `artifacts`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from cogprobe.core import artifacts
from cogprobe.core.errors import CogprobeError

# Write failures the user fixes outside cogprobe: each gets one line (and the rerun continues).
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
# what continues from where a write failed: `train` leaves an unfinished run, which it continues only when asked
RERUN = "rerun the same command (`cogprobe train` with --resume added)"


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


def _errno(e: BaseException) -> int | None:
    """The OS error behind `e`: an OSError's own, or the one a library wrapped into its message
    (safetensors: "I/O error: No space left on device (os error 28)"; pyarrow: "[Errno 28] ...")."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(e))
    return int(found.group(1) or found.group(2)) if found else None


def write_failure(path: Path, e: BaseException) -> CogprobeError | None:
    """One line for a write that failed for want of space or permission; None for any other error."""
    code = _errno(e)
    if code in _FULL:
        return CogprobeError(f"{_FULL[code]} while writing {path}; free some space (or choose another "
                             f"output folder) and {RERUN}: finished work is kept")
    if code in _DENIED:
        return CogprobeError(f"cannot write {path} ({os.strerror(code)}); make the folder writable (or choose "
                             f"another output folder) and {RERUN}")
    return None


@contextlib.contextmanager
def _one_line_on_write_failure(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:  # noqa: BLE001  (libraries wrap OS errors in their own types; others re-raised)
        err = write_failure(path, e)
        if err is None:
            raise
        raise err from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    make_dir(path.parent)
    tmp = _tmp_path(path)
    try:
        with _one_line_on_write_failure(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (paths and other objects as strings): what a record compares as."""
    return json.loads(json.dumps(obj, default=str))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def presence_problem(path: Path) -> str | None:
    """"is missing" / "is empty (0 bytes)" / unreadable, or None when there is something to read."""
    try:
        if path.stat().st_size == 0:
            return "is empty (0 bytes)"
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def _read_bytes(path: Path) -> bytes:
    problem = presence_problem(path)
    if problem:
        raise artifacts.damaged(path, problem)
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise CogprobeError(f"cannot read {path} ({e.strerror}); give the user running cogprobe read access") from None
    except OSError as e:
        raise artifacts.damaged(path, f"cannot be read ({e.strerror or e})") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`, checked: it parses, and an artifact of a known kind has that kind's keys."""
    path = Path(path)
    try:
        obj = json.loads(_read_bytes(path).decode("utf-8"))
    except UnicodeDecodeError:
        raise artifacts.damaged(path, "is not text (overwritten with other bytes?)") from None
    except json.JSONDecodeError as e:
        raise artifacts.damaged(path, f"is not valid JSON ({e.msg}, line {e.lineno}; truncated or "
                                      "overwritten?)") from None
    artifacts.check_keys(path, obj)
    return obj


def read_parquet(path: str | os.PathLike) -> pd.DataFrame:
    """The table in `path`, checked: it is Parquet, and a table of a known kind has that kind's columns."""
    import pyarrow as pa
    return _read_table(path, pd.read_parquet, (pa.ArrowException, OSError, ValueError), "Parquet")


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV table cogprobe wrote, checked like `read_parquet`."""
    return _read_table(path, pd.read_csv, (UnicodeDecodeError, ValueError, pd.errors.ParserError), "CSV")


def _read_table(path, reader, errors: tuple, kind: str) -> pd.DataFrame:
    """`reader(path)` after the presence check, any of `errors` as one damage line, then the column check."""
    path = Path(path)
    problem = presence_problem(path)
    if problem:
        raise artifacts.damaged(path, problem)
    try:
        table = reader(path)
    except errors as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise artifacts.damaged(path, f"is not a readable {kind} table ({first.split(': ', 1)[-1]})") from None
    table = table.rename(columns={old: new for old, new in artifacts.renamed_columns(path).items()
                                  if old in table.columns and new not in table.columns})
    artifacts.check_columns(path, table.columns, len(table))
    return table


def read_tensors(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """The tensors of a safetensors file (never pickle), checked against `sha256` when one was recorded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    problem = file_problem(path, sha256)
    if problem:
        raise artifacts.damaged(path, problem)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise artifacts.damaged(path, f"is damaged or truncated ({e})") from None


def file_problem(path: Path, sha256: str | None = None) -> str | None:
    """What is wrong with a file cogprobe wrote (missing, empty, a safetensors file whose header does not
    cover it, other bytes than the recorded SHA-256), or None. Reads only a header unless a hash is given."""
    from safetensors import SafetensorError, safe_open
    problem = presence_problem(path)
    if problem:
        return problem
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                f.keys()
    except (SafetensorError, OSError) as e:
        return f"is damaged or truncated ({e})"
    if sha256 is not None and file_sha256(path) != sha256:
        return "differs from what was written (its SHA-256 is not the one recorded when it was saved)"
    return None


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def append_parquet(path: str | os.PathLike, rows: pd.DataFrame) -> pd.DataFrame:
    """Append `rows` to a parquet table by atomic rewrite; returns the whole table.

    Tables here are small (thousands of rows), so a rewrite per finished unit of
    work is cheap and keeps the file valid after every unit.
    """
    path = Path(path)
    table = pd.concat([read_parquet(path), rows], ignore_index=True) if path.exists() else rows
    write_parquet(path, table)
    return table


def replace_rows(path: str | os.PathLike, rows: pd.DataFrame, key: str = "arm") -> pd.DataFrame:
    """Append `rows` to a parquet table, replacing its earlier rows of the same `key` values (a rerun
    after an interruption scores an arm again); returns the whole table."""
    path = Path(path)
    if path.exists():
        old = read_parquet(path)
        rows = pd.concat([old[~old[key].isin(set(rows[key]))], rows], ignore_index=True)
    write_parquet(path, rows)
    return rows


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
        with _one_line_on_write_failure(path):
            yield tmp
            _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """`tmp` becomes `path`; an existing `path` is moved aside first and deleted last."""
    if path.exists():
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
