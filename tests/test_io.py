import os

import pandas as pd
import pytest

from cogprobe import io


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
