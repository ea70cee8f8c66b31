import json
import math

import pytest

from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import cogsym, outer, parse_range_list, resolve, to_string


def test_cogsym_smollm2():
    assert cogsym(30) == [0, 1, 2, 3, 26, 27, 28, 29]


@pytest.mark.parametrize("n_layers", range(1, 65))
@pytest.mark.parametrize("f", [0.25, 0.5, 1.0, 0.1])
def test_cogsym_rule_for_every_depth(n_layers, f):
    n = round(f * n_layers)
    if n == 0:
        with pytest.raises(CogprobeError, match="rounds to zero"):
            cogsym(n_layers, f)
        return
    got = cogsym(n_layers, f)
    bottom = [i for i in got if i < math.ceil(n / 2)]
    assert len(got) == n
    assert bottom == list(range(math.ceil(n / 2)))  # bottom gets the odd block
    assert got[len(bottom):] == list(range(n_layers - n // 2, n_layers))


@pytest.mark.parametrize("f", [0, -0.1, 1.5, float("nan")])
def test_cogsym_rejects_bad_fractions(f):
    with pytest.raises(CogprobeError, match=r"\(0, 1\]"):
        cogsym(30, f)


def test_parse_and_roundtrip():
    assert parse_range_list("26-29, 0-3", 30) == [0, 1, 2, 3, 26, 27, 28, 29]
    assert to_string([0, 1, 2, 3, 26, 27, 28, 29]) == "0-3,26-29"
    assert to_string([5]) == "5"
    assert resolve("cogsym:0.5", 8) == [0, 1, 6, 7]
    assert outer(10, 2, 1) == [0, 1, 9]


@pytest.mark.parametrize("bad, msg", [
    ("", "empty"), ("0-3,2", "more than once"), ("3-1", "backwards"),
    ("0-40", "out of range"), ("a-b", "not a block number"), ("cogsym:x", "fraction"),
    ("cogsym:0", r"\(0, 1\]"),
])
def test_bad_layer_sets(bad, msg):
    with pytest.raises(CogprobeError, match=msg):
        resolve(bad, 30)


def test_selection_file(tmp_path):
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({"layers": [0, 1, 29], "n_layers": 30}))
    assert resolve(str(path), 30) == [0, 1, 29]
    with pytest.raises(CogprobeError, match="12 blocks"):
        resolve(str(path), 12)
    with pytest.raises(CogprobeError, match="does not exist"):
        resolve(str(tmp_path / "nope.json"), 30)
