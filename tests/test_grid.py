"""The adaptive k grid (`probe.grid`): the coarse grid, the refinement rule on planted tables, the
k_grid column, the same numbers as the full grid where both score, and a sweep that resumes."""
import numpy as np
import pandas as pd
import pytest
import torch
import transformers as tf

from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import TASKS
from cogprobe.plots import sweeps as sweep_plots
from cogprobe.probe.grid import adaptive_sweep, adaptive_sweep_run, coarse_grid, refinements
from cogprobe.probe.folders import sweep_run
from cogprobe.probe.sweep import sweep
from cogprobe.selection.rules import select_curves
from helpers import examples, train_blocks
from tiny import FAMILIES

DEEP = 16   # blocks of the tiny model here: deep enough for a coarse grid that leaves k's out


def test_the_coarse_grid_is_the_issues_at_30_blocks_and_scales_with_the_ends_always_in():
    assert coarse_grid(30) == [0, 1, 2, 3, 5, 8, 10, 12, 16, 20, 24, 27, 28, 29, 30]
    assert coarse_grid(30, keep=[4, 8, 10]) == [0, 1, 2, 3, 4, 5, 8, 10, 12, 16, 20, 24, 27, 28, 29, 30]
    for n in (2, 6, 12, 24, 32, 40, 64):
        grid = coarse_grid(n)
        assert set(range(min(n, 3) + 1)) | set(range(max(0, n - 3), n + 1)) <= set(grid) <= set(range(n + 1))
        assert grid == sorted(set(grid))
    assert coarse_grid(6) == list(range(7))   # a shallow model: the coarse grid is every k
    assert len(coarse_grid(60)) == 15 and len(coarse_grid(120)) == 15   # the grid's size does not grow with L
    with pytest.raises(CogprobeError, match="outside 0..30"):
        coarse_grid(30, keep=[31])


def planted(ks, shares, *, step=8, task="perception", direction="input"):
    """Rows of one curve: share at each k (no per-example scores: half-widths are given)."""
    return pd.DataFrame(dict(checkpoint_step=step, task=task, direction=direction, k=ks, share=shares))


def test_a_gap_is_refined_only_where_the_share_moves_more_than_the_wider_half_width():
    rows = planted([0, 4, 8, 12, 13], [1.0, 0.95, 0.5, 0.1, 0.0])
    half = pd.Series([0.0, 0.1, 0.3, 0.1, 0.05])
    # 0-4 moves 0.05 < 0.1: no; 4-8 moves 0.45 > 0.3: 6; 8-12 moves 0.4 > 0.3: 10; 12-13 adjacent: no
    assert refinements(rows, half)["k"].tolist() == [6, 10]
    assert refinements(rows, pd.Series([0.5] * 5)).empty                       # wide intervals: nothing
    assert refinements(rows, pd.Series([0.0] * 5))["k"].tolist() == [2, 6, 10]  # no noise: every move counts
    flat = planted([0, 4, 8], [np.nan, np.nan, np.nan])                          # no gain, no share
    assert refinements(flat, pd.Series([np.nan] * 3)).empty
    one_pair = planted([0, 8], [1.0, 0.4])                                       # no interval (one pair): 0
    assert refinements(one_pair, pd.Series([np.nan, np.nan]))["k"].tolist() == [4]


def test_each_curve_is_refined_on_its_own_and_a_control_follows_its_task():
    rows = pd.concat([planted([0, 8], [1.0, 0.2]), planted([0, 8], [1.0, 0.9], direction="output"),
                      planted([0, 8], [1.0, 0.2], step=4), planted([0, 8], [0.3, 0.9], task="perception-shuffled"),
                      planted([0, 8], [1.0, 1.0], task="production")], ignore_index=True)
    got = refinements(rows, pd.Series([0.1] * len(rows)))
    assert set(map(tuple, got.to_numpy().tolist())) == {(8, "perception", "input", 4), (4, "perception", "input", 4),
                                                       (8, "perception-shuffled", "input", 4)}


@pytest.fixture(scope="module")
def deep():
    """A 16-block tiny llama and a checkpoint that trained only its last six blocks: reverting the first
    ten from the input end changes nothing (share exactly 1, zero-width intervals), then it falls."""
    torch.manual_seed(0)
    config = FAMILIES["llama"]()
    config.num_hidden_layers, config._attn_implementation = DEEP, "eager"
    ref = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ex = examples()
    ck = train_blocks(ref, ex, set(range(10, DEEP)), steps=12, lr=2e-2).eval()
    return [(0, ref), (8, ck)], ex


def test_the_adaptive_sweep_scores_the_coarse_grid_then_refines_with_the_full_grids_numbers(deep):
    ckpts, ex = deep
    table = adaptive_sweep(ckpts, ex)
    full = sweep(ckpts, ex)
    assert set(table["k_grid"]) == {"coarse", "refined"}
    assert (table["k_grid"] == "coarse").eq(table["k"].isin(coarse_grid(DEEP))).all()
    refined = table[table["k_grid"] == "refined"]
    assert set(refined["checkpoint_step"]) == {8}   # the reference has no gain: nothing to refine there
    # between coarse 9 and 11 the input curve falls from exactly 1 (nothing reverted changed): 10 is scored
    assert 10 in set(refined[(refined["direction"] == "input")]["k"])
    assert len(table) < len(full) and table.attrs["block_evals"] < full.attrs["block_evals"]
    both = table.merge(full, on=["checkpoint_step", "task", "direction", "k"], suffixes=("", "_full"))
    assert len(both) == len(table)
    np.testing.assert_allclose(both["nll"], both["nll_full"], atol=1e-6, rtol=0)
    # where it stopped: every midpoint the rule still asks for is scored (or no gap qualifies)
    asked = refinements(table)
    assert len(asked.merge(table, on=["checkpoint_step", "task", "direction", "k"])) == len(asked)
    assert set(table.attrs["ks"]) == {(s, t, d) for s in (0, 8) for t in TASKS for d in ("input", "output")}


def test_an_interrupted_adaptive_sweep_continues_to_the_same_table(deep):
    ckpts, ex = deep
    whole = adaptive_sweep(ckpts, ex)
    kept = []

    class Stop(Exception):
        pass

    def save(rows):
        kept.append(rows)
        if len(kept) == 2:   # the coarse rows of both checkpoints kept; the refinement cut off
            raise Stop
    with pytest.raises(Stop):
        adaptive_sweep(ckpts, ex, on_rows=save)
    have = pd.concat(kept, ignore_index=True)
    resumed = adaptive_sweep(ckpts, ex, have=have)
    key = ["checkpoint_step", "task", "direction", "k"]
    pd.testing.assert_frame_equal(resumed.sort_values(key).reset_index(drop=True)[key + ["nll", "k_grid"]],
                                  whole.sort_values(key).reset_index(drop=True)[key + ["nll", "k_grid"]],
                                  check_exact=False, atol=1e-6)
    assert 0 < resumed.attrs["block_evals"] < whole.attrs["block_evals"]
    again = adaptive_sweep(ckpts, ex, have=resumed)   # nothing left: nothing scored, no checkpoint loaded
    assert again.attrs["block_evals"] == 0 and len(again) == len(resumed)


def test_figures_draw_scored_ks_only_and_grey_the_rest(deep):
    ckpts, ex = deep
    table = adaptive_sweep(ckpts, ex)
    fig = sweep_plots.specialization_heatmaps(table)
    heat_axes = [ax for ax in fig.axes if ax.collections and ax.get_title()]
    assert len(heat_axes) == 4
    for ax in heat_axes:   # one checkpoint with a gain (step 8) x every k, the unscored ones masked
        cells = ax.collections[0].get_array()
        assert cells.size == DEEP + 1 and np.ma.getmaskarray(cells).sum() == DEEP + 1 - len(
            set(table[(table["checkpoint_step"] == 8) & (table["task"] + " · " + table["direction"] + " end"
                                                         == ax.get_title())]["k"]))
    assert "not scored" in fig._supxlabel.get_text()
    curves = sweep_plots.specialization_curves(table)
    assert "adaptive k grid" in curves._suptitle.get_text()
    for ax in curves.axes:
        for line in ax.get_lines():
            if line.get_label().startswith("step"):
                assert set(np.asarray(line.get_xdata(), int)) <= set(table["k"])   # no k that was not scored


def test_the_curves_rule_refuses_a_sparse_table_in_one_line(deep):
    ckpts, ex = deep
    table = adaptive_sweep(ckpts, ex)
    with pytest.raises(CogprobeError, match="lacks k=.*sweep_grid") as e:
        select_curves(table, tau=0.8, n_layers=DEEP, input_task="production")
    assert "\n" not in str(e.value)


def test_the_folder_verb_writes_k_grid_continues_and_refuses_a_plain_table(trained_run, tmp_path):
    from cogprobe.data.evalset import EvalSet
    run = trained_run["run"]
    evalset = EvalSet.for_run(run, n=3)
    quiet = dict(evalset=evalset, log=lambda _: None)
    table = adaptive_sweep_run(run, out=tmp_path / "a", **quiet)
    assert set(table["k_grid"]) == {"coarse"}   # 6 blocks: the coarse grid is every k
    before = (tmp_path / "a" / "sweeps.parquet").stat().st_mtime_ns
    again = adaptive_sweep_run(run, out=tmp_path / "a", **quiet)
    assert len(again) == len(table) and (tmp_path / "a" / "sweeps.parquet").stat().st_mtime_ns == before
    import json
    (computed,) = json.loads((tmp_path / "a" / "sweeps.parquet.json").read_text())["computed"]   # the first call's
    assert computed["engine"] == "memory" and computed["grid"] == "adaptive" and computed["peak_bytes"] > 0
    assert computed["fit"]["engine"] == "memory" and computed["dtype"] == "float32"   # auto: two tiny models fit
    with pytest.raises(CogprobeError, match="other tasks, directions or ks"):
        sweep_run(run, out=tmp_path / "a", ks=[0, 1], **quiet)       # a plain sweep on another grid: refused
    sweep_run(run, out=tmp_path / "b", progress=False, **quiet)
    with pytest.raises(CogprobeError, match="grid of its own"):
        adaptive_sweep_run(run, out=tmp_path / "b", **quiet)
    given = adaptive_sweep_run(run, out=tmp_path / "c", ks=(0, 6), **quiet)   # ks: the coarse grid
    assert set(given.loc[given["k_grid"] == "coarse", "k"]) == {0, 6}
    assert set(given["k"]) <= set(range(7)) and set(given["k_grid"]) <= {"coarse", "refined"}


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """A run folder of the 16-block llama: 4 steps of full fine-tuning, checkpoints 0 and 4."""
    from helpers import cli, train_argv, write_corpus
    from tiny import tiny_tokenizer
    root = tmp_path_factory.mktemp("deep")
    torch.manual_seed(0)
    config = FAMILIES["llama"]()
    config.num_hidden_layers = DEEP
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    corpus = write_corpus(root / "pairs.csv")
    assert cli(train_argv(root / "llama", corpus, root / "run", steps=4, save_steps="0,4")) == 0
    return root / "run"


def test_the_budget_rule_reads_an_adaptive_table_and_picks_the_full_grids_set(deep_run, tmp_path):
    from cogprobe.data.evalset import EvalSet
    from cogprobe.selection.folders import select_run
    quiet = dict(evalset=EvalSet.for_run(deep_run, n=3), log=lambda _: None)
    adaptive_sweep_run(deep_run, out=tmp_path / "adaptive", **quiet)
    sweep_run(deep_run, out=tmp_path / "full", progress=False, **quiet)
    picked = {grid: select_run(deep_run, rule="budget", out=tmp_path / grid, progress=False, **quiet)
              for grid in ("adaptive", "full")}
    assert (picked["adaptive"].k_in, picked["adaptive"].k_out) == (picked["full"].k_in, picked["full"].k_out)
    known = {grid: sum(c["source"] == "known" for c in s.candidates) for grid, s in picked.items()}
    assert 0 < known["adaptive"] < known["full"]   # fewer candidates read from the sparser table


NUMBERS = ["nll", "nll_reference", "nll_checkpoint", "share", "n_tokens"]


def assert_same_rows(memory: pd.DataFrame, streamed: pd.DataFrame):
    """The same rows, bit for bit (fp32, same batch order), in the same order."""
    key = ["checkpoint_step", "task", "direction", "k", "k_grid"]
    assert len(memory) == len(streamed) > 0
    pd.testing.assert_frame_equal(memory[key + NUMBERS], streamed[key + NUMBERS], check_exact=True)
    for col in ("example_nll", "reference_example_nll", "checkpoint_example_nll", "example_tokens"):
        assert np.array_equal(np.stack(memory[col]), np.stack(streamed[col])), col


def test_the_streamed_adaptive_sweep_gives_the_in_memory_rows_round_by_round(deep, tmp_path):
    from cogprobe.probe.fit import sweep_engine
    from cogprobe.probe.streamed import StreamedEngine
    from cogprobe.tuning.checkpoints import Checkpoints
    from tiny import tiny_tokenizer
    pairs, ex = deep
    for step, model in pairs:
        model.save_pretrained(tmp_path / f"step-{step}")
        tiny_tokenizer().save_pretrained(tmp_path / f"step-{step}")
    ckpts = Checkpoints.open([tmp_path / f"step-{step}" for step, _ in pairs])
    memory = adaptive_sweep(ckpts, ex)
    engine, fit, runner = sweep_engine("streamed", ckpts, dtype=torch.float32, examples=ex, batch_size=8, n_configs=40)
    assert engine == "streamed" and isinstance(runner, StreamedEngine) and fit.streamed < fit.in_memory
    rounds = []
    streamed = adaptive_sweep(ckpts, ex, runner=runner, on_rows=rounds.append)
    assert_same_rows(memory, streamed)
    assert len(rounds) > 2 and "refined" in set(streamed["k_grid"])   # the refinement rounds streamed too
    assert streamed.attrs["ks"] == memory.attrs["ks"]
    with pytest.raises(CogprobeError, match="reads checkpoints from their files"):
        adaptive_sweep(pairs, ex, runner=runner)


def test_the_folder_verb_streams_the_adaptive_grid_when_auto_finds_two_models_too_big(deep_run, tmp_path):
    import json
    from cogprobe.data.evalset import EvalSet
    quiet = dict(evalset=EvalSet.for_run(deep_run, n=3), log=lambda _: None)
    memory = adaptive_sweep_run(deep_run, out=tmp_path / "memory", engine="memory", **quiet)
    roomy = json.loads((tmp_path / "memory" / "sweeps.parquet.json").read_text())["computed"][0]
    assert roomy["engine"] == "memory" and roomy["fit"] is None   # forced: nothing measured
    streamed = adaptive_sweep_run(deep_run, out=tmp_path / "streamed", engine="streamed", **quiet)
    assert_same_rows(memory, streamed)
    fit = json.loads((tmp_path / "streamed" / "sweeps.parquet.json").read_text())["computed"][0]["fit"]
    budget = (fit["streamed"] + fit["in_memory"]) // 2
    auto = adaptive_sweep_run(deep_run, out=tmp_path / "auto", max_memory=budget, **quiet)
    assert_same_rows(memory, auto)
    (ran,) = json.loads((tmp_path / "auto" / "sweeps.parquet.json").read_text())["computed"]
    assert ran["engine"] == "streamed" and ran["grid"] == "adaptive" and ran["fit"]["budget"] == budget
    assert ran["peak_bytes"] > 0 and ran["block_evals"] > 0
    with pytest.raises(CogprobeError, match="too small for one block plus the activations"):
        adaptive_sweep_run(deep_run, out=tmp_path / "tiny", engine="streamed", max_memory=fit["streamed"] // 2, **quiet)
    assert not (tmp_path / "tiny" / "sweeps.parquet").exists()


def test_bfloat16_adaptive_rows_are_their_own_table_and_stream_alike(deep_run, tmp_path):
    import json
    from cogprobe.data.evalset import EvalSet
    quiet = dict(evalset=EvalSet.for_run(deep_run, n=3), log=lambda _: None)
    fp32 = adaptive_sweep_run(deep_run, out=tmp_path / "fp32", engine="memory", **quiet)
    with pytest.raises(CogprobeError, match="differs in source"):
        adaptive_sweep_run(deep_run, out=tmp_path / "fp32", dtype="bfloat16", **quiet)
    memory = adaptive_sweep_run(deep_run, out=tmp_path / "bf16m", dtype="bfloat16", engine="memory", **quiet)
    streamed = adaptive_sweep_run(deep_run, out=tmp_path / "bf16s", dtype="bfloat16", engine="streamed", **quiet)
    assert_same_rows(memory, streamed)
    record = json.loads((tmp_path / "bf16s" / "sweeps.parquet.json").read_text())
    assert record["source"]["dtype"] == "bfloat16" and record["computed"][0]["dtype"] == "bfloat16"
    coarse = fp32[fp32["k_grid"] == "coarse"].merge(memory[memory["k_grid"] == "coarse"],
                                                   on=["checkpoint_step", "task", "direction", "k"])
    assert not np.array_equal(coarse["nll_x"], coarse["nll_y"])   # another precision: other numbers
    np.testing.assert_allclose(coarse["nll_x"], coarse["nll_y"], atol=0.05)
