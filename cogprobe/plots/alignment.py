"""Figures of the alignment table (`alignment.parquet`): where the new language meets the pivot.

Drawn from the tables only, like every figure in `plots` (whose helpers and style
they share): block × checkpoint heatmaps, per-checkpoint curves over depth with
their 95% bands, and the last checkpoint's alignment on the same block axis as its
perception and production specialization curves.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cogprobe.probe.alignment import COLUMNS, DIRECTIONS, MEASURES, PEAK_MEASURE
from cogprobe.core.errors import CogprobeError
from cogprobe.core.intervals import sweep_intervals
from cogprobe.plots.style import TASK_ORDER, panel_grid, heat, require, step_colors, styled
from cogprobe.plots.sweeps import step_key, sweep_rows

LABELS = {
    "retrieval_top1": "translation retrieval, top-1 accuracy",
    "retrieval_mrr": "translation retrieval, mean reciprocal rank",
    "paired_minus_unpaired_cos": "paired − unpaired cosine (centred)",
    "language_probe_acc": "language-identity probe accuracy (held out)",
}
ARROWS = {"target_to_pivot": "target → pivot", "pivot_to_target": "pivot → target", "both": ""}


def _rows(align: pd.DataFrame) -> pd.DataFrame:
    require(align, COLUMNS, "alignment", "write it with `cogprobe capture RUN`")
    return align


def _chance(measure: str, n: int) -> float | None:
    return {"retrieval_top1": 1 / n, "retrieval_mrr": float((1 / np.arange(1, n + 1)).sum() / n),
            "paired_minus_unpaired_cos": 0.0, "language_probe_acc": 0.5}.get(measure)


def _panels(df: pd.DataFrame, measures) -> list[tuple[str, str]]:
    have = set(zip(df["measure"], df["direction"]))
    return [(m, d) for m in measures for d in (*DIRECTIONS, "both") if (m, d) in have]


def _title(measure: str, direction: str) -> str:
    arrow = ARROWS.get(direction, direction)
    return LABELS.get(measure, measure) + (f"\n{arrow}" if arrow else "")


@styled
def alignment_heatmaps(align: pd.DataFrame) -> Figure:
    """Block × checkpoint heatmaps of retrieval top-1 (both directions) and paired − unpaired cosine."""
    df = _rows(align)
    panels = _panels(df, ("retrieval_top1", "paired_minus_unpaired_cos"))
    if not panels:
        raise CogprobeError("the alignment table has no retrieval or cosine rows; capture them with `cogprobe capture`")
    fig, axes = panel_grid(len(panels), 1, w=7.5, h=2.0 + 0.25 * df["checkpoint_step"].nunique())
    for ax, (measure, direction) in zip(axes[:, 0], panels):
        rows = df[(df["measure"] == measure) & (df["direction"] == direction)]
        grid = rows.pivot_table(index="checkpoint_step", columns="block", values="value", aggfunc="last")
        lo, cmap = (0.0, "viridis") if measure == "retrieval_top1" else (min(0.0, float(grid.min().min())), "mako")
        mesh = heat(ax, grid, cmap, lo, 1.0 if measure == "retrieval_top1" else float(grid.max().max()))
        ax.set_title(_title(measure, direction))
        ax.set(xlabel="block (mean-pooled output of block i)", ylabel="checkpoint step")
        if mesh is not None:
            fig.colorbar(mesh, ax=ax, shrink=0.9)
    fig.suptitle(f"Where the languages meet: {int(df['n_pairs'].iloc[0])} pairs, each sentence read alone")
    return fig


def _band(ax, rows: pd.DataFrame, color, label: str) -> None:
    rows = rows.sort_values("block")
    ax.plot(rows["block"], rows["value"], color=color, marker="o", markersize=2.5, lw=1.4, label=label)
    ax.fill_between(rows["block"], rows["low"], rows["high"], color=color, alpha=0.15, lw=0)


@styled
def alignment_curves(align: pd.DataFrame) -> Figure:
    """Every measure against depth, one line per checkpoint, with 95% bootstrap bands over pairs;
    the dotted line is chance."""
    df = _rows(align)
    panels = _panels(df, MEASURES)
    colors = step_colors(sorted(df["checkpoint_step"].unique()))
    ncols = 2
    fig, axes = panel_grid(-(-len(panels) // ncols), ncols, w=4.2, h=2.8, sharex=True)
    n = int(df["n_pairs"].iloc[0])
    for ax, (measure, direction) in zip(axes.ravel(), panels):
        rows = df[(df["measure"] == measure) & (df["direction"] == direction)]
        for step, g in rows.groupby("checkpoint_step"):
            _band(ax, g, colors[step], f"step {step}")
        chance = _chance(measure, n)
        if chance is not None:
            ax.axhline(chance, color="0.5", ls=":", lw=1)
        ax.set_title(_title(measure, direction), fontsize="small")
        ax.set_xlabel("block")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    step_key(fig, axes, colors)
    fig.suptitle(f"Cross-lingual alignment over depth ({n} pairs; bands: 95% bootstrap over pairs; dotted: chance)")
    return fig


@styled
def alignment_vs_specialization(align: pd.DataFrame, sweeps: pd.DataFrame, step: int | None = None) -> Figure:
    """At one checkpoint (default: the last in both tables), the alignment curve (retrieval MRR, both
    directions) above the perception and production revert curves, all on the block axis.

    A sweep's k becomes the block boundary it reverts up to: from the input end blocks [0, k) are
    reverted, so its point sits at x = k; from the output end blocks [L − k, L), at x = L − k."""
    df = _rows(align)
    sw = sweep_rows(sweeps, "revert", ends=None)
    common = sorted(set(df["checkpoint_step"]) & set(sw["checkpoint_step"]))
    step = common[-1] if step is None and common else step
    if step is None or step not in common:
        raise CogprobeError(f"no checkpoint is in both the alignment and the sweep tables (alignment: "
                            f"{sorted(set(df['checkpoint_step']))}; sweeps: {sorted(set(sw['checkpoint_step']))}); "
                            "capture and sweep the same run")
    n_blocks = int(df["block"].max()) + 1
    fig, axes = panel_grid(3, 1, w=7.0, h=2.3, sharex=True)
    ax = axes[0, 0]
    rows = df[(df["checkpoint_step"] == step) & (df["measure"] == PEAK_MEASURE)]
    for direction, color in zip(DIRECTIONS, ("C0", "C1")):
        _band(ax, rows[rows["direction"] == direction], color, ARROWS[direction])
    ax.axhline(_chance(PEAK_MEASURE, int(rows["n_pairs"].iloc[0])), color="0.5", ls=":", lw=1)
    ax.set(ylabel="retrieval MRR", title=f"step {step}: alignment of each block's output")
    ax.legend(fontsize="x-small")
    rows = sweep_intervals(sw[sw["checkpoint_step"] == step])
    for ax, task in zip(axes[1:, 0], TASK_ORDER):
        for direction, color in (("input", "C2"), ("output", "C3")):
            g = rows[(rows["task"] == task) & (rows["direction"] == direction)].sort_values("k")
            x = g["k"] if direction == "input" else n_blocks - g["k"]
            ax.plot(x, g["share"], color=color, marker="o", markersize=2.5, lw=1.4,
                    label=f"blocks reverted from the {direction} end up to x")
            if g["share_low"].notna().any():
                ax.fill_between(x, g["share_low"], g["share_high"], color=color, alpha=0.15, lw=0)
        ax.axhline(1.0, color="0.3", ls="--", lw=1)
        ax.axhline(0.0, color="0.6", ls=":", lw=1)
        ax.set(ylabel="share of gain\nretained", title=f"{task}: revert sweep")
        ax.legend(fontsize="x-small")
    axes[-1, 0].set_xlabel("block (alignment) · block boundary x (sweeps)")
    fig.suptitle(f"Alignment and specialization on one block axis (step {step}; bands: 95% bootstrap over pairs)")
    return fig


def figures(tables: dict[str, pd.DataFrame]):
    """(file stem, thunk) of each alignment figure the tables can feed (for `plots.plot_run`)."""
    import functools
    align = tables.get("alignment.parquet")
    if align is None or align.empty:
        return
    yield "alignment_heatmaps", functools.partial(alignment_heatmaps, align)
    yield "alignment_curves", functools.partial(alignment_curves, align)
    sw = tables.get("sweeps.parquet")
    if sw is not None and "mode" in sw.columns and (sw["mode"] == "revert").any() and \
            set(align["checkpoint_step"]) & set(sw["checkpoint_step"]):
        yield "alignment_vs_specialization", functools.partial(alignment_vs_specialization, align, sw)
