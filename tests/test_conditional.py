"""Localisation of the conditional gain: the view of a sweep table, and the rules that read it."""
import numpy as np
import pandas as pd
import pytest

from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import CONTROLS, TASKS, build_examples
from cogprobe.probe.conditional import conditional_rows
from cogprobe.probe.sweep import sweep
from cogprobe.selection.rules import curves_decider, select_budget, select_curves
from cogprobe.selection.stability import stability
from helpers import TOY_CORPUS, KeepOuterModel, revert_table, train_blocks
from tiny import LAYERS, tiny_model, tiny_tokenizer

# 12 blocks. The source-independent gain (kept with shuffled sources) sits at the output end for
# both tasks; the source-dependent part of perception in blocks 3-4, of production in blocks 0-1.
SHARED = [0.01] * 9 + [0.3, 0.3, 0.3]
SOURCE = {"perception": [0, 0, 0, 0.2, 0.2] + [0] * 7, "production": [0.25, 0.25] + [0] * 10}
TRUE = {t: [a + b for a, b in zip(SHARED, s)] for t, s in SOURCE.items()}
SHUFFLED = {c: SHARED for c in CONTROLS}


def planted_table() -> pd.DataFrame:
    return pd.concat([revert_table(TRUE), revert_table(SHUFFLED, nll_ck=2.5)], ignore_index=True)


def test_the_view_holds_true_minus_shuffled_nll_and_the_share_of_the_rise():
    view = conditional_rows(planted_table())
    assert sorted(view["task"].unique()) == sorted(TASKS) and (view["gain"] == "conditional").all()
    row = view[(view.task == "perception") & (view.direction == "input") & (view.k == 4)].iloc[0]
    # checkpoint: 2.0 - 2.5; reference adds every block's gain to each; k=4 reverts blocks 0-3
    assert row.nll_checkpoint == pytest.approx(-0.5)
    assert row.nll_reference == pytest.approx(-0.5 + 0.4)
    assert row.nll == pytest.approx(-0.5 + 0.2)
    assert row.share == pytest.approx(0.5)   # half of the rise in source use is left
    assert conditional_rows(view) is view    # already in this view


def test_the_view_refuses_a_table_without_its_controls():
    with pytest.raises(CogprobeError, match="no 'perception-shuffled' rows.*sweep with the controls"):
        conditional_rows(revert_table(TRUE))
    partial = planted_table()
    partial = partial[~((partial.task == "production-shuffled") & (partial.k == 7))]
    with pytest.raises(CogprobeError, match="without their 'production-shuffled' row"):
        conditional_rows(partial)


def test_curves_on_the_conditional_gain_find_the_source_dependent_blocks():
    table = planted_table()
    cond = select_curves(table, tau=0.8, gain="conditional")
    # remove 80% of each rise: perception's input end must revert through block 4, production's
    # output end all 12 (its source-dependent blocks are the first two)
    assert (cond.k_in, cond.k_out) == (5, 12) and cond.params["gain"] == "conditional"
    keep = select_curves(table, tau=0.8, gain="conditional", criterion="keep")
    assert (keep.k_in, keep.k_out) == (5, 12)   # the first 5 keep perception's, the last 12 production's
    total = select_curves(table, tau=0.8)
    assert total.params["gain"] == "total" and (total.k_in, total.k_out) != (cond.k_in, cond.k_out)
    with pytest.raises(CogprobeError, match="unknown gain 'source'"):
        select_curves(table, gain="source")


def test_budget_on_the_conditional_gain_keeps_the_source_dependent_blocks():
    model = KeepOuterModel({**TRUE, **SHUFFLED})
    cond = select_budget(model, 12, tau=0.8, gain="conditional")
    assert cond.layers == [0, 1, 2, 3, 4] and cond.params["gain"] == "conditional"
    total = select_budget(KeepOuterModel({**TRUE, **SHUFFLED}), 12, tau=0.8)
    assert total.layers != cond.layers
    with pytest.raises(CogprobeError, match="no 'perception-shuffled' rows"):
        select_budget(KeepOuterModel(TRUE), 12, gain="conditional")


def test_no_rise_in_source_use_is_an_error_naming_the_quantity():
    flat = pd.concat([revert_table(TRUE), revert_table({c: TRUE[t] for c, t in CONTROLS.items()})])
    with pytest.raises(CogprobeError, match="on the conditional gain.*did not improve"):
        select_curves(flat, gain="conditional")


def test_on_a_real_sweep_the_view_pairs_every_example_with_its_control():
    tok = tiny_tokenizer()
    ex = {t: build_examples(tok, TOY_CORPUS, t) for t in (*TASKS, *CONTROLS)}
    ref = tiny_model("llama")
    ck = train_blocks(ref, {t: ex[t] for t in TASKS}, {0, LAYERS - 1})
    table = sweep([(0, ref), (1, ck)], ex, mode="revert")
    view = conditional_rows(table)
    assert len(view) == len(table) // 2
    keys = ["checkpoint_step", "direction", "k"]
    true = table[table.task == "production"].set_index(keys)
    shuffled = table[table.task == "production-shuffled"].set_index(keys)
    mine = view[view.task == "production"].set_index(keys)
    assert np.allclose(mine["nll"], (true["nll"] - shuffled.loc[true.index, "nll"]).loc[mine.index])
    for _, row in view.iterrows():   # the per-example differences sum to the row's value
        tokens = np.asarray(row.example_tokens, float)
        assert np.sum(row.example_nll) / tokens.sum() == pytest.approx(row.nll, abs=1e-9)
        assert np.sum(row.reference_example_nll) / tokens.sum() == pytest.approx(row.nll_reference, abs=1e-9)
    # training on the true pairs raised the source use; resampled in this view, a true example and its
    # control move together, so the curves rule's stability runs on it
    last = view[view.checkpoint_step == 1]
    assert (last.nll_checkpoint < last.nll_reference).all()
    sel = select_curves(last, tau=0.5, gain="conditional")
    stab = stability(curves_decider(0.5, gain="conditional"), last.reset_index(drop=True), (sel.k_in, sel.k_out),
                     n_resamples=20)
    assert stab["n_resamples"] == 20 and stab["p_no_set"] < 1


def test_select_run_scores_the_controls_it_needs(trained_run, tmp_path):
    """Through the folder verb: the budget rule scores each task's control itself, and the curves rule
    asks for a sweep with the controls. (This 4-step random run does not raise its source use, so the
    rules end in the error that says so, about the conditional gain.)"""
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import sweep_run
    from cogprobe.selection.folders import select_run
    run, evalset = trained_run["run"], EvalSet.for_run(trained_run["run"], n=3, max_sentence_tokens=32)
    quiet = dict(evalset=evalset, out=tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(CogprobeError, match=r"budget on the conditional gain.*did not improve"):
        select_run(run, rule="budget", gain="conditional", **quiet)
    sweep_run(run, evalset=evalset, out=tmp_path, batch_size=2, log=lambda _: None)
    with pytest.raises(CogprobeError, match="no 'perception-shuffled' rows"):
        select_run(run, rule="curves", gain="conditional", **quiet)
    sweep_run(run, evalset=evalset, out=tmp_path, batch_size=2, log=lambda _: None, overwrite=True,
              tasks=(*TASKS, *CONTROLS))
    with pytest.raises(CogprobeError, match=r"curves at step 4 on the conditional gain.*did not improve"):
        select_run(run, rule="curves", gain="conditional", **quiet)


def test_the_figures_draw_the_conditional_share_beside_the_total():
    from cogprobe.plots import runs, sweeps
    tok = tiny_tokenizer()
    ex = {t: build_examples(tok, TOY_CORPUS, t) for t in (*TASKS, *CONTROLS)}
    ref = tiny_model("llama")
    table = sweep([(0, ref), (1, train_blocks(ref, {t: ex[t] for t in TASKS}, {0, LAYERS - 1}))], ex, mode="revert")
    names = [name for name, _ in runs.figures_for({"sweeps.parquet": table})]
    assert {"specialization_curves_revert_conditional_share", "specialization_heatmap_revert_conditional_share",
            "specialization_curves_revert_share"} <= set(names)
    fig = sweeps.specialization_curves(table, gain="conditional")
    assert "rise in source use retained" in fig._suptitle.get_text()
    shown = [ax for ax in fig.axes if ax.get_lines()]
    assert len(shown) == 4 and all(ax.get_ylabel() == "share of rise in source use retained" for ax in shown[:1])
    heat = sweeps.specialization_heatmaps(table, gain="conditional")
    assert "rise in source use" in heat._suptitle.get_text()
    with pytest.raises(CogprobeError, match="not a sweep score of the conditional gain"):
        sweeps.specialization_curves(table, y="nll", gain="conditional")
    # a configuration without its control is left out of a figure (a rule refuses it)
    partial = table[~((table.task == "perception-shuffled") & (table.k == 2))]
    drawn = sweeps.gain_rows(partial, "revert", None, "conditional")
    assert not ((drawn.task == "perception") & (drawn.k == 2)).any() and ((drawn.task == "production") & (drawn.k == 2)).any()


def test_the_report_locates_the_source_dependent_part_beside_the_total():
    from cogprobe.study.report import conditional_findings
    planted = planted_table()
    text = conditional_findings(planted, "perception", 10)
    # checkpoint 2.5 - 2.0; the base adds 0.99 to both and the source-dependent 0.4 to the true NLL only:
    # 0.1; at k = 1 and 4 (a tenth and a third of 12 blocks), reverting blocks 0-3 leaves half of the rise
    assert text.startswith("Perception, the source-dependent part (conditional gain 0.100 -> 0.500 nats/token)")
    assert "with k = 4 blocks reverted, 50% of the rise in source use remains (input end)" in text
    flat = pd.concat([revert_table(TRUE), revert_table({c: TRUE[t] for c, t in CONTROLS.items()})])
    assert "did not raise the use of the source" in conditional_findings(flat, "production", 10)
    assert conditional_findings(revert_table(TRUE), "production", 10) == ""   # no controls swept


def test_controls_at_a_few_ks_share_a_table_with_an_adaptive_sweep(trained_run, tmp_path):
    """The quick study's probe: an adaptive sweep of the tasks, then the controls at the k's the report
    reads (a plain sweep's rows, no k_grid). Run again (an interrupted study resumes), neither refuses
    the other's rows nor scores anything twice."""
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import sweep_run
    from cogprobe.probe.grid import adaptive_sweep_run
    from cogprobe.probe.options import SweepOptions
    run, evalset = trained_run["run"], EvalSet.for_run(trained_run["run"], n=3, max_sentence_tokens=32)
    quiet = dict(evalset=evalset, out=tmp_path, log=lambda _: None)
    for _ in range(2):
        adaptive_sweep_run(run, SweepOptions(tasks=TASKS), keep=[2], **quiet)
        table = sweep_run(run, SweepOptions(ks=(0, 2, 6), tasks=tuple(CONTROLS)), steps=[4], progress=False, **quiet)
    controls = table[table.task.isin(list(CONTROLS))]
    assert set(controls.k) == {0, 2, 6} and set(controls.checkpoint_step) == {4}
    assert not table.duplicated(["checkpoint_step", "task", "direction", "k"]).any()
    assert len(conditional_rows(table[table.checkpoint_step == 4], strict=False)) == len(controls)
