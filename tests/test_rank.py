"""Cheap rankings and the taylor engine, checked on tiny models with known answers."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cogprobe.selection import agreement
from cogprobe.models.blocks import find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.selection.rankings import angular_distance, block_influence, rank, select_ranking, weight_delta
from cogprobe.selection.rules import select_curves
from cogprobe.probe.sweep import engines_in, sweep
from cogprobe.data.tasks import TASKS, batches
from helpers import examples, perturbed, train_blocks
from tiny import LAYERS, tiny_model

PLANTED = {1, 4}


@pytest.fixture(scope="module")
def planted():
    """A reference and a checkpoint whose only change is a few small steps of real training of blocks
    1 and 4: near the reference, where a first-order estimate holds (8 steps at lr 1e-2 overshoot the
    examples' minimum, where the gradient at the checkpoint says little about reverting)."""
    ref, ex = tiny_model("llama"), examples()
    return ref, train_blocks(ref, ex, PLANTED, steps=3, lr=1e-3), ex


@torch.no_grad()
def _by_hand(model, ex, reduce):
    """Block inputs/outputs from output_hidden_states, with the final norm taken out so the last
    block's output is raw too."""
    model = copy.deepcopy(model)
    model.model.norm = torch.nn.Identity()
    values = [[] for _ in range(LAYERS)]
    for exs in ex.values():
        for batch in batches(exs, 2, pad_id=0):
            hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True, use_cache=False).hidden_states
            mask = batch["attention_mask"].bool()
            for i in range(LAYERS):
                values[i] += reduce(hs[i], hs[i + 1], mask)
    return np.array([np.mean(v) for v in values])


def test_block_influence_and_angular_equal_their_formulas_by_hand():
    model, ex = tiny_model("llama"), examples()

    def one_minus_cos(x, y, mask):
        return [1 - float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in zip(x[mask], y[mask])]

    def last_angle(x, y, mask):
        last = mask.sum(1) - 1
        return [float(np.arccos(np.clip(float(torch.dot(x[r, t], y[r, t]) / (x[r, t].norm() * y[r, t].norm())), -1, 1))
                      / np.pi) for r, t in enumerate(last.tolist())]

    bi = block_influence(model, ex, batch_size=3)
    np.testing.assert_allclose(bi, _by_hand(model, ex, one_minus_cos), atol=1e-5)
    np.testing.assert_allclose(angular_distance(model, ex, batch_size=3), _by_hand(model, ex, last_angle), atol=1e-5)
    assert (bi > 0).all()


def test_weight_delta_and_taylor_put_the_planted_blocks_first(planted):
    ref, ck, ex = planted
    table = rank([(0, ref), (7, ck)], ex)
    assert set(table["ranking"]) == {"block-influence", "angular", "weight-delta", "taylor"}
    assert set(table[table.ranking.isin(["block-influence", "angular"])]["checkpoint_step"]) == {0}
    for name in ("weight-delta", "taylor"):
        rows = table[(table.ranking == name) & (table.checkpoint_step == 7)]
        assert set(rows[rows["rank"] <= len(PLANTED)]["block"]) == PLANTED, name
        assert (rows[~rows.block.isin(PLANTED)]["score"] == 0).all()   # unchanged blocks: exactly nothing
    taylor = table[table.ranking == "taylor"]
    assert (taylor["score"] >= 0).all()   # near the reference, reverting a trained block costs gain
    # shares of the measured gain: together, what the taylor sweep estimates reverting every block removes
    swept = sweep([(0, ref), (7, ck)], ex, engine="taylor", steps=[7])
    assert taylor["score"].sum() == pytest.approx((1 - swept[swept.k == LAYERS]["share"]).mean(), rel=1e-6)
    assert (taylor["backward_passes"] == sum(len(e) for e in ex.values())).all()
    assert (table[table.ranking == "weight-delta"]["forward_passes"] == 0).all()
    d = weight_delta(ck, ref)
    b = find_blocks(ck)
    moved = sum(float((p.detach() - dict(ref.named_parameters())[n].detach()).pow(2).sum()) for n, p in ck.named_parameters()
                if b.block_of(n) == 1)
    size = sum(float(p.detach().pow(2).sum()) for n, p in ref.named_parameters() if b.block_of(n) == 1)
    assert d[1] == pytest.approx(np.sqrt(moved / size), rel=1e-6)


def _scaled(ref, direction, eps):
    out = copy.deepcopy(ref)
    b = find_blocks(out)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if b.block_of(name) is not None:
                p.add_(eps * direction[name] * p.abs().mean())
    return out


def test_taylor_curve_equals_the_exact_one_to_first_order():
    ref, ex = tiny_model("llama"), examples()
    g = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in ref.named_parameters()}
    errors, changes = [], []
    for eps in (0.2, 0.1, 0.05):
        ck = _scaled(ref, direction, eps)
        exact = sweep([(0, ref), (1, ck)], ex, engine="fast", steps=[1])
        taylor = sweep([(0, ref), (1, ck)], ex, engine="taylor", steps=[1])
        assert engines_in(exact) == {"exact"} and engines_in(taylor) == {"taylor"}
        assert (exact[["task", "direction", "k"]].to_numpy() == taylor[["task", "direction", "k"]].to_numpy()).all()
        np.testing.assert_allclose(taylor["nll_checkpoint"], exact["nll_checkpoint"], atol=1e-5)
        np.testing.assert_allclose(taylor["nll_reference"], exact["nll_reference"], atol=1e-5)
        errors.append(np.abs(taylor["nll"] - exact["nll"]).max())
        changes.append(np.abs(exact["nll"] - exact["nll_checkpoint"]).max())
    # the change is first order in eps, the error second order: halving eps divides it by ~4
    assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 2.5
    assert errors[2] < 0.1 * changes[2]
    assert changes[2] > changes[0] / 6     # the thing estimated did not vanish with eps


def test_taylor_engine_refuses_what_it_cannot_estimate():
    ref, ex = tiny_model("llama"), examples()
    ck = perturbed(ref)
    for kw in (dict(mode="skip"), dict(ends=True)):
        with pytest.raises(CogprobeError, match="--engine fast"):
            sweep([(0, ref), (1, ck)], ex, engine="taylor", **kw)
    kept = sweep([(0, ref), (1, ck)], ex, engine="taylor", mode="keep-outer", keep_outer=[(1, 1)], steps=[1])
    assert len(kept) == len(TASKS)


def test_agreement_of_the_taylor_sweep_with_the_exact_one(planted):
    ref, ck, ex = planted
    exact = sweep([(0, ref), (1, ck)], ex, steps=[1])
    taylor = sweep([(0, ref), (1, ck)], ex, engine="taylor", steps=[1])
    means = {k: v[0].sum() / v[1].sum() for k, v in agreement.arms(exact, 1).items()}
    imp = agreement.importance(means, LAYERS)
    assert imp.sum() == pytest.approx(1.0)
    assert set(agreement.top_set(imp, 2)) == PLANTED
    rho = agreement.agreement(None, exact, 1, taylor=taylor, n_resamples=200)
    assert rho.low <= rho.estimate <= rho.high and rho.estimate > 0.5
    fixed = agreement.agreement(weight_delta(ck, ref), exact, 1, n_resamples=200)
    assert fixed.estimate > 0.5
    err = agreement.curve_error(exact, taylor, 1, "perception", "input", n_resamples=200)
    assert 0 <= err.low <= err.estimate <= err.high
    points = agreement.point_errors(exact, taylor, 1)
    assert len(points) == 2 * 2 * (LAYERS + 1)
    assert agreement.spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    with pytest.raises(CogprobeError, match="mixes"):
        agreement.arms(pd.concat([exact, taylor]), 1)


def test_tables_without_an_engine_column_read_as_exact_and_mixed_tables_are_refused(planted):
    ref, ck, ex = planted
    exact = sweep([(0, ref), (1, ck)], ex, steps=[1])
    old = exact.drop(columns="engine")
    assert engines_in(old) == {"exact"}
    select_curves(old, tau=0.5)
    taylor = sweep([(0, ref), (1, ck)], ex, engine="taylor", steps=[1])
    with pytest.raises(CogprobeError, match="mixes"):
        select_curves(pd.concat([old, taylor]), tau=0.5)


def test_select_ranking_by_size_and_by_tau(planted):
    ref, ck, ex = planted
    table = rank([(0, ref), (7, ck)], ex, rankings=["weight-delta", "taylor", "block-influence"])
    by_size = select_ranking(table, "weight-delta", n_layers=LAYERS, fraction=1 / 3)
    assert by_size.layers == sorted(PLANTED) and by_size.rule == "weight-delta"
    assert by_size.params["step"] == 7 and by_size.k_in + by_size.k_out == 2
    total = table[table.ranking == "taylor"]["score"].sum()   # the estimated share of every block together
    cut = select_ranking(table, "taylor", n_layers=LAYERS, tau=0.99 * total)
    assert set(cut.layers) == PLANTED and cut.evidence["share"] >= 0.99 * total
    with pytest.raises(CogprobeError, match="never add up"):
        select_ranking(table, "taylor", n_layers=LAYERS, tau=min(1.0, 1.01 * total))
    assert select_ranking(table, "block-influence", n_layers=LAYERS).params["step"] == 0
    with pytest.raises(CogprobeError, match="does not estimate gain"):
        select_ranking(table, "weight-delta", n_layers=LAYERS, tau=0.8)
    with pytest.raises(CogprobeError, match="cogprobe rank"):
        select_ranking(table, "angular", n_layers=LAYERS)
    with pytest.raises(CogprobeError, match="steps"):
        select_ranking(table, "taylor", n_layers=LAYERS, step=3)


def test_rank_sweep_and_select_through_the_cli(tmp_path, capsys):
    from cogprobe.cli import main
    from helpers import write_corpus
    from tiny import save_tiny
    model, corpus = save_tiny(tmp_path / "llama", "llama"), write_corpus(tmp_path / "pairs.csv")
    run = tmp_path / "probe"
    assert main(["train", "--model", str(model), "--corpus", str(corpus), "--batch-size", "4", "--seq-len", "32",
                 "--threads", "1", "--no-progress", "--test", "0.2", "--out", str(run), "--strategy", "layers",
                 "--layers", "1,4", "--steps", "6", "--lr", "3e-3", "--save-steps", "0,6"]) == 0
    assert main(["rank", str(run), "--pairs", "3"]) == 0
    table = pd.read_parquet(run / "rankings.parquet")
    assert set(table["checkpoint_step"]) == {0, 6} and (run / "rankings.parquet.json").is_file()
    assert set(table[(table.ranking == "weight-delta") & (table["rank"] <= 2)]["block"]) == {1, 4}
    assert main(["select", str(run), "--rule", "weight-delta", "--fraction", "0.34", "--name", "sel-wd.json"]) == 0
    assert json.loads((run / "sel-wd.json").read_text())["layers"] == [1, 4]
    assert main(["select", str(run), "--rule", "taylor", "--by-tau", "--tau", "0.3", "--name", "sel-t.json"]) == 0
    assert set(json.loads((run / "sel-t.json").read_text())["layers"]) <= {1, 4}
    # the taylor engine writes its own table; into the exact one it is refused
    assert main(["sweep", str(run), "--pairs", "3"]) == 0
    assert main(["sweep", str(run), "--pairs", "3", "--engine", "taylor"]) == 2
    assert "another folder" in capsys.readouterr().err
    assert main(["sweep", str(run), "--pairs", "3", "--engine", "taylor", "--out", str(tmp_path / "t")]) == 0
    assert set(pd.read_parquet(tmp_path / "t" / "sweeps.parquet")["engine"]) == {"taylor"}
    assert main(["select", str(run), "--rule", "curves", "--out", str(tmp_path / "t"), "--tau", "0.5",
                 "--name", "sel-curves.json"]) == 0

    # analyses/cheap_rankings.py on this probe: every table it publishes, every rho with its interval
    script = Path(__file__).parent.parent / "analyses" / "cheap_rankings.py"
    done = subprocess.run([sys.executable, str(script), "--probe", f"tiny={run}", "--exact-seconds", "tiny=10",
                           "--out", str(tmp_path / "cr")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COGPROBE_FIGURES": str(tmp_path / "figures")})
    assert done.returncode == 0, done.stderr[-3000:]
    agree = pd.read_csv(tmp_path / "figures" / "cheap_rankings.csv")
    assert set(agree["ranking"]) == {"block-influence", "angular", "weight-delta", "taylor"}
    assert (agree["spearman_low"] <= agree["spearman"]).all() and (agree["spearman"] <= agree["spearman_high"]).all()
    sets = pd.read_csv(tmp_path / "figures" / "cheap_rankings_sets.csv")
    assert "exact importance, top" in set(sets["set"])
    assert len(pd.read_csv(tmp_path / "figures" / "cheap_rankings_curves.csv")) == 4
    assert (tmp_path / "figures" / "cheap_rankings.png").is_file()

    # analyses/taylor_line_check.py: the first-order prediction beside the exact change, per alpha
    script = Path(__file__).parent.parent / "analyses" / "taylor_line_check.py"
    done = subprocess.run([sys.executable, str(script), str(run), "6", "--pairs", "3"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("alpha 0.02: exact change") == 2   # both tasks
