"""Figures from small synthetic tables: shapes of what is drawn, NaN handling, plot_run."""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from cogprobe.plots import runs, style, sweeps
from cogprobe.study import figures
from cogprobe.core.errors import CogprobeError
from cogprobe.core.io import write_parquet
from cogprobe.plots.style import MAX_LEGEND_STEPS
from helpers import L, REF_NLL, STEPS, synthetic_sweeps

def synthetic_acts(steps=STEPS, n=L, sites=("resid", "attn", "mlp"), task_free=False) -> pd.DataFrame:
    rows = []
    for step in steps:
        for layer in range(n):
            for task in ("perception", "production"):
                final = REF_NLL[task] - 2.0 * (1 - math.exp(-step / 40))
                rows.append(dict(checkpoint_step=step, block=layer, site="resid", stat="logit_lens_nll", task=task,
                                 value=final + 3.0 * (n - 1 - layer) / n))
            for site in sites:
                drift = (step / max(steps)) * (0.2 + 0.1 * layer)
                for task in (["all"] if task_free else ["perception", "production"]):
                    rows += [dict(checkpoint_step=step, block=layer, site=site, stat="drift_cos", task=task,
                                  value=drift),
                             dict(checkpoint_step=step, block=layer, site=site, stat="cka", task=task,
                                  value=math.exp(-drift)),
                             dict(checkpoint_step=step, block=layer, site=site, stat="norm", task=task,
                                  value=10 + layer)]
    return pd.DataFrame(rows)


def synthetic_log(n=120) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    step = np.arange(1, n + 1)
    lr = 3e-4 * np.minimum(step / 10, 1) * 0.5 * (1 + np.cos(np.pi * step / n))
    loss = 7 - 2.5 * (1 - np.exp(-step / 30)) + rng.normal(0, 0.15, n)
    return pd.DataFrame(dict(step=step, loss=loss, lr=lr, grad_norm=1.0, tokens=step * 512, seconds=2.0))


def synthetic_compare(seeds=1) -> pd.DataFrame:
    shares = {"full": (1.0, 1.0, 134.5e6), "lora": (0.9, 0.85, 2.4e6), "cogsym": (0.96, 0.98, 28.3e6),
              "cogsym-lora": (0.88, 0.86, 0.65e6), "middle": (0.7, 0.6, 28.3e6), "random": (0.8, 0.75, 28.3e6)}
    rows = []
    for seed in range(seeds):
        for s, (p, q, params) in shares.items():
            jit = 0.02 * seed
            rows.append(dict(row=s, blocks="", trainable_params=params, optimizer_bytes=8 * params,
                             sec_per_step=5.0, peak_mem_mb=4000.0, perception_nll=5.0, production_nll=4.0,
                             perception_share=p - jit, production_share=q + jit, chrf_perception=30.0,
                             chrf_production=25.0, chrf_perception_share=p - 0.05, chrf_production_share=q - 0.1))
    return pd.DataFrame(rows)


def data_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def heat_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.collections and ax.get_visible() and ax.get_label() != "<colorbar>"]


# ------------------------------------------------------------------ sweeps

def test_curves_gain_one_line_per_improved_checkpoint():
    fig = sweeps.specialization_curves(synthetic_sweeps())
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    for ax in fig.axes:
        lines = data_lines(ax)
        assert [ln.get_label() for ln in lines] == [f"step {s}" for s in STEPS[1:]]   # step 0 has no gain
        assert all(len(ln.get_xdata()) == L + 1 for ln in lines)
        assert [float(ln.get_ydata()[0]) for ln in lines] == pytest.approx([1.0] * len(lines))   # k = 0 keeps all
    assert len(fig.legends) == 1


def test_curves_nll_includes_reference_and_its_dashed_level():
    fig = sweeps.specialization_curves(synthetic_sweeps(), y="nll")
    ax = fig.axes[0]   # perception, input end
    assert len(data_lines(ax)) == len(STEPS)
    ref = [ln for ln in ax.get_lines() if ln.get_label() == "_reference"]
    assert ref and ref[0].get_ydata()[0] == pytest.approx(REF_NLL["perception"])


def test_curves_leave_gaps_at_nan():
    sw = synthetic_sweeps()
    sw.loc[(sw["checkpoint_step"] == 40) & (sw["k"] == 3), "share"] = float("nan")
    fig = sweeps.specialization_curves(sw)
    line = next(ln for ln in data_lines(fig.axes[0]) if ln.get_label() == "step 40")
    assert np.isnan(line.get_ydata()[3]) and np.isfinite(line.get_ydata()[4])


def test_curves_panel_without_gain_says_so():
    sw = synthetic_sweeps()
    sw.loc[sw["task"] == "production", "share"] = float("nan")
    fig = sweeps.specialization_curves(sw)
    production = [ax for ax in fig.axes if ax.get_title().startswith("production")]
    assert all(not data_lines(ax) and "no gain" in ax.texts[0].get_text() for ax in production)
    assert all(len(data_lines(ax)) == len(STEPS) - 1 for ax in fig.axes if ax not in production)
    fig.savefig(__import__("io").BytesIO(), format="png", dpi=30)   # shared axes still lay out


def test_curves_keep_tiny_gains_from_flattening_the_chart():
    sw = synthetic_sweeps()
    sw.loc[(sw["checkpoint_step"] == 20) & (sw["k"] == 2), "share"] = 50.0   # gain ~ 0: noise
    fig = sweeps.specialization_curves(sw)
    assert all(ax.get_ylim()[1] <= 2.1 for ax in fig.axes)
    assert "run off the chart" in fig.axes[0].texts[0].get_text()


def test_curves_many_checkpoints_get_a_colorbar():
    steps = tuple(range(0, 10 * (MAX_LEGEND_STEPS + 3), 10))
    fig = sweeps.specialization_curves(synthetic_sweeps(steps=steps))
    assert len(fig.axes) == 5 and not fig.legends   # 4 panels + the step colourbar


def test_curves_ignore_other_modes_and_keep_the_latest_duplicate():
    sw = synthetic_sweeps()
    keep_outer = sw.head(3).assign(mode="keep-outer", direction="both", k_in=1, k_out=1)
    rerun = sw[sw["checkpoint_step"] == 80].assign(nll=1.0)
    fig = sweeps.specialization_curves(pd.concat([sw, keep_outer, rerun]), y="nll")
    assert len(fig.axes) == 4
    last = next(ln for ln in data_lines(fig.axes[0]) if ln.get_label() == "step 80")
    assert set(last.get_ydata()) == {1.0}


def test_ends_default_to_blocks_only_and_can_be_chosen():
    plain, ends = synthetic_sweeps(), synthetic_sweeps().assign(ends=True, nll=1.0)
    both = pd.concat([plain, ends])
    fig = sweeps.specialization_curves(both, y="nll")
    assert 1.0 not in data_lines(fig.axes[0])[1].get_ydata() and "embeddings" not in fig.get_suptitle()
    fig = sweeps.specialization_curves(both, y="nll", ends=True)
    assert set(data_lines(fig.axes[0])[1].get_ydata()) == {1.0} and "embeddings" in fig.get_suptitle()


def test_heatmaps_grid_shapes_and_shared_colorbar():
    fig = sweeps.specialization_heatmaps(synthetic_sweeps())
    heats = heat_axes(fig)
    assert len(heats) == 4 and len(fig.axes) == 5
    for ax in heats:
        assert ax.collections[0].get_array().shape == (len(STEPS) - 1, L + 1)   # step 0 row dropped
    assert heats[0].collections[0].norm.vmin == 0.0 and heats[0].collections[0].norm.vmax == 1.0


def test_heatmap_nll_is_centred_on_the_reference_and_masks_nan():
    sw = synthetic_sweeps()
    sw.loc[(sw["checkpoint_step"] == 20) & (sw["k"] == 2), "nll"] = float("nan")
    fig = sweeps.specialization_heatmaps(sw, value="nll")
    mesh = heat_axes(fig)[0].collections[0]
    assert mesh.get_array().shape == (len(STEPS), L + 1)
    assert mesh.norm.vmin == pytest.approx(-mesh.norm.vmax)
    assert np.ma.count_masked(mesh.get_array()) == 1
    assert float(mesh.get_array()[0].max()) == pytest.approx(0.0)   # step 0 reverted = step 0


def test_sweep_errors_name_the_fix():
    sw = synthetic_sweeps()
    with pytest.raises(CogprobeError, match="--mode skip"):
        sweeps.specialization_curves(sw, mode="skip")
    with pytest.raises(CogprobeError, match="lacks column"):
        sweeps.specialization_heatmaps(sw.drop(columns="nll"))
    with pytest.raises(CogprobeError, match="share or nll"):
        sweeps.specialization_heatmaps(sw, value="loss")


def test_a_real_sweep_table_plots():
    """The table `cogprobe.sweep.sweep` writes (object k_in/k_out, str dtypes) draws as is."""
    import copy

    import torch

    from cogprobe.data.corpora import Corpus
    from cogprobe.probe.sweep import sweep
    from cogprobe.data.tasks import TASKS, build_examples
    from tiny import tiny_model, tiny_tokenizer

    pairs = pd.DataFrame({"pivot": ["la casa es grande", "el agua está fría"],
                          "target": ["in calli huei", "in atl itztic"], "document": ["", ""]})
    ex = {t: build_examples(tiny_tokenizer(), Corpus("toy", pairs, "Spanish", "Nahuatl"), t) for t in TASKS}
    ref = tiny_model("llama")
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(1.01)
    table = sweep([(0, ref), (10, moved)], ex, batch_size=2)
    fig = sweeps.specialization_heatmaps(table, value="nll")
    assert len(heat_axes(fig)) == 4
    assert heat_axes(fig)[0].collections[0].get_array().shape[0] == 2


# ------------------------------------------------------------------ activations

def test_logit_lens_one_panel_per_task():
    fig = runs.logit_lens_heatmap(synthetic_acts())
    heats = heat_axes(fig)
    assert [ax.get_title() for ax in heats] == ["perception", "production"]
    assert all(ax.collections[0].get_array().shape == (len(STEPS), L) for ax in heats)
    assert len(fig.axes) == 3   # two heatmaps, one shared colourbar


@pytest.mark.parametrize("task_free", [False, True])
def test_drift_panels_per_site_and_task(task_free):
    acts = synthetic_acts(task_free=task_free)
    fig = runs.drift_heatmap(acts, "cka")
    expected = 3 if task_free else 6
    assert len(heat_axes(fig)) == expected
    if task_free:
        assert heat_axes(fig)[0].get_title() == "all tasks · resid"
    one = runs.drift_heatmap(acts, "drift_cos", site="mlp")
    assert len(heat_axes(one)) == (1 if task_free else 2)


def test_drift_task_may_be_missing():
    acts = synthetic_acts(sites=("resid",), task_free=True)
    acts.loc[acts["stat"] != "logit_lens_nll", "task"] = None
    assert len(heat_axes(runs.drift_heatmap(acts))) == 1


def test_activation_errors():
    with pytest.raises(CogprobeError, match="drift statistic"):
        runs.drift_heatmap(synthetic_acts(), "logit_lens_nll")
    with pytest.raises(CogprobeError, match="no 'drift_cos' rows at site 'attn'"):
        runs.drift_heatmap(synthetic_acts(sites=("resid",)), site="attn")


# ------------------------------------------------------------------ training, comparison

def test_training_curve():
    fig = runs.training_curve(synthetic_log())
    assert len(fig.axes) == 2
    assert len(data_lines(fig.axes[0])) == 2 and len(fig.axes[1].get_lines()) == 1
    assert "120 steps" in fig.get_suptitle() and "61k tokens" in fig.get_suptitle()


def test_comparison_bars_lines_and_param_labels():
    cmp = synthetic_compare()
    fig = figures.comparison_bars(cmp)
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    assert sum(len(c) for c in ax.containers) == 2 * len(cmp)
    levels = {round(float(ln.get_ydata()[0]), 3) for ln in ax.get_lines()}
    assert {1.0, 0.97} <= levels
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "full\n134.5M" and "cogsym\n28.3M" in labels
    heights = [b.get_height() for b in ax.containers[0]]
    assert heights[labels.index("cogsym\n28.3M")] == pytest.approx(0.96)


def test_comparison_bars_average_seeds_with_error_bars():
    fig = figures.comparison_bars(synthetic_compare(seeds=3), metric="chrf")
    ax = fig.axes[0]
    assert sum(len(c) for c in ax.containers) == 2 * 6     # one bar per row and task
    assert len(ax.get_lines()) > 3                           # error bars beyond the three level lines


def synthetic_rows() -> pd.DataFrame:
    """figures/evidence_rows.csv's shape: shares of full's gain for two languages and every row kind."""
    rows = []
    for language in ("nahuatl", "otomi"):
        for row, share in [("full", 1.0), ("cogsym", 0.9), ("middle", 0.7), ("bottom", 0.6), ("top", 0.8),
                           ("random-1", 0.5), ("random-2", 0.65), ("random-3", 0.75), ("budget", 0.95)]:
            for task in ("perception", "production"):
                rows += [dict(language=language, row=row, other="full", task=task, quantity=q, estimate=v,
                              low=v - 0.05, high=v + 0.05) for q, v in (("share", share), ("nll", 3.0))]
    return pd.DataFrame(rows)


def test_same_size_shares_one_dot_per_set_and_draw():
    fig = figures.same_size_shares(synthetic_rows())
    assert len(fig.axes) == 4                                   # 2 languages x 2 tasks
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["cogsym", "middle", "bottom", "top", "random\n(3 draws\nper seed)"]
    dots = sorted(float(c.lines[0].get_ydata()[0]) for c in ax.containers)
    assert dots == pytest.approx([0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9])   # full, budget and nll rows left out
    assert 0.9 in {round(float(ln.get_ydata()[0]), 3) for ln in ax.get_lines()}   # CogSym's level drawn across


def test_same_size_shares_needs_a_same_size_row():
    rows = synthetic_rows()
    with pytest.raises(CogprobeError, match="CogSym-sized row"):
        figures.same_size_shares(rows[rows["row"].isin(["full", "budget"])])


# ------------------------------------------------------------------ run folders

def test_plot_run_writes_every_figure(tmp_path):
    write_parquet(tmp_path / "sweeps.parquet", pd.concat([synthetic_sweeps(), synthetic_sweeps(mode="skip")]))
    write_parquet(tmp_path / "activations.parquet", synthetic_acts())
    write_parquet(tmp_path / "train_log.parquet", synthetic_log())
    write_parquet(tmp_path / "compare.parquet", synthetic_compare())
    paths = figures.plot_run(tmp_path, dpi=40)   # low resolution: this test checks files, not looks
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "specialization_curves_revert_share.png", "specialization_heatmap_revert_share.png",
        "specialization_curves_revert_nll.png", "specialization_heatmap_revert_nll.png",
        "specialization_curves_skip_nll.png", "specialization_heatmap_skip_nll.png",
        "logit_lens.png", "drift_cos_heatmap.png", "cka_heatmap.png", "norm_heatmap.png",
        "training_curve.png", "comparison_nll.png", "comparison_chrf.png"])
    for p in paths:
        assert p.parent == tmp_path / "figures"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5_000
    assert not list((tmp_path / "figures").glob(".tmp-*"))


def test_plot_run_skips_missing_tables(tmp_path):
    write_parquet(tmp_path / "train_log.parquet", synthetic_log())
    assert [p.name for p in figures.plot_run(tmp_path)] == ["training_curve.png"]


def test_plot_run_needs_a_table(tmp_path):
    with pytest.raises(CogprobeError, match="no tables to plot in .*cogprobe sweep"):
        figures.plot_run(tmp_path)
    with pytest.raises(CogprobeError, match="no run folder"):
        figures.plot_run(tmp_path / "missing")


def test_no_global_state(tmp_path):
    import matplotlib.pyplot as plt
    before = dict(matplotlib.rcParams)
    style.save(figures.comparison_bars(synthetic_compare()), tmp_path / "bars.png")
    sweeps.specialization_heatmaps(synthetic_sweeps())
    assert plt.get_fignums() == []
    assert dict(matplotlib.rcParams) == before


def test_figures_display_inline_in_a_notebook():
    """A pyplot-free Figure shows in a notebook as the text `<Figure size ... with 5 Axes>`: IPython's
    inline backend registers its PNG formatter only once pyplot is imported. cogprobe's figures render
    themselves (`_repr_png_`), which IPython's display uses whatever the backend."""
    from IPython.core.formatters import DisplayFormatter
    for fig in (sweeps.specialization_heatmaps(synthetic_sweeps()), figures.comparison_bars(synthetic_compare()),
                runs.training_curve(synthetic_log())):
        data, _ = DisplayFormatter().format(fig)
        assert data["image/png"].startswith(b"\x89PNG"), type(fig)
