import os

import pandas as pd
import pytest

from cogprobe.core import io


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "t.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert io.read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_atomic_dir_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_dir(tmp_path / "ck") as d:
            (d / "w").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with io.atomic_dir(tmp_path / "ck") as d:
        (d / "w").write_text("y")
    assert (tmp_path / "ck" / "w").read_text() == "y"


def test_files_get_normal_permissions(tmp_path):
    io.write_text(tmp_path / "f", "x")
    with io.atomic_dir(tmp_path / "d"):
        pass
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask


def test_append_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    io.append_parquet(p, pd.DataFrame({"a": [1]}))
    assert io.append_parquet(p, pd.DataFrame({"a": [2]}))["a"].tolist() == [1, 2]


def test_tables_written_before_a_column_was_renamed_read_with_the_new_names(tmp_path):
    """Sweeps once had `gain_retained` (now `share`), activations `layer` (now `block`)."""
    old_sweeps = pd.DataFrame(dict(checkpoint_step=[4], task=["perception"], direction=["input"], mode=["revert"],
                                   k=[1], ends=[False], nll=[2.0], gain_retained=[0.5]))
    old_sweeps.to_parquet(tmp_path / "sweeps.parquet")
    got = io.read_parquet(tmp_path / "sweeps.parquet")
    assert "gain_retained" not in got.columns and got["share"].tolist() == [0.5]
    old_acts = pd.DataFrame(dict(checkpoint_step=[0], layer=[3], site=["resid"], stat=["norm"], task=["perception"],
                                 value=[1.0]))
    old_acts.to_parquet(tmp_path / "activations.parquet")
    assert io.read_parquet(tmp_path / "activations.parquet")["block"].tolist() == [3]


def test_compare_tables_written_with_strategy_read_with_row_and_only_they(tmp_path):
    """compare.parquet's `strategy` held comparison rows (now `row`); elsewhere `strategy` is a training
    strategy (full, layers, lora, lora-layers) and keeps its name."""
    old_compare = pd.DataFrame(dict(strategy=["full", "cogsym"], seed=[0, 0], perception_nll=[4.0, 4.1]))
    old_compare.to_parquet(tmp_path / "compare.parquet")
    got = io.read_parquet(tmp_path / "compare.parquet")
    assert "strategy" not in got.columns and got["row"].tolist() == ["full", "cogsym"]
    tuning = pd.DataFrame(dict(name=["cogsym layers"], strategy=["layers"], sec_per_step=[1.0]))
    tuning.to_csv(tmp_path / "tuning.csv", index=False)
    got = io.read_csv(tmp_path / "tuning.csv")
    assert got["strategy"].tolist() == ["layers"] and "row" not in got.columns
    log = pd.DataFrame(dict(step=[1], loss=[2.0], lr=[1e-3], grad_norm=[1.0], tokens=[64], seconds=[0.1],
                            strategy=["lora"]))
    log.to_parquet(tmp_path / "train_log.parquet")
    assert io.read_parquet(tmp_path / "train_log.parquet")["strategy"].tolist() == ["lora"]
