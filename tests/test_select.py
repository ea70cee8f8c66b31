import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cogprobe.models.blocks import find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import cogsym, resolve, to_string
from cogprobe.selection.rules import Selection, select_budget, select_curves, select_fixed, sweep_candidates
from cogprobe.probe.sweep import COLUMNS, sweep
from cogprobe.data.tasks import TASKS, build_examples, score
from helpers import PLANT_8, PLANT_12, TOY_CORPUS, KeepOuterModel, revert_table, train_blocks
from tiny import LAYERS, tiny_model, tiny_tokenizer

# --- synthetic tables: the gain of each task sits in known blocks -----------------------------


def brute_force(model: KeepOuterModel, L: int, tau: float):
    """Every (k_in, k_out) on the grid with its worst-task share, computed directly."""
    out = []
    for a in range(L + 1):
        for b in range(L + 1 - a):
            shares = [(model.ref(t) - model.nll(t, a, b)) / (model.ref(t) - model.nll(t, L, 0))
                      for t in model.gains]
            out.append((a, b, min(shares)))
    return out


def check_json(sel: Selection, n_layers: int, tmp_path) -> dict:
    """selection.json is strict JSON and `cogprobe train --layers` reads back the same blocks."""
    data = sel.to_json()
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(data, allow_nan=False))
    assert resolve(str(path), n_layers) == sel.layers
    assert resolve(data["layers_arg"], n_layers) == sel.layers
    assert data["layers_to_transform"] == sel.layers
    assert data["fraction"] == len(sel.layers) / n_layers
    return data


# --- fixed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers", range(1, 65))
@pytest.mark.parametrize("f", [0.25, 0.5])
def test_fixed_is_the_training_loops_cogsym_rule(n_layers, f):
    if round(f * n_layers) == 0:
        with pytest.raises(CogprobeError, match="rounds to zero"):
            select_fixed(n_layers, f)
        return
    sel = select_fixed(n_layers, f)
    assert sel.layers == cogsym(n_layers, f)
    assert sel.k_in + sel.k_out == len(sel.layers) and sel.k_in - sel.k_out in (0, 1)


def test_fixed_smollm2_json(tmp_path):
    sel = select_fixed(30)
    data = check_json(sel, 30, tmp_path)
    assert data["layers_arg"] == "0-3,26-29" and (sel.k_in, sel.k_out) == (4, 4)
    assert "0-3,26-29" in sel.table()


# --- curves ------------------------------------------------------------------------------------


def test_curves_finds_the_planted_blocks(tmp_path):
    sel = select_curves(revert_table(PLANT_12), tau=0.8)
    assert (sel.k_in, sel.k_out) == (3, 3)
    assert sel.layers == [0, 1, 2, 9, 10, 11]
    inp = sel.evidence["ends"][0]
    assert inp["task"] == "perception" and inp["share"] >= 0.8 > inp["share_k_minus_1"]
    assert inp["criterion"] == "remove" and inp["end"] == inp["direction"] == "input"
    check_json(sel, 12, tmp_path)
    assert "0-2,9-11" in sel.table() and "perception" in sel.table()


@pytest.mark.parametrize("tau, k_in, k_out", [(0.5, 3, 1), (0.9, 4, 3), (1.0, 6, 4), (0.05, 1, 1)])
def test_curves_second_plant_and_tau(tau, k_in, k_out):
    sel = select_curves(revert_table(PLANT_8), tau=tau)
    assert (sel.k_in, sel.k_out) == (k_in, k_out)
    assert sel.layers == sorted(set(range(k_in)) | set(range(8 - k_out, 8)))


def test_curves_picks_the_last_step_by_default_and_any_step_on_request():
    flat = revert_table({t: [0.0] * 8 for t in TASKS}, step=0)        # the reference: no gain
    early = revert_table({t: g[::-1] for t, g in PLANT_8.items()}, step=10)
    table = pd.concat([flat, early, revert_table(PLANT_8, step=20)], ignore_index=True)
    assert select_curves(table, tau=0.5).layers == [0, 1, 2, 7]
    assert select_curves(table, tau=0.5, step=10).params["step"] == 10
    assert select_curves(table, tau=0.5, step=10).layers != [0, 1, 2, 7]


def curve_table(curves: dict[tuple[str, str], list[float]], nll_ref: float = 3.0) -> pd.DataFrame:
    """A revert sweep with the given NLL at every k per (task, direction): any shape, additive or not."""
    rows = []
    for (task, direction), nlls in curves.items():
        for k, nll in enumerate(nlls):
            rows.append(dict(checkpoint_step=5, task=task, direction=direction, mode="revert", k=k, k_in=None,
                             k_out=None, blocks="", ends=False, nll=nll, n_tokens=100, nll_reference=nll_ref,
                             nll_checkpoint=nlls[0], share=(nll_ref - nll) / (nll_ref - nlls[0])))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_curves_keep_criterion_equals_remove_when_gains_add_up():
    for plant, tau in ((PLANT_12, 0.8), (PLANT_8, 0.5), (PLANT_8, 0.9)):
        table = revert_table(plant)
        keep, remove = (select_curves(table, tau=tau, criterion=c) for c in ("keep", "remove"))
        assert keep.layers == remove.layers and keep.params["criterion"] == "keep"


def test_curves_keep_criterion_sees_through_compensation():
    """Blocks that stand in for each other: reverting the first k blocks barely hurts until every
    block is reverted (remove needs them all), yet the first 2 alone keep 90% (keep finds them)."""
    L = 8
    perception_in = [2.0, 2.05, 2.1, 2.1, 2.15, 2.15, 2.2, 2.2, 3.0]    # revert [0, k): little loss until k = L
    perception_out = [2.0, 2.0, 2.0, 2.0, 2.02, 2.05, 2.1, 2.4, 3.0]   # revert [L-k, L): first 2 blocks keep 0.9 at k=6
    production_out = [2.0, 2.1, 2.15, 2.2, 2.2, 2.25, 2.3, 2.3, 3.0]
    production_in = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.05, 2.3, 3.0]     # last 1 block keeps 0.7 at k=7, last 2: 0.95
    table = curve_table({("perception", "input"): perception_in, ("perception", "output"): perception_out,
                         ("production", "input"): production_in, ("production", "output"): production_out})
    remove = select_curves(table, tau=0.8, n_layers=L)
    assert (remove.k_in, remove.k_out) == (L, L) and remove.layers == list(range(L))
    keep = select_curves(table, tau=0.8, n_layers=L, criterion="keep")
    assert (keep.k_in, keep.k_out) == (2, 2) and keep.layers == [0, 1, 6, 7]
    inp, out = keep.evidence["ends"]
    assert inp["direction"] == "output" and inp["share"] == pytest.approx(0.9) and inp["share_k_minus_1"] < 0.8
    assert out["direction"] == "input" and out["share"] == pytest.approx(0.95)
    assert "keep" in keep.table()
    with pytest.raises(CogprobeError, match="unknown criterion 'both'"):
        select_curves(table, criterion="both")


def test_curves_task_per_end_and_overlapping_ends():
    swapped = select_curves(revert_table(PLANT_8), tau=0.5, input_task="production", output_task="perception")
    # production from the input end reaches 0.5 only with block 7 (k=8); perception from the output end at k=6
    assert (swapped.k_in, swapped.k_out) == (8, 6)
    assert [e["task"] for e in swapped.evidence["ends"]] == ["production", "perception"]
    assert swapped.layers == list(range(8))   # the ends overlap: the union is every block
    assert swapped.to_json()["fraction"] == 1.0


def test_curves_ignores_other_modes_and_filters_ends():
    table = pd.concat([revert_table(PLANT_12), revert_table(PLANT_12, ends=True).assign(nll=9.0)],
                      ignore_index=True)
    with pytest.raises(CogprobeError, match="mixes sweeps with and without --ends"):
        select_curves(table)
    assert select_curves(table, ends=False).layers == [0, 1, 2, 9, 10, 11]
    skip = revert_table(PLANT_8).assign(mode="skip", nll=50.0)
    assert select_curves(pd.concat([revert_table(PLANT_12), skip]), tau=0.8).layers == [0, 1, 2, 9, 10, 11]


@pytest.mark.parametrize("tau", [0, -0.5, 1.01, float("nan")])
def test_curves_rejects_bad_tau(tau):
    with pytest.raises(CogprobeError, match=r"tau .*\(0, 1\]"):
        select_curves(revert_table(PLANT_12), tau=tau)


def test_curves_failures_say_what_and_how_to_fix():
    table = revert_table(PLANT_12)
    with pytest.raises(CogprobeError, match="no revert rows; run `cogprobe sweep RUN --mode revert`"):
        select_curves(table.assign(mode="skip"))
    with pytest.raises(CogprobeError,
                       match=r"did not improve .* task 'perception' \(nll_checkpoint 2.0000 >= nll_reference 2.0000\)"):
        select_curves(revert_table({t: [0.0] * 12 for t in TASKS}))
    worse = revert_table(PLANT_12, extra=-5.0)   # the reference is better than the checkpoint
    with pytest.raises(CogprobeError, match=r"did not improve.*nll_checkpoint 2.0000 >= nll_reference"):
        select_curves(worse)
    with pytest.raises(CogprobeError, match=r"no revert rows at checkpoint step 7; the table has steps \[10\]"):
        select_curves(table, step=7)
    nan = table.copy()
    nan.loc[(nan.task == "production") & (nan.direction == "output") & (nan.k == 4), "nll"] = math.nan
    with pytest.raises(CogprobeError, match=r"production curve \(output\) has NaN at k=\[4\]"):
        select_curves(nan)
    with pytest.raises(CogprobeError, match=r"lacks k=\[12\]; rerun the sweep with the full grid"):
        select_curves(table[table.k < 12], n_layers=12)
    with pytest.raises(CogprobeError, match=r"lacks k=\[12\]"):   # L read from the blocks the rows name
        select_curves(table[table.k < 12])
    with pytest.raises(CogprobeError, match=r"lacks k=\[0\]; rerun the sweep with the full grid"):
        select_curves(table[table.k > 0])
    with pytest.raises(CogprobeError, match=r"reaches tau at k=3 but lacks k=\[1, 2\], so a smaller k may do"):
        select_curves(table[~table.k.isin([1, 2])])
    with pytest.raises(CogprobeError, match="no revert rows for task 'production', direction output"):
        select_curves(table[table.task == "perception"])
    with pytest.raises(CogprobeError, match="removes no perception gain .* the gain is not in the blocks"):
        select_curves(revert_table({"perception": [0.0] * 12, "production": PLANT_12["production"]}, extra=1.0))
    with pytest.raises(CogprobeError, match="several rows per k"):
        select_curves(pd.concat([table, table]))
    with pytest.raises(CogprobeError, match=r"lacks columns \['nll'\]"):
        select_curves(table.drop(columns="nll"))


# --- budget ------------------------------------------------------------------------------------


def test_budget_finds_the_planted_smallest_set(tmp_path):
    gains = {"perception": [0.45, 0.45] + [0.0125] * 8, "production": [0.01] * 9 + [0.91]}
    model = KeepOuterModel(gains)
    sel = select_budget(model, 10, tau=0.8, search="exhaustive")
    assert (sel.k_in, sel.k_out) == (2, 1) and sel.layers == [0, 1, 9]
    # one evaluate call per size, each with every candidate of that size, smallest sizes first
    assert model.calls == [[(a, s - a) for a in range(s + 1)] for s in range(4)]
    assert len(sel.candidates) == 1 + 2 + 3 + 4 and sum(c["passed"] for c in sel.candidates) == 1
    # brute force over the whole grid: nothing smaller passes
    assert min(a + b for a, b, s in brute_force(model, 10, 0.8) if s >= 0.8) == 3
    data = check_json(sel, 10, tmp_path)
    assert data["evidence"]["chosen"]["shares"] == pytest.approx({"perception": 0.9125, "production": 0.93})
    # best smaller candidate: (1, 1) keeps perception's block 0 and block 9 (0.45 + 0.0125), production 0.92
    assert sel.evidence["best_smaller_share"] == pytest.approx(0.45 + 0.0125)
    assert "0-1,9" in sel.table() and f"smaller sizes: 6 candidates, best worst-task share {0.45 + 0.0125:.4f}" \
        in sel.table()
    walk = select_budget(KeepOuterModel(gains), 10, tau=0.8)   # the frontier walk: same set, fewer candidates
    assert (walk.k_in, walk.k_out) == (2, 1) and walk.evidence["chosen"] == sel.evidence["chosen"]
    assert walk.evidence["n_monotone_violations"] == 0 and walk.evidence["search"] == "frontier"
    assert len(walk.candidates) == 12   # exhaustive: 10 (for so small an answer the walk scores more)


class TableModel(KeepOuterModel):
    """A synthetic `evaluate` from a table of shares per task: share[task][k_in, k_out]."""

    def __init__(self, shares: dict[str, np.ndarray]):
        super().__init__({t: [1.0 / (len(s) - 1)] * (len(s) - 1) for t, s in shares.items()})
        self.shares = shares

    def nll(self, task, k_in, k_out):
        return self.nll_ck + 1.0 - self.shares[task][k_in, k_out]   # every task's gain is 1


def monotone_shares(rng, L: int) -> np.ndarray:
    """A random table that grows with k_in and with k_out (not additive over blocks), 1 at the full set."""
    grid = np.cumsum(np.cumsum(rng.exponential(size=(L + 1, L + 1)) ** 3, axis=0), axis=1)
    grid = grid - grid[0, 0]
    full = max(grid[a, L - a] for a in range(L + 1))
    return grid / full


@pytest.mark.parametrize("seed", range(40))
def test_frontier_walk_agrees_with_the_exhaustive_search_on_monotone_tables(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 13))
    shares = {t: monotone_shares(rng, L) for t in TASKS}
    tau = float(rng.choice([0.5, 0.8, 0.9, 1.0, rng.uniform(0.2, 1.0)]))
    max_total = int(rng.integers(1, L + 1))
    results = []
    for search in ("exhaustive", "frontier"):
        try:
            sel = select_budget(TableModel(shares), L, tau=tau, max_total=max_total, search=search)
            results.append((sel.k_in, sel.k_out, sel.evidence["chosen"]["min_share"], len(sel.candidates)))
            assert sel.evidence["n_monotone_violations"] == 0 and not sel.evidence["fell_back_to_exhaustive"]
        except CogprobeError as e:
            results.append(str(e).split(" (")[0])
    if isinstance(results[0], tuple):
        assert results[1][:3] == results[0][:3]
        size = results[0][0] + results[0][1]
        assert results[1][3] <= 2 * size + 3 * math.ceil(math.log2(max_total + 1)) + 1
    else:
        assert results[1] == results[0]


def test_frontier_walk_falls_back_when_a_superset_fails():
    """Planted: (0, 3) passes but its supersets (0, 4), (0, 5) fail. The sweep's edge (every (0, k_out)
    and (k_in, 0)) is known, so the walk sees the violation and searches exhaustively."""
    L = 6
    shares = {t: monotone_shares(np.random.default_rng(1), L) for t in TASKS}
    for t in TASKS:
        shares[t][0, 3], shares[t][0, 4], shares[t][0, 5] = 0.95, 0.5, 0.5
    edges = [(0, b) for b in range(L + 1)] + [(a, 0) for a in range(1, L + 1)]
    known = TableModel(shares)(edges)
    exhaustive = select_budget(TableModel(shares), L, tau=0.8, search="exhaustive")
    model = TableModel(shares)
    walk = select_budget(model, L, tau=0.8, known=known)
    assert walk.evidence["fell_back_to_exhaustive"]
    assert {"passes": [0, 3], "fails": [0, 4]} in walk.evidence["monotone_violations"]
    assert (walk.k_in, walk.k_out) == (exhaustive.k_in, exhaustive.k_out)
    assert walk.evidence["chosen"]["min_share"] == exhaustive.evidence["chosen"]["min_share"]
    assert not any(set(call) & set(edges) for call in model.calls)   # known candidates are never scored again
    assert walk.evidence["n_scored"] == len(walk.candidates) - len(edges)
    size = walk.k_in + walk.k_out   # the fallback scored every candidate up to the walk's size in one call
    below = {(a, s - a) for s in range(size + 1) for a in range(s + 1)} - set(edges)
    assert below - set().union(*map(set, model.calls[:-1])) <= set(model.calls[-1])
    assert len(model.calls[-1]) > size + 1
    with pytest.raises(CogprobeError, match="unknown budget search 'greedy'; use frontier or exhaustive"):
        select_budget(TableModel(shares), L, search="greedy")


def test_known_candidates_replace_scoring_and_keep_the_answer():
    rng = np.random.default_rng(3)
    L = 12
    shares = {t: monotone_shares(rng, L) for t in TASKS}
    edges = [(0, b) for b in range(L + 1)] + [(a, 0) for a in range(1, L + 1)]
    plain = select_budget(TableModel(shares), L, tau=0.6)
    model = TableModel(shares)
    with_edges = select_budget(model, L, tau=0.6, known=TableModel(shares)(edges))
    assert (with_edges.k_in, with_edges.k_out) == (plain.k_in, plain.k_out)
    assert with_edges.evidence["n_scored"] < plain.evidence["n_scored"]
    assert with_edges.evidence["n_monotone_violations"] == 0


def test_budget_tie_goes_to_the_smaller_input_end():
    model = KeepOuterModel({t: [0.25] * 4 for t in TASKS})   # every candidate of a size has the same share
    sel = select_budget(model, 4, tau=0.5)
    assert (sel.k_in, sel.k_out) == (0, 2)


def test_budget_tau_one_keeps_every_changed_block():
    model = KeepOuterModel({"perception": [0.3, 0, 0, 0, 0.7], "production": [0.2, 0.1, 0, 0, 0.7]})
    sel = select_budget(model, 5, tau=1.0)
    assert (sel.k_in, sel.k_out) == (2, 1)


def test_budget_failures_say_what_and_how_to_fix():
    gains = {t: [0.1] * 8 for t in TASKS}
    with pytest.raises(CogprobeError, match=r"no outer set of up to 4 blocks keeps tau=0.8 .*best worst-task share "
                                            r"0.500 at k_in=0, k_out=4\); lower --tau, raise --max-total or "
                                            r"train longer"):
        select_budget(KeepOuterModel(gains), 8, tau=0.8, max_total=4)
    with pytest.raises(CogprobeError, match=r"did not improve on the reference for task 'perception' "
                                            r"\(nll_checkpoint 2.0000 >= nll_reference 2.0000\)"):
        select_budget(KeepOuterModel({t: [0.0] * 8 for t in TASKS}), 8)
    with pytest.raises(CogprobeError, match="the gain is not in the blocks"):
        select_budget(KeepOuterModel(gains, extra=10.0), 8, tau=0.5)
    with pytest.raises(CogprobeError, match=r"tau .*\(0, 1\]"):
        select_budget(KeepOuterModel(gains), 8, tau=1.5)
    with pytest.raises(CogprobeError, match="max_total=9 is outside 0..8"):
        select_budget(KeepOuterModel(gains), 8, max_total=9)
    with pytest.raises(CogprobeError, match="at least one task"):
        select_budget(KeepOuterModel(gains), 8, tasks=())

    def with_nan(pairs):
        t = KeepOuterModel(gains)(pairs)
        t.loc[(t.k_in == 1) & (t.k_out == 0) & (t.task == "production"), "share"] = math.nan
        return t
    with pytest.raises(CogprobeError, match="share of task 'production' at k_in=1, k_out=0 is NaN"):
        select_budget(with_nan, 8, search="exhaustive")
    with pytest.raises(CogprobeError, match=r"returned 0 rows for k_in=0, k_out=0, task 'production'"):
        select_budget(lambda pairs: KeepOuterModel(gains)(pairs).query("task == 'perception'"), 8, search="exhaustive")
    with pytest.raises(CogprobeError, match="several checkpoints"):
        select_budget(lambda pairs: pd.concat([KeepOuterModel(gains)(pairs),
                                               KeepOuterModel(gains)(pairs).assign(checkpoint_step=9)]), 8)


# --- end to end on a real sweep of a tiny model ------------------------------------------------




def test_end_to_end_on_a_real_sweep(tmp_path):
    tok = tiny_tokenizer()
    corpus = TOY_CORPUS
    ex = {t: build_examples(tok, corpus, t) for t in TASKS}
    ref = tiny_model("llama")
    ck = train_blocks(ref, ex, {0, LAYERS - 1})
    for t in TASKS:   # the checkpoint really is better, so there is a gain to locate
        assert score(ck, ex[t]).nll < score(ref, ex[t]).nll - 0.1

    table = sweep([(0, ref), (1, ck)], ex, mode="revert")
    # blocks 1-4 are unchanged, so each curve is flat between k=1 and k=L-1: k is 1 or L
    last = table[table.checkpoint_step == 1]
    removed = last.eval("(nll - nll_checkpoint) / (nll_reference - nll_checkpoint)")   # share of the gain removed
    loose = min(float(removed[(last.direction == d) & (last.task == t) & (last.k == 1)].iloc[0])
                for d, t in [("input", "perception"), ("output", "production")])
    assert loose > 0.05
    sel = select_curves(table, tau=loose)   # reverting the one changed block at each end is enough
    assert sel.layers == [0, LAYERS - 1] and sel.params["step"] == 1
    full = select_curves(table, tau=1.0)    # all of it: each end needs both changed blocks
    assert {0, LAYERS - 1} <= set(full.layers)
    check_json(sel, LAYERS, tmp_path)

    calls = []

    def evaluate(pairs):
        calls.append(pairs)
        t = sweep([(0, ref), (1, ck)], ex, mode="keep-outer", keep_outer=pairs)
        return t[t.checkpoint_step == 1]

    # a revert sweep's rows are budget candidates: (0, L-k) and (L-k, 0), the same numbers bit for bit
    edges = sweep_candidates(table, 1, LAYERS)
    assert set(zip(edges.k_in, edges.k_out)) == {(0, b) for b in range(LAYERS + 1)} | {(a, 0) for a in range(LAYERS + 1)}
    scored = evaluate(list(dict.fromkeys(zip(edges.k_in, edges.k_out))))
    merged = edges.merge(scored, on=["task", "k_in", "k_out"], suffixes=("", "_scored"))
    assert len(merged) == len(edges) and (merged.nll == merged.nll_scored).all()
    assert (merged.example_nll.map(tuple) == merged.example_nll_scored.map(tuple)).all()
    assert (merged.blocks == merged.blocks_scored).all()
    calls.clear()

    tau = 0.9
    sel = select_budget(evaluate, LAYERS, tau=tau, search="exhaustive")
    singles = [c["min_share"] for c in sel.candidates if c["k_in"] + c["k_out"] == 1]
    assert max(singles) < tau   # neither changed block alone keeps 90% of both gains ...
    assert (sel.k_in, sel.k_out) == (1, 1) and sel.layers == [0, LAYERS - 1]  # ... both together keep all of it
    assert sel.evidence["chosen"]["min_share"] == pytest.approx(1.0, abs=1e-9)
    assert len(calls) == 3
    walk = select_budget(evaluate, LAYERS, tau=tau, known=edges)
    assert walk.layers == sel.layers and walk.evidence["chosen"]["min_share"] == sel.evidence["chosen"]["min_share"]


def test_before_tuning_workflow_through_the_cli(tmp_path, capsys):
    """The documented path: a short probe run, its sweeps, `select --rule budget`, then a
    layer-restricted run (and a lora-layers run) that trains exactly the selected blocks."""
    from safetensors.torch import load_file
    from cogprobe.tuning.checkpoints import Checkpoints
    from cogprobe.cli import main
    from helpers import write_corpus
    from tiny import save_tiny
    model, corpus = save_tiny(tmp_path / "llama", "llama"), write_corpus(tmp_path / "pairs.csv")
    probe_run = tmp_path / "probe"
    common = ["--model", str(model), "--corpus", str(corpus), "--batch-size", "4", "--seq-len", "32",
              "--threads", "1", "--no-progress", "--test", "0.2"]
    # the probe fine-tunes every block (embeddings frozen, so the gain sits in the blocks)
    assert main(["train", *common, "--out", str(probe_run), "--strategy", "layers", "--layers", f"0-{LAYERS - 1}",
                 "--steps", "20", "--lr", "3e-3", "--save-steps", "0,10,20"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(probe_run), "--pairs", "3"]) == 0
    assert "sweep: 100%" in capsys.readouterr().err   # the progress bar (rate and ETA), left when done
    assert main(["select", str(probe_run), "--rule", "curves", "--name", "selection-curves.json"]) == 0
    assert main(["select", str(probe_run), "--rule", "budget", "--pairs", "3"]) == 0
    said = capsys.readouterr()
    assert "select budget:" in said.err and "train it with --layers" in said.out
    sel = json.loads((probe_run / "selection.json").read_text())
    assert sel["rule"] == "budget" and sel["evidence"]["search"] == "frontier"
    # the sweep's curves (same pairs) are budget candidates read, not scored again
    known = [c for c in sel["candidates"] if c["source"] == "known"]
    assert known and all(0 in (c["k_in"], c["k_out"]) for c in known)
    assert sel["evidence"]["n_scored"] == len(sel["candidates"]) - len(known)
    assert main(["select", str(probe_run), "--rule", "budget", "--pairs", "3", "--search", "exhaustive", "--quiet",
                 "--name", "selection-exhaustive.json"]) == 0
    assert "select budget:" not in capsys.readouterr().err
    exhaustive = json.loads((probe_run / "selection-exhaustive.json").read_text())
    assert exhaustive["layers"] == sel["layers"] and exhaustive["evidence"]["chosen"] == sel["evidence"]["chosen"]
    assert json.loads((probe_run / "selection-curves.json").read_text())["rule"] == "curves"
    assert 0 < len(sel["layers"]) < LAYERS  # this probe's gain is not spread over every block
    chosen = sel["evidence"]["chosen"]
    assert min(chosen["shares"].values()) >= 0.8

    for strategy in ("layers", "lora-layers"):
        out = tmp_path / strategy
        assert main(["train", *common, "--out", str(out), "--strategy", strategy,
                     "--layers", str(probe_run / "selection.json"), "--steps", "2", "--save-steps", "0"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["layers"] == sel["layers"] and manifest["layers_string"] == sel["layers_arg"]
        changed = Checkpoints.open(out).changed_tensors(2)
        blocks = find_blocks(tiny_model("llama"))
        assert {blocks.block_of(n) for n in changed} == set(sel["layers"])
    assert load_file(str(tmp_path / "layers/checkpoints/step-2/trainable.safetensors"))

    # analyses/before_tuning_compare.py tunes every derived set of such a probe folder and scores it
    (probe_run / "selection.json").rename(probe_run / "selection-budget.json")
    script = Path(__file__).parent.parent / "analyses" / "before_tuning_compare.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--pairs", "8"], capture_output=True, text=True,
                          env={**os.environ, "COGPROBE_FIGURES": str(tmp_path / "figures")}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "figures" / "before_tuning.csv")
    assert table["set"].tolist()[:2] == ["base model", "full fine-tuning (the probe run)"]
    assert {"budget", "middle control"} <= set(table["set"])
    assert table.loc[table["set"] == "budget", "blocks"].item() == sel["layers_arg"]
    budget = table[table["set"] == "budget"].iloc[0]
    for task in TASKS:  # every number with its interval, on the test pairs
        assert budget[f"{task}_share_low"] <= budget[f"{task}_share"] <= budget[f"{task}_share_high"]
        assert budget[f"{task}_nll_low"] < budget[f"{task}_nll_high"]
    assert (table["test_pairs"] == 8).all()


def test_the_budget_rule_reads_a_sweep_table_whatever_its_record_of_how_it_was_computed(trained_run, tmp_path):
    """The record of the engine and the peak memory beside a sweep table is not part of its identity:
    the budget rule still takes the table's rows as known candidates."""
    import cogprobe.selection.folders as selection
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import sweep_run
    from cogprobe.probe.tables import open_checkpoints, source_id
    run = trained_run["run"]
    evalset = EvalSet.for_run(run, n=3, max_sentence_tokens=32)
    sweep_run(run, evalset=evalset, out=tmp_path, batch_size=2, log=lambda _: None)
    assert "computed" in json.loads((tmp_path / "sweeps.parquet.json").read_text())
    ckpts = open_checkpoints(run)
    known = selection._swept_candidates(tmp_path, evalset, source_id(run, ckpts), 4, 6)
    assert known is not None and len(known)
