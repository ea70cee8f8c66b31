"""Corpora the way the ecosystem stores them: `datasets` folders, Parquet, hub dataset ids.

`corpora.load_corpus` asks `read(spec)` first; each source becomes one table of text
columns, and the columns are then chosen exactly as for CSV files. Three sources:
  - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
  - a `.parquet` file, or a folder of them;
  - a dataset id `org/name[@revision]` from the Hugging Face cache (offline under
    HF_HUB_OFFLINE=1, as for models), its data files read with `datasets`.
Every split of a source is used: cogprobe makes its own deterministic train/dev/test
split. The common `translation: {xx: ..., yy: ...}` column becomes columns xx and yy.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cogprobe.core.errors import CogprobeError

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")  # a missing file, not a dataset id
DATA_FILES = ["*.parquet", "*.jsonl", "*.json", "*.csv", "*.tsv", "**/*.parquet", "**/*.jsonl",
              "**/*.json", "**/*.csv", "**/*.tsv"]


def read(spec) -> tuple[str, pd.DataFrame] | None:
    """(name, table of text columns) for a datasets folder, Parquet, or a hub dataset id; else None."""
    from cogprobe.core import hub
    path = Path(str(spec)).expanduser()
    if path.is_dir() and _saved_dataset(path):
        return path.name, _text(_load_from_disk(path), str(path))
    if path.suffix == ".parquet" or (path.is_dir() and list(path.glob("*.parquet"))):
        return path.stem, _text(_read_parquet(path), str(path))
    if not path.exists() and path.suffix.lower() not in FILE_SUFFIXES and hub.HUB_ID.match(str(spec)):
        return str(spec).split("/")[-1], _text(_hub_dataset(str(spec)), str(spec))
    return None


def _saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise CogprobeError("reading a `datasets` corpus needs the datasets package: "
                            "pip install 'cogprobe[datasets]'") from None
    return datasets


def _frames(data) -> pd.DataFrame:
    """A Dataset or every split of a DatasetDict, in split order, as one DataFrame."""
    splits = list(data.values()) if hasattr(data, "values") else [data]
    return pd.concat([s.to_pandas() for s in splits], ignore_index=True)


def _load_from_disk(path: Path) -> pd.DataFrame:
    try:
        return _frames(_datasets().load_from_disk(str(path)))
    except (FileNotFoundError, ValueError) as e:
        raise CogprobeError(f"cannot read the datasets folder {path} ({str(e).splitlines()[0][:160]}); "
                            "save it again with save_to_disk") from None


def _read_parquet(path: Path) -> pd.DataFrame:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not all(f.is_file() for f in files):
        raise CogprobeError(f"corpus file {path} does not exist; check the path")
    try:
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    except (OSError, ValueError) as e:
        raise CogprobeError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None


def _hub_dataset(spec: str) -> pd.DataFrame:
    """A dataset repo from the hub cache (snapshot_download, offline when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from cogprobe.core.hub import HUB_ID, hub_cache, hub_offline
    m = HUB_ID.match(spec)
    repo, rev = m.group("repo"), m.group("rev") or "main"
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=rev, cache_dir=hub_cache(),
                                   allow_patterns=DATA_FILES, local_files_only=hub_offline())
    except LocalEntryNotFoundError:
        raise CogprobeError(f"unknown corpus {spec!r}: not an elotl name or a file, and dataset {repo}@{rev} "
                            f"is not in the Hugging Face cache {hub_cache()}") from None
    return _frames(_datasets().load_dataset(folder))


def _text(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """Text columns only; a `translation` column of {lang: sentence} dicts becomes one column per language."""
    if "translation" in table.columns:
        cells = list(table["translation"])
        if not all(isinstance(c, dict) for c in cells):
            raise CogprobeError(f"{where}: column 'translation' must hold {{language: sentence}} dicts")
        table = pd.concat([table.drop(columns="translation"), pd.DataFrame(cells)], axis=1)
    if table.empty:
        raise CogprobeError(f"{where} has no rows; give a corpus with sentence pairs")
    return table.fillna("").astype(str)
