import copy

import numpy as np
import pandas as pd
import pytest
import torch

from cogprobe.models.blocks import find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.probe.sweep import keep_outer_configs, sweep, sweep_configs
from cogprobe.data.tasks import TASKS, score
from helpers import examples, perturbed
from tiny import LAYERS, tiny_model





def mix(ref, ck, from_ck):
    """The reference with the blocks `from_ck` taken from the checkpoint."""
    out = copy.deepcopy(ref)
    b, theirs = find_blocks(out), dict(ck.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():
            if b.block_of(name) in from_ck:
                p.copy_(theirs[name])
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("mode", ["revert", "skip"])
def test_fast_equals_naive(family, mode):
    ref = tiny_model(family)
    ckpts = [(0, ref), (10, perturbed(ref, embed=True)), (20, perturbed(ref, seed=2))]
    ex = examples()
    fast = sweep(ckpts, ex, mode=mode, engine="fast", batch_size=2)
    naive = sweep(ckpts, ex, mode=mode, engine="naive", batch_size=3)
    assert len(fast) == 3 * 2 * 2 * (LAYERS + 1)
    np.testing.assert_allclose(fast["nll"], naive["nll"], atol=1e-4, rtol=0)
    assert fast.attrs["block_evals"] < naive.attrs["block_evals"]
    # per-example sums: the same in both engines (other batch sizes), in the examples' own order
    np.testing.assert_allclose(np.stack(fast["example_nll"]), np.stack(naive["example_nll"]), atol=1e-3, rtol=0)
    assert (np.stack(fast["example_tokens"]) == np.stack(naive["example_tokens"])).all()
    row = fast.iloc[5]
    assert sum(row["example_nll"]) / sum(row["example_tokens"]) == pytest.approx(row["nll"], abs=1e-9)
    want = [len(e.input_ids) - e.n_prompt for e in ex[row["task"]]]
    assert list(row["example_tokens"]) == want


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_ends_option_matches_naive_with_tied_and_untied_weights(family):
    ref = tiny_model(family)
    ckpts = [(0, ref), (5, perturbed(ref, embed=True))]
    ex = examples()
    fast = sweep(ckpts, ex, ends=True, engine="fast")
    naive = sweep(ckpts, ex, ends=True, engine="naive")
    np.testing.assert_allclose(fast["nll"], naive["nll"], atol=1e-4, rtol=0)
    assert fast["ends"].all()


def test_keep_outer_matches_naive():
    ref = tiny_model("llama")
    ckpts = [(0, ref), (5, perturbed(ref))]
    pairs = [(0, 0), (1, 1), (2, 0), (0, 3), (3, 3)]
    fast = sweep(ckpts, examples(), mode="keep-outer", keep_outer=pairs, engine="fast")
    naive = sweep(ckpts, examples(), mode="keep-outer", keep_outer=pairs, engine="naive")
    np.testing.assert_allclose(fast["nll"], naive["nll"], atol=1e-4, rtol=0)
    last = fast[fast.checkpoint_step == 5]
    full = last[(last.k_in == 3) & (last.k_out == 3)]
    assert np.allclose(full["nll"], full["nll_checkpoint"], atol=1e-5)      # keeps every block
    none = last[(last.k_in == 0) & (last.k_out == 0)]
    assert np.allclose(none["nll"], none["nll_reference"], atol=1e-5)      # blocks-only run: all reverted


def test_remembered_prefixes_give_the_same_numbers_for_fewer_block_evaluations():
    """The budget search scores one checkpoint in many small calls: with `remember` the engine keeps the
    checkpoint's prefix states between calls, and every number is bit for bit what a fresh engine gives."""
    from cogprobe.probe.sweep import FastEngine
    ref = tiny_model("llama")
    ckpts = [(0, ref), (5, perturbed(ref))]
    calls = [[(2, 1), (2, 2)], [(2, 0)], [(1, 3), (1, 2)], [(2, 3)]]
    fresh, kept = FastEngine(ref), FastEngine(ref)
    for pairs in calls:
        a = sweep(ckpts, examples(), mode="keep-outer", keep_outer=pairs, steps=[5], runner=fresh)
        b = sweep(ckpts, examples(), mode="keep-outer", keep_outer=pairs, steps=[5], runner=kept, remember=True)
        pd.testing.assert_frame_equal(a, b)
    assert kept.counter.block_evals < fresh.counter.block_evals
    tight = FastEngine(ref, cache_bytes=1)   # nothing fits: recomputed, still the same numbers
    for pairs in calls:
        c = sweep(ckpts, examples(), mode="keep-outer", keep_outer=pairs, steps=[5], runner=tight, remember=True)
        d = sweep(ckpts, examples(), mode="keep-outer", keep_outer=pairs, steps=[5], runner=FastEngine(ref))
        pd.testing.assert_frame_equal(c, d)
    assert not tight._kept


def test_k0_is_checkpoint_score_and_kL_on_blocks_only_run_is_reference():
    ref = tiny_model("llama")
    ck = perturbed(ref, blocks={0, 1, 5})
    ex = examples()
    table = sweep([(0, ref), (7, ck)], ex)
    for task in TASKS:
        rows = table[(table.checkpoint_step == 7) & (table.task == task)]
        own = score(ck, ex[task]).nll
        base = score(ref, ex[task]).nll
        assert np.allclose(rows[rows.k == 0]["nll"], own, atol=1e-5)
        assert np.allclose(rows[rows.k == LAYERS]["nll"], base, atol=1e-5)
        assert np.allclose(rows["nll_reference"], base, atol=1e-5)
        # input reverting 2 blocks removes 0,1; output reverting 1 block removes 5: the rest is untouched
        inp = rows[rows.direction == "input"].set_index("k")["nll"]
        out = rows[rows.direction == "output"].set_index("k")["nll"]
        assert np.isclose(inp[2], score(mix(ref, ck, {5}), ex[task]).nll, atol=1e-5)
        assert np.isclose(out[1], score(mix(ref, ck, {0, 1}), ex[task]).nll, atol=1e-5)


def test_share_is_one_at_k0_and_zero_when_all_reverted():
    ref = tiny_model("llama")
    ck = perturbed(ref, scale=0.2)
    t = sweep([(0, ref), (1, ck)], examples())
    t = t[t.checkpoint_step == 1]
    for _, rows in t.groupby("task"):
        if rows["nll_checkpoint"].iloc[0] < rows["nll_reference"].iloc[0]:
            assert np.allclose(rows[rows.k == 0]["share"], 1.0)
            assert np.allclose(rows[rows.k == LAYERS]["share"], 0.0, atol=1e-5)
        else:  # no gain to retain: the column says so instead of inventing a share
            assert rows["share"].isna().all()


def test_reference_prefix_is_shared_across_blocks_only_checkpoints():
    ref = tiny_model("llama")
    ex = examples()
    one = sweep([(0, ref), (1, perturbed(ref, blocks={5}))], ex, directions=["input"])
    three = sweep([(0, ref), (1, perturbed(ref, blocks={5})), (2, perturbed(ref, blocks={5}, seed=3)),
                   (3, perturbed(ref, blocks={5}, seed=4))], ex, directions=["input"])
    n_batches = sum(-(-len(v) // 8) for v in ex.values())
    # each extra checkpoint only runs its own last block (once) on top of cached reference prefixes
    assert three.attrs["block_evals"] - one.attrs["block_evals"] == 2 * n_batches * 1


def test_bad_requests():
    ref = tiny_model("llama")
    with pytest.raises(CogprobeError, match="outside 0..6"):
        sweep_configs(LAYERS, ks=[0, 7])
    with pytest.raises(CogprobeError, match="direction"):
        sweep_configs(LAYERS, directions=["sideways"])
    with pytest.raises(CogprobeError, match="does not fit"):
        keep_outer_configs(LAYERS, [(4, 3)])
    with pytest.raises(CogprobeError, match="no checkpoints"):
        sweep([], examples())
    with pytest.raises(CogprobeError, match="engine"):
        sweep([(0, ref)], examples(), engine="turbo")
