"""Sweep figures: specialization curves and heatmaps, and the use of the source per k.

Drawn from `sweeps.parquet` only; style and helpers in `plot_style`.
"""
from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cogprobe.core.errors import CogprobeError
from cogprobe.core.intervals import sweep_intervals
from cogprobe.plots.style import (DIRECTION_ORDER, MAX_LEGEND_STEPS, NAN_GREY, SWEEP_COLUMNS, TASK_ORDER, empty_panel, panel_grid,
                                 heat, nan_note, ordered, require, step_colors, styled)
from cogprobe.data.tasks import CONTROLS, TASKS, with_conditional_gain
from cogprobe.probe.conditional import GAINS, conditional_rows
from cogprobe.probe.options import SweepOptions
from cogprobe.selection.options import SelectOptions

# what a share is of: the total gain, or the rise in conditional gain (`probe.conditional`)
OF = {"total": "gain", "conditional": "rise in source use"}


# ------------------------------------------------------------------ sweeps

def sweep_rows(sweeps: pd.DataFrame, mode: str, ends: bool | None, controls: bool = False) -> pd.DataFrame:
    """The rows of one mode (and one `ends` setting), the latest row per configuration; the
    shuffled-source control tasks only if `controls`.

    A run folder's table may hold sweeps with and without the ends ablated; unless
    asked, the default (`ends=False`) is drawn. Rows repeated by a rerun are drawn
    once, from the latest.
    """
    require(sweeps, SWEEP_COLUMNS, "sweeps", "write it with `cogprobe sweep RUN`")
    if mode == "keep-outer":
        raise CogprobeError("keep-outer rows have (k_in, k_out) pairs, not one k; plot mode revert or skip")
    df = sweeps[(sweeps["mode"] == mode) & (controls | ~sweeps["task"].isin(list(CONTROLS)))]
    if df.empty:
        raise CogprobeError(f"the sweeps table has no {mode!r} rows; run `cogprobe sweep RUN --mode {mode}`")
    if "ends" in df.columns:
        flags = set(df["ends"].fillna(False).astype(bool))
        want = (False if False in flags else True) if ends is None else ends
        df = df[df["ends"].fillna(False).astype(bool) == want]
        if df.empty:
            raise CogprobeError(f"the sweeps table has no {mode!r} rows with ends={ends}; sweep with that setting")
    return df.drop_duplicates(["checkpoint_step", "task", "direction", "k"], keep="last")


def gain_rows(sweeps: pd.DataFrame, mode: str, ends: bool | None, gain: str) -> pd.DataFrame:
    """`sweep_rows` of the tasks, or (`gain="conditional"`) their conditional-gain view, whose share is
    of the rise in source use over step 0."""
    if gain not in GAINS:
        raise CogprobeError(f"unknown gain {gain!r}; use {' or '.join(GAINS)}")
    if gain == "total":
        return sweep_rows(sweeps, mode, ends)
    return conditional_rows(sweep_rows(sweeps, mode, ends, controls=True), strict=False)


def _grid_note(df: pd.DataFrame) -> str:
    """What the points of an adaptive grid are (`probe.grid`): the lines join scored k's, nothing between."""
    if "k_grid" not in df.columns or df["k_grid"].isna().all():
        return ""
    return ("\n(adaptive k grid: points are the k's scored, open where refinement added them; "
            "lines join scored points)")


def _ends_note(df: pd.DataFrame) -> str:
    ends = "ends" in df.columns and bool(df["ends"].fillna(False).astype(bool).any())
    return "\n(k ≥ 1 also reverts the embeddings at the input end, the final norm + head at the output end)" \
        if ends else ""


def _k_label(mode: str, direction: str) -> str:
    verb = "reverted to step 0" if mode == "revert" else "skipped"
    end = {"input": "from the input end: blocks [0, k)", "output": "from the output end: blocks [L−k, L)"}
    return f"k = blocks {verb}\n{end.get(direction, direction)}"


@styled
def specialization_curves(sweeps: pd.DataFrame, mode: str = SweepOptions.mode, y: str = "share",
                          ends: bool | None = None, gain: str = SelectOptions.gain) -> Figure:
    """Score against k, one line per checkpoint; rows = task, columns = direction.

    `y="share"`: share of the checkpoint's gain over step 0 that survives
    ablating k blocks (the reference step, whose gain is undefined, is left out);
    `y="nll"`: the task NLL in nats/token, with the reference NLL dashed. NaN
    values leave gaps in the lines. `gain="conditional"` (share only): the share of the rise in
    conditional gain, the part of the gain that uses the source (needs the controls swept).
    """
    if y not in ("share", "nll") or (gain == "conditional" and y != "share"):
        raise CogprobeError(f"y={y!r} is not a sweep score of the {gain} gain; use share"
                            + (" or nll" if gain == "total" else " (conditional_gain_curves draws its value)"))
    df = gain_rows(sweeps, mode, ends, gain)
    tasks = ordered(df["task"], TASK_ORDER)
    dirs = ordered(df["direction"], DIRECTION_ORDER)
    if y == "share":
        keep = df.groupby("checkpoint_step")["share"].transform(lambda v: v.notna().any())
        df = sweep_intervals(df[keep])  # bands where the table has per-example scores
    steps = sorted(df["checkpoint_step"].unique())
    colors = step_colors(steps)
    fig, axes = panel_grid(len(tasks), len(dirs), w=4.2, h=3.0, sharex=True, sharey=(y == "share") or "row")
    for (i, task), (j, d) in ((a, b) for a in enumerate(tasks) for b in enumerate(dirs)):
        ax = axes[i, j]
        _curve_panel(ax, df[(df["task"] == task) & (df["direction"] == d)], y, colors)
        ax.set_title(f"{task} · {d} end")
        ax.set_xlabel(_k_label(mode, d) if i == len(tasks) - 1 else "")
        ax.set_ylabel(f"share of {OF[gain]} retained" if y == "share" else "NLL (nats/token)")
    step_key(fig, axes, colors)
    what = f"{OF[gain]} retained" if y == "share" else "task NLL"
    verb = "reverted" if mode == "revert" else "skipped"
    band = "\n(bands: 95% bootstrap intervals over the pairs)" if "share_low" in df.columns and \
        df["share_low"].notna().any() else ""
    fig.suptitle(f"Specialization curves ({mode}): {what} with k blocks {verb}{band}{_grid_note(df)}"
                 f"{_ends_note(df)}")
    return fig


def _curve_panel(ax, df: pd.DataFrame, y: str, colors: dict) -> None:
    if df.empty or df[y].isna().all():
        empty_panel(ax, "no checkpoint improved on step 0:\nno gain to retain" if y == "share" else "no data",
               clear=False)
        return
    for step, g in df.groupby("checkpoint_step"):
        g = g.sort_values("k")
        ax.plot(g["k"], g[y], color=colors[step], marker="o", markersize=3, lw=1.5, label=f"step {step}")
        if "k_grid" in g.columns and (refined := g[g["k_grid"] == "refined"]).size:
            ax.plot(refined["k"], refined[y], ls="none", marker="o", markersize=4, color=colors[step],
                    markerfacecolor="white", label="_refined")
        if f"{y}_low" in g.columns and g[f"{y}_low"].notna().any():
            ax.fill_between(g["k"], g[f"{y}_low"], g[f"{y}_high"], color=colors[step], alpha=0.15, lw=0)
    if y == "share":
        ax.axhline(1.0, color="0.3", ls="--", lw=1, label="_checkpoint")
        ax.axhline(0.0, color="0.6", ls=":", lw=1, label="_reference")
        bands = [df[c] for c in (f"{y}_low", f"{y}_high") if c in df.columns]
        _clip_shares(ax, pd.concat([df[y], *bands]))
    elif y == "conditional_gain":
        ax.axhline(0.0, color="0.6", ls=":", lw=1, label="_no use of the source")
    else:
        ax.axhline(float(df["nll_reference"].mean()), color="0.3", ls="--", lw=1, label="_reference")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _clip_shares(ax, values: pd.Series, lo: float = -1.0, hi: float = 2.0) -> None:
    """Keep the y-range on [lo, hi]: a share far outside [0, 1] means the checkpoint's
    gain was too small to divide by, and one such point would flatten every other line."""
    v = values.dropna()
    if v.empty or (v.min() >= lo and v.max() <= hi):
        return
    ax.set_ylim(max(lo, min(-0.1, v.min())) - 0.05, min(hi, max(1.1, v.max())) + 0.05)
    ax.text(0.99, 0.02, f"values or bands outside [{lo:g}, {hi:g}] run off the chart", transform=ax.transAxes,
            ha="right", va="bottom", fontsize="x-small", color="0.35")


def step_key(fig: Figure, axes: np.ndarray, colors: dict) -> None:
    """A legend of checkpoint steps, or a colourbar when there are many."""
    steps = list(colors)
    if not steps:
        return
    if len(steps) <= MAX_LEGEND_STEPS:
        handles = [h for h in axes.flat[0].get_lines() if not h.get_label().startswith("_")]
        for ax in axes.flat:   # the first panel may be empty; take the fullest one
            lines = [h for h in ax.get_lines() if not h.get_label().startswith("_")]
            handles = lines if len(lines) > len(handles) else handles
        fig.legend(handles=handles, title="checkpoint", loc="outside right upper", fontsize="small")
        return
    cmap = mcolors.ListedColormap([colors[s] for s in steps])
    norm = mcolors.BoundaryNorm(np.arange(len(steps) + 1) - 0.5, len(steps))
    cb = fig.colorbar(ScalarMappable(norm, cmap), ax=axes.ravel().tolist(), label="checkpoint step", aspect=40)
    ticks = list(range(0, len(steps), -(-len(steps) // 12)))   # at most 12 labels, evenly by rank
    cb.set_ticks(ticks, labels=[str(steps[t]) for t in ticks])
    cb.minorticks_off()


@styled
def conditional_gain_curves(sweeps: pd.DataFrame, mode: str = SweepOptions.mode, ends: bool | None = None) -> Figure:
    """Conditional gain (NLL with shuffled sources - NLL with the true ones) against k, one line per
    checkpoint; rows = task, columns = direction. How much of the model's use of the source survives
    ablating k blocks; needs a sweep of the `-shuffled` control tasks."""
    df = with_conditional_gain(sweep_rows(sweeps, mode, ends, controls=True), ("checkpoint_step", "direction", "k"))
    df = df[df["task"].isin(TASKS)]
    if df["conditional_gain"].isna().all():
        raise CogprobeError("the sweeps table has no shuffled-source controls; sweep with --tasks "
                            + ",".join([*TASKS, *CONTROLS]))
    tasks, dirs = ordered(df["task"], TASK_ORDER), ordered(df["direction"], DIRECTION_ORDER)
    colors = step_colors(sorted(df["checkpoint_step"].unique()))
    fig, axes = panel_grid(len(tasks), len(dirs), w=4.2, h=3.0, sharex=True, sharey="row")
    for (i, task), (j, d) in ((a, b) for a in enumerate(tasks) for b in enumerate(dirs)):
        ax = axes[i, j]
        _curve_panel(ax, df[(df["task"] == task) & (df["direction"] == d)], "conditional_gain", colors)
        ax.set_title(f"{task} · {d} end")
        ax.set_xlabel(_k_label(mode, d) if i == len(tasks) - 1 else "")
        ax.set_ylabel("conditional gain (nats/token)")
    step_key(fig, axes, colors)
    fig.suptitle(f"Use of the source ({mode}): NLL(shuffled source) − NLL(true source) with k blocks "
                 f"{'reverted' if mode == 'revert' else 'skipped'}{_ends_note(df)}")
    return fig


@styled
def specialization_heatmaps(sweeps: pd.DataFrame, mode: str = SweepOptions.mode, value: str = "share",
                            ends: bool | None = None, gain: str = SelectOptions.gain) -> Figure:
    """A task × direction grid of checkpoint × k heatmaps with one shared colourbar.

    `value="share"`: viridis on [0, 1]; `value="nll"`: NLL − reference NLL
    (nats/token) on a diverging map centred at 0, so both tasks share one scale.
    `gain="conditional"` (share only): of the rise in conditional gain, as in `specialization_curves`.
    """
    if value not in ("share", "nll") or (gain == "conditional" and value != "share"):
        raise CogprobeError(f"value={value!r} is not a sweep score of the {gain} gain; use share"
                            + (" or nll" if gain == "total" else ""))
    df = gain_rows(sweeps, mode, ends, gain).copy()
    if value == "nll":
        df["shown"] = df["nll"] - df["nll_reference"]
        lim = float(np.nanmax(np.abs(df["shown"]))) if df["shown"].notna().any() else 1.0
        lim = lim or 1.0
        cmap, vmin, vmax = "vlag", -lim, lim
        label = "NLL − step-0 NLL (nats/token)\n< 0: better than step 0"
        empty = "no data"
    else:
        df = sweep_intervals(df)  # per-example scores give each cell its interval
        df["shown"] = df["share"]
        df["resolved"] = (df["share_low"] > 0) & (df["share_high"] < 1)
        ref = df.groupby("checkpoint_step")["shown"].transform(lambda v: v.isna().all())
        if df["checkpoint_step"].nunique() > 1:   # step 0 has no gain: its row left out, unless it is all
            df = df[~(ref & (df["checkpoint_step"] == df["checkpoint_step"].min()))]
        cmap, vmin, vmax = "viridis", 0.0, 1.0
        label = f"share of the checkpoint's {OF[gain]} retained"
        empty = f"no checkpoint improved on step 0:\nno {OF[gain]} to retain"
    tasks = ordered(df["task"], TASK_ORDER)
    dirs = ordered(df["direction"], DIRECTION_ORDER)
    fig, axes = panel_grid(len(tasks), len(dirs), w=4.4, h=3.0)
    mesh, grids = None, []
    for (i, task), (j, d) in ((a, b) for a in enumerate(tasks) for b in enumerate(dirs)):
        ax = axes[i, j]
        grid = _every_k(df[(df["task"] == task) & (df["direction"] == d)].pivot(
            index="checkpoint_step", columns="k", values="shown"))
        mesh = heat(ax, grid, cmap, vmin, vmax, empty=empty) or mesh
        grids.append(grid)
        if "resolved" in df.columns and mesh is not None:
            _mark(ax, df[(df["task"] == task) & (df["direction"] == d)].pivot(
                index="checkpoint_step", columns="k", values="resolved").reindex_like(grid))
        ax.set_title(f"{task} · {d} end")
        ax.set_xlabel(_k_label(mode, d) if i == len(tasks) - 1 else "")
        ax.set_ylabel("checkpoint step" if j == 0 else "")
    if mesh is not None:
        shown = df["shown"].dropna()
        extend = "neither" if value == "nll" or shown.empty else (
            {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
            [(bool((shown < vmin - 1e-6).any()), bool((shown > vmax + 1e-6).any()))])
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label=label, extend=extend, shrink=0.8)
    cells = pd.Series([v for g in grids for v in g.to_numpy(float).ravel()], dtype=float)
    nan_note(fig, cells, "undefined (the checkpoint did not improve on step 0) or not scored (a k the grid "
                         "left out)")
    dots = "resolved" in df.columns and bool(df["resolved"].any())
    note = "\n(dot: the cell's 95% interval excludes both 0 and 1)" if dots else ""
    what = f"{OF[gain]} retained" if value == "share" else "NLL change"
    fig.suptitle(f"Where the adaptation lives ({mode}): {what} by checkpoint and k{note}{_ends_note(df)}")
    return fig


def _every_k(grid: pd.DataFrame) -> pd.DataFrame:
    """Every k from the smallest scored to the largest as a column: a k no checkpoint scored is a grey
    column, never a neighbour's colour stretched over it (an adaptive or a sparse grid)."""
    if grid.empty:
        return grid
    ks = [int(k) for k in grid.columns]
    return grid.reindex(columns=range(min(ks), max(ks) + 1))


def _mark(ax, flags: pd.DataFrame) -> None:
    """A dot on every cell whose flag is True (cells in the heatmap's row/column order)."""
    rows, cols = np.nonzero(flags.astype(float).to_numpy(na_value=0.0) > 0)   # a k not scored: no dot
    ax.scatter(cols + 0.5, rows + 0.5, s=4, c="white", edgecolors="0.2", linewidths=0.3, zorder=3)


