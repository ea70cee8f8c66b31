"""The comparison rows: what each trains, matched where it must be."""
import json

import pytest

from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import cogsym, resolve
from cogprobe.study.rows import ROWS, Skip, expand, kind, matched_rank, plan
from cogprobe.study.config import StudyConfig

L, F = 30, 0.25


def blocks_of(p, n=L):
    return resolve(p.layers, n) if p.layers else list(range(n))


def test_every_layer_restricted_row_has_cogsyms_size_and_the_matched_groups_differ_in_one_thing():
    k = len(cogsym(L, F))
    plans = {row: plan(row, n_layers=L, fraction=F, lora_r=8, seed=0) for row in ROWS if row != "budget"}
    for row in ("cogsym", "cogsym-ends", "cogsym-lora", "cogsym-lora-matched", "middle", "bottom", "top", "random"):
        assert len(blocks_of(plans[row])) == k, row
    assert blocks_of(plans["middle"]) == list(range(11, 19)) and blocks_of(plans["top"]) == list(range(22, 30))
    # full vs blocks: the same blocks, only the ends differ; cogsym vs cogsym-ends likewise
    assert plans["full"].strategy == "full" and blocks_of(plans["blocks"]) == list(range(L))
    assert not plans["blocks"].train_ends and plans["cogsym-ends"].train_ends and not plans["cogsym"].train_ends
    assert blocks_of(plans["cogsym-ends"]) == blocks_of(plans["cogsym"]) == cogsym(L, F)
    # the matched LoRA row: CogSym's blocks, all-block LoRA's parameter count (rank x blocks)
    wide = plans["cogsym-lora-matched"]
    assert wide.lora and blocks_of(wide) == cogsym(L, F) and wide.lora_r * k == 8 * L
    assert plans["cogsym-lora"].lora_r is None and plans["lora"].lora


def test_matched_rank_rounds_to_the_nearest_count():
    assert matched_rank(8, 30, 8) == 30 and matched_rank(8, 6, 2) == 24 and matched_rank(4, 30, 7) == 17
    assert matched_rank(1, 2, 100) == 1


def test_random_draws_are_distinct_rows_with_their_own_sets_and_the_single_row_keeps_its_old_set():
    import numpy as np
    assert expand(["full", "random", "middle"], 1) == ["full", "random", "middle"]
    assert expand(["full", "random"], 3) == ["full", "random-1", "random-2", "random-3"]
    assert kind("random-2") == "random" and kind("random") == "random" and kind("cogsym") == "cogsym"
    sets = [tuple(blocks_of(plan(f"random-{d}", n_layers=L, fraction=F, lora_r=8, seed=0))) for d in (1, 2, 3)]
    assert len(set(sets)) == 3
    old = sorted(int(b) for b in np.random.default_rng(0).choice(L, size=8, replace=False))
    assert blocks_of(plan("random", n_layers=L, fraction=F, lora_r=8, seed=0)) == old   # as before draws existed
    assert blocks_of(plan("random-1", n_layers=L, fraction=F, lora_r=8, seed=1)) != list(sets[0])
    with pytest.raises(CogprobeError, match="random_draws"):
        expand(["random"], 0)


def test_budget_reads_the_selection_and_skips_with_its_reason(tmp_path):
    with pytest.raises(Skip, match="no budget selection"):
        plan("budget", n_layers=L, fraction=F, lora_r=8, seed=0, study=tmp_path)
    (tmp_path / "selection-budget.json").write_text(json.dumps({"rule": "budget", "error": "no set keeps tau"}))
    with pytest.raises(Skip, match="no set keeps tau"):
        plan("budget", n_layers=L, fraction=F, lora_r=8, seed=0, study=tmp_path)
    (tmp_path / "selection-budget.json").write_text(json.dumps({"rule": "budget", "layers_arg": "0-2,28-29"}))
    assert blocks_of(plan("budget", n_layers=L, fraction=F, lora_r=8, seed=0, study=tmp_path)) == [0, 1, 2, 28, 29]
    with pytest.raises(CogprobeError, match="unknown row"):
        plan("sideways", n_layers=L, fraction=F, lora_r=8, seed=0)


def test_study_config_orders_rows_and_reads_lr_grids():
    c = StudyConfig(out="x", rows="cogsym,random,full,blocks", probe_row="blocks", random_draws=2,
                    lr_grid="3e-4,1e-4", lora_lr_grid="")
    assert c.row_list() == ["full", "blocks", "cogsym", "random-1", "random-2"]
    assert c.lrs("cogsym") == [1e-4, 3e-4] and c.lrs("cogsym-lora") == [c.lora_lr]
    for bad, match in ((dict(lr_grid="fast"), "lr_grid"), (dict(lr_grid="0,1e-3"), "> 0"),
                       (dict(probe_row="cogsym"), "probe_row"), (dict(converge=True), "eval_steps"),
                       (dict(random_draws=0), "random_draws"), (dict(rows="full,sideways"), "unknown")):
        with pytest.raises(CogprobeError, match=match):
            StudyConfig(out="x", **bad)
