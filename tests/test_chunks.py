"""Sequential probes: windows of one sample (`EvalSet.window`) and the union of their sweep tables
(`probe.chunks`) equal one sweep of all their pairs."""
import numpy as np
import pandas as pd
import pytest

from cogprobe.core.errors import CogprobeError
from cogprobe.data.evalset import EvalSet
from cogprobe.models.loading import load_model
from cogprobe.probe.chunks import ARRAYS, union
from cogprobe.probe.folders import sweep_run

N = 8   # pairs of the tiny corpus's train split (its dev split holds 3): the windows cut this sample


def test_windows_are_disjoint_chunks_of_one_sample_in_a_seeded_order(trained_run):
    run = trained_run["run"]
    tok = load_model(trained_run["model"])[1]
    ids = lambda **kw: list(EvalSet.for_run(run, split="train", n=N, **kw).pairs(tok).pairs["pair_id"])  # noqa: E731
    whole, first, rest = ids(window=(0, N)), ids(window=(0, 2)), ids(window=(2, N))
    assert first + rest == whole and sorted(whole) == sorted(ids())   # a reordering of the sample itself
    assert whole != sorted(whole)   # shuffled, not corpus order
    assert "window" not in EvalSet(n=N).to_dict()   # tables written before windows keep their record
    assert EvalSet(n=N, window=[0, 2]).to_dict()["window"] == [0, 2] and EvalSet(n=N, window=[0, 2]).window == (0, 2)
    with pytest.raises(CogprobeError, match="0 <= a < b <= n"):
        EvalSet(n=N, window=(2, 2))
    with pytest.raises(CogprobeError, match="reaches past"):
        EvalSet.for_run(run, split="train", n=0, window=(0, 10_000)).pairs(tok)


def test_the_union_of_chunk_sweeps_is_the_sweep_of_their_pairs(trained_run, tmp_path):
    run, quiet = trained_run["run"], dict(progress=False, log=lambda m: None)
    direct = sweep_run(run, evalset=EvalSet.for_run(run, split="train", n=N, window=(0, N)), out=tmp_path / "whole", **quiet)
    parts = [sweep_run(run, evalset=EvalSet.for_run(run, split="train", n=N, window=w), out=tmp_path / f"c{i}", **quiet)
             for i, w in enumerate(((0, 3), (3, 5), (5, N)))]
    merged = union(parts)
    assert list(merged.columns) == list(direct.columns) and len(merged) == len(direct)
    key = ["checkpoint_step", "task", "direction", "k"]
    pd.testing.assert_frame_equal(merged[key], direct[key])
    for name in ARRAYS:
        np.testing.assert_allclose(np.stack(merged[name]), np.stack(direct[name]), rtol=1e-6, atol=1e-6)
    for name in ("nll", "nll_reference", "nll_checkpoint", "share", "n_tokens"):
        np.testing.assert_allclose(merged[name], direct[name], rtol=1e-6, atol=1e-6, err_msg=name)
    assert len(union([parts[0], parts[1][parts[1]["k"] != 1]])) == len(parts[0][parts[0]["k"] != 1])  # in both only
