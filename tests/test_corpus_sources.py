"""Corpora from `datasets` folders, Parquet files and hub dataset ids (offline), incl. `translation` dicts."""
from __future__ import annotations

import pandas as pd
import pytest

from cogprobe.data.corpora import load_corpus
from cogprobe.core.errors import CogprobeError

ROWS = [dict(es=f"la casa {i}", nah=f"in calli {i}") for i in range(12)]


def _expect(corpus, n=12):
    assert len(corpus) == n
    assert corpus.pairs["pivot"].iloc[3] == "la casa 3" and corpus.pairs["target"].iloc[3] == "in calli 3"


def test_save_to_disk_folder_all_splits(tmp_path):
    import datasets
    data = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:8]),
                                test=datasets.Dataset.from_list(ROWS[8:]))
    data.save_to_disk(str(tmp_path / "saved"))
    _expect(load_corpus(tmp_path / "saved"))


def test_translation_column_in_parquet(tmp_path):
    table = pd.DataFrame({"id": range(12), "translation": [dict(es=r["es"], nah=r["nah"]) for r in ROWS]})
    table.to_parquet(tmp_path / "pairs.parquet")
    corpus = load_corpus(tmp_path / "pairs.parquet")
    _expect(corpus)
    flipped = load_corpus(tmp_path / "pairs.parquet", pivot_col="nah", target_col="es")
    assert flipped.pairs["pivot"].iloc[0] == "in calli 0"


def test_parquet_folder(tmp_path):
    (tmp_path / "d").mkdir()
    pd.DataFrame(ROWS[:6]).to_parquet(tmp_path / "d" / "a.parquet")
    pd.DataFrame(ROWS[6:]).to_parquet(tmp_path / "d" / "b.parquet")
    _expect(load_corpus(tmp_path / "d"))


def test_hub_dataset_id_from_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = tmp_path / "hub" / "datasets--org--pairs"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("a" * 40)
    (root / "snapshots" / ("a" * 40) / "data").mkdir(parents=True)
    pd.DataFrame({"translation": [dict(es=r["es"], nah=r["nah"]) for r in ROWS]}).to_parquet(
        root / "snapshots" / ("a" * 40) / "data" / "train-00000.parquet")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    _expect(load_corpus("org/pairs"))
    with pytest.raises(CogprobeError, match="dataset org/absent@main is not in the Hugging Face cache"):
        load_corpus("org/absent")


def test_a_missing_file_is_not_taken_for_a_dataset_id(tmp_path):
    with pytest.raises(CogprobeError, match="does not exist"):
        load_corpus("data/missing.csv")
