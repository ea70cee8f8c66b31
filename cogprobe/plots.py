"""Figures, drawn from the tidy tables only (never from models or live runs).

Every function takes a DataFrame and returns a `matplotlib.figure.Figure` built
without pyplot: no global figure registry, no backend switch, nothing leaks into
a notebook's state (a notebook still displays a returned Figure). Seaborn styles
are applied through context managers, so the caller's rcParams are untouched.

Colour choices (all colourblind-safe, perceptually uniform):
- checkpoints (a time order): `viridis`, light end cut off so lines stay visible;
- gain retained: `viridis` on the fixed range [0, 1] (0 = all of the checkpoint's
  gain lost, as at step 0; 1 = all kept); values outside saturate and the
  colourbar shows arrows;
- NLL in sweep heatmaps: the change from the reference (step 0) NLL, on the
  diverging `vlag` map centred at 0 (blue = better than step 0, red = worse).
  A difference lets one shared colourbar serve both tasks, whose reference NLLs
  differ; the raw NLL is in the curves;
- NLL elsewhere (logit lens): `viridis_r`, so lower (better) is brighter;
- tasks: the first two colours of seaborn's `colorblind` palette.
Grey cells are undefined values (NaN), e.g. gain retained by a checkpoint that did
not improve on step 0.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cogprobe import io
from cogprobe.errors import CogprobeError
from cogprobe.intervals import sweep_intervals
from cogprobe.io import atomic_path
from cogprobe.layout import ACTIVATIONS, ALIGNMENT, COMPARE, SCORES, SWEEPS, TRAIN_LOG
from cogprobe.tasks import CONTROLS, TASKS, with_conditional_gain
from cogprobe.verdicts import comparison_table

TASK_ORDER = ("perception", "production")
DIRECTION_ORDER = ("input", "output", "both")
STRATEGY_ORDER = ("full", "lora", "cogsym", "cogsym-lora", "budget", "middle", "bottom", "top", "random")
NAN_GREY = "0.85"
MAX_LEGEND_STEPS = 10     # more checkpoints than this get a colourbar instead of a legend
TASK_FREE = ("", "all")   # task values that mean "not task-specific"

SWEEP_COLUMNS = ("checkpoint_step", "task", "direction", "mode", "k", "nll", "nll_reference", "share")
ACT_COLUMNS = ("checkpoint_step", "block", "site", "stat", "task", "value")
STAT_LABELS = {   # colourbar labels: short, since a row of panels may be short; titles say more
    "drift_cos": "1 − cosine similarity to step 0",
    "cka": "linear CKA with step 0",
    "norm": "L2 norm per token",
    "logit_lens_nll": "NLL (nats/token)",
}
TABLES = (SWEEPS, ACTIVATIONS, TRAIN_LOG, COMPARE, SCORES, ALIGNMENT)


# ------------------------------------------------------------------ shared helpers

def _styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw inside seaborn's style contexts, leaving global rcParams as they were."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            return fn(*args, **kwargs)
    return wrapper


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write `fig` as a PNG atomically (a reader never sees half a file) and free it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        fig.clear()
    return path


def _require(df: pd.DataFrame, columns: Sequence[str], table: str, fix: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CogprobeError(f"the {table} table lacks column(s) {missing}; {fix}")
    if df.empty:
        raise CogprobeError(f"the {table} table has no rows; {fix}")


def _ordered(values, preferred: Sequence[str]) -> list:
    """Known names in their canonical order, then any others in order of appearance."""
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def _step_colors(steps: Sequence[int]) -> dict[int, tuple]:
    """One viridis colour per checkpoint by rank; the pale yellow end is left out."""
    cmap = colormaps["viridis"]
    n = max(len(steps) - 1, 1)
    return {s: cmap(0.85 * i / n) for i, s in enumerate(sorted(steps))}


def _empty(ax, text: str, *, clear: bool = True) -> None:
    """Say why a panel is blank; `clear=False` keeps ticks that shared axes need."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    if clear:
        ax.set_xticks([])
        ax.set_yticks([])


def _grid(nrows: int, ncols: int, *, w: float, h: float, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols + 1.5, h * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


# ------------------------------------------------------------------ sweeps

def _sweep_rows(sweeps: pd.DataFrame, mode: str, ends: bool | None, controls: bool = False) -> pd.DataFrame:
    """The rows of one mode (and one `ends` setting), the latest row per configuration; the
    shuffled-source control tasks only if `controls`.

    A run folder's table may hold sweeps with and without the ends ablated; unless
    asked, the default (`ends=False`) is drawn. Rows repeated by a rerun are drawn
    once, from the latest.
    """
    _require(sweeps, SWEEP_COLUMNS, "sweeps", "write it with `cogprobe sweep RUN`")
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


def _ends_note(df: pd.DataFrame) -> str:
    ends = "ends" in df.columns and bool(df["ends"].fillna(False).astype(bool).any())
    return "\n(k ≥ 1 also reverts the embeddings at the input end, the final norm + head at the output end)" \
        if ends else ""


def _k_label(mode: str, direction: str) -> str:
    verb = "reverted to step 0" if mode == "revert" else "skipped"
    end = {"input": "from the input end: blocks [0, k)", "output": "from the output end: blocks [L−k, L)"}
    return f"k = blocks {verb}\n{end.get(direction, direction)}"


@_styled
def specialization_curves(sweeps: pd.DataFrame, mode: str = "revert", y: str = "share",
                          ends: bool | None = None) -> Figure:
    """Score against k, one line per checkpoint; rows = task, columns = direction.

    `y="share"`: share of the checkpoint's gain over step 0 that survives
    ablating k blocks (the reference step, whose gain is undefined, is left out);
    `y="nll"`: the task NLL in nats/token, with the reference NLL dashed. NaN
    values leave gaps in the lines.
    """
    if y not in ("share", "nll"):
        raise CogprobeError(f"y={y!r} is not a sweep score; use share or nll")
    df = _sweep_rows(sweeps, mode, ends)
    tasks = _ordered(df["task"], TASK_ORDER)
    dirs = _ordered(df["direction"], DIRECTION_ORDER)
    if y == "share":
        keep = df.groupby("checkpoint_step")["share"].transform(lambda v: v.notna().any())
        df = sweep_intervals(df[keep])  # bands where the table has per-example scores
    steps = sorted(df["checkpoint_step"].unique())
    colors = _step_colors(steps)
    fig, axes = _grid(len(tasks), len(dirs), w=4.2, h=3.0, sharex=True, sharey=(y == "share") or "row")
    for (i, task), (j, d) in ((a, b) for a in enumerate(tasks) for b in enumerate(dirs)):
        ax = axes[i, j]
        _curve_panel(ax, df[(df["task"] == task) & (df["direction"] == d)], y, colors)
        ax.set_title(f"{task} · {d} end")
        ax.set_xlabel(_k_label(mode, d) if i == len(tasks) - 1 else "")
        ax.set_ylabel("share of gain retained" if y == "share" else "NLL (nats/token)")
    _step_key(fig, axes, colors)
    what = "gain retained" if y == "share" else "task NLL"
    verb = "reverted" if mode == "revert" else "skipped"
    band = "\n(bands: 95% bootstrap intervals over the pairs)" if "share_low" in df.columns and \
        df["share_low"].notna().any() else ""
    fig.suptitle(f"Specialization curves ({mode}): {what} with k blocks {verb}{band}{_ends_note(df)}")
    return fig


def _curve_panel(ax, df: pd.DataFrame, y: str, colors: dict) -> None:
    if df.empty or df[y].isna().all():
        _empty(ax, "no checkpoint improved on step 0:\nno gain to retain" if y == "share" else "no data",
               clear=False)
        return
    for step, g in df.groupby("checkpoint_step"):
        g = g.sort_values("k")
        ax.plot(g["k"], g[y], color=colors[step], marker="o", markersize=3, lw=1.5, label=f"step {step}")
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


def _step_key(fig: Figure, axes: np.ndarray, colors: dict) -> None:
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


@_styled
def conditional_gain_curves(sweeps: pd.DataFrame, mode: str = "revert", ends: bool | None = None) -> Figure:
    """Conditional gain (NLL with shuffled sources - NLL with the true ones) against k, one line per
    checkpoint; rows = task, columns = direction. How much of the model's use of the source survives
    ablating k blocks; needs a sweep of the `-shuffled` control tasks."""
    df = with_conditional_gain(_sweep_rows(sweeps, mode, ends, controls=True), ("checkpoint_step", "direction", "k"))
    df = df[df["task"].isin(TASKS)]
    if df["conditional_gain"].isna().all():
        raise CogprobeError("the sweeps table has no shuffled-source controls; sweep with --tasks "
                            + ",".join([*TASKS, *CONTROLS]))
    tasks, dirs = _ordered(df["task"], TASK_ORDER), _ordered(df["direction"], DIRECTION_ORDER)
    colors = _step_colors(sorted(df["checkpoint_step"].unique()))
    fig, axes = _grid(len(tasks), len(dirs), w=4.2, h=3.0, sharex=True, sharey="row")
    for (i, task), (j, d) in ((a, b) for a in enumerate(tasks) for b in enumerate(dirs)):
        ax = axes[i, j]
        _curve_panel(ax, df[(df["task"] == task) & (df["direction"] == d)], "conditional_gain", colors)
        ax.set_title(f"{task} · {d} end")
        ax.set_xlabel(_k_label(mode, d) if i == len(tasks) - 1 else "")
        ax.set_ylabel("conditional gain (nats/token)")
    _step_key(fig, axes, colors)
    fig.suptitle(f"Use of the source ({mode}): NLL(shuffled source) − NLL(true source) with k blocks "
                 f"{'reverted' if mode == 'revert' else 'skipped'}{_ends_note(df)}")
    return fig


@_styled
def specialization_heatmaps(sweeps: pd.DataFrame, mode: str = "revert", value: str = "share",
                            ends: bool | None = None) -> Figure:
    """A task × direction grid of checkpoint × k heatmaps with one shared colourbar.

    `value="share"`: viridis on [0, 1]; `value="nll"`: NLL − reference NLL
    (nats/token) on a diverging map centred at 0, so both tasks share one scale.
    """
    if value not in ("share", "nll"):
        raise CogprobeError(f"value={value!r} is not a sweep score; use share or nll")
    df = _sweep_rows(sweeps, mode, ends).copy()
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
        df = df[~(ref & (df["checkpoint_step"] == df["checkpoint_step"].min()))]   # step 0: no gain
        cmap, vmin, vmax = "viridis", 0.0, 1.0
        label = "share of the checkpoint's gain retained"
        empty = "no checkpoint improved on step 0:\nno gain to retain"
    tasks = _ordered(df["task"], TASK_ORDER)
    dirs = _ordered(df["direction"], DIRECTION_ORDER)
    fig, axes = _grid(len(tasks), len(dirs), w=4.4, h=3.0)
    mesh = None
    for (i, task), (j, d) in ((a, b) for a in enumerate(tasks) for b in enumerate(dirs)):
        ax = axes[i, j]
        grid = df[(df["task"] == task) & (df["direction"] == d)].pivot(
            index="checkpoint_step", columns="k", values="shown")
        mesh = _heat(ax, grid, cmap, vmin, vmax, empty=empty) or mesh
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
    _nan_note(fig, df["shown"], "undefined (the checkpoint did not improve on step 0) or not measured")
    dots = "resolved" in df.columns and bool(df["resolved"].any())
    note = "\n(dot: the cell's 95% interval excludes both 0 and 1)" if dots else ""
    what = "gain retained" if value == "share" else "NLL change"
    fig.suptitle(f"Where the adaptation lives ({mode}): {what} by checkpoint and k{note}{_ends_note(df)}")
    return fig


def _heat(ax, grid: pd.DataFrame, cmap: str, vmin: float, vmax: float, empty: str = "no data", **kw):
    """One seaborn heatmap (NaN cells masked, shown grey); returns its mesh for a colourbar."""
    if grid.empty or grid.isna().all().all():
        _empty(ax, empty)
        return None
    ax.set_facecolor(NAN_GREY)
    ax.grid(False)
    every = -(-grid.shape[1] // 16)   # at most ~16 column labels, upright
    small = grid.shape[0] <= 12 and grid.shape[1] <= 12   # few cells: print their values too
    sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, cbar=False, xticklabels=every,
                annot=small, fmt=".2f", annot_kws={"fontsize": "x-small"}, **kw)
    ax.tick_params(axis="x", rotation=0)
    ax.tick_params(axis="y", rotation=0)
    return ax.collections[0]


def _mark(ax, flags: pd.DataFrame) -> None:
    """A dot on every cell whose flag is True (cells in the heatmap's row/column order)."""
    rows, cols = np.nonzero(flags.fillna(False).to_numpy(bool))
    ax.scatter(cols + 0.5, rows + 0.5, s=4, c="white", edgecolors="0.2", linewidths=0.3, zorder=3)


def _nan_note(fig: Figure, values: pd.Series, why: str) -> None:
    if values.isna().any():
        fig.supxlabel(f"grey cells: {why}", fontsize="x-small", color="0.35")   # laid out, never overlaps


# ------------------------------------------------------------------ activations

def _act_rows(acts: pd.DataFrame, stat: str, site: str | None) -> pd.DataFrame:
    _require(acts, ACT_COLUMNS, "activations", "write it with `cogprobe capture RUN`")
    df = acts[acts["stat"] == stat]
    if site is not None:
        df = df[df["site"] == site]
    if df.empty:
        where = f" at site {site!r}" if site else ""
        raise CogprobeError(f"the activations table has no {stat!r} rows{where}; capture them with `cogprobe capture RUN`")
    df = df.copy()
    df["task"] = df["task"].fillna("").astype(str).replace({t: "all tasks" for t in TASK_FREE})
    return df


def _layer_heatmaps(df: pd.DataFrame, stat: str, cmap: str, title: str) -> Figure:
    """Layer × checkpoint heatmaps: rows = site, columns = task, one colourbar per site.

    Panels of one site share a scale (same units, comparable across tasks); sites
    do not (an MLP output's norm is not on the residual stream's scale).
    """
    sites = _ordered(df["site"], ("resid", "attn", "mlp"))
    tasks = _ordered(df["task"], TASK_ORDER)
    fig, axes = _grid(len(sites), len(tasks), w=5.0, h=3.0)
    for i, site in enumerate(sites):
        rows = df[df["site"] == site]
        finite = rows["value"].to_numpy(dtype=float)
        finite = finite[np.isfinite(finite)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        mesh = None
        for j, task in enumerate(tasks):
            ax = axes[i, j]
            grid = rows[rows["task"] == task].pivot_table(
                index="checkpoint_step", columns="block", values="value", aggfunc="last", dropna=False)
            mesh = _heat(ax, grid, cmap, vmin, vmax) or mesh
            ax.set_title(f"{task} · {site}" if len(sites) > 1 else task)
            ax.set_xlabel("block (its output)" if i == len(sites) - 1 else "")
            ax.set_ylabel("checkpoint step" if j == 0 else "")
        if mesh is not None:
            fig.colorbar(mesh, ax=axes[i].tolist(), label=STAT_LABELS.get(stat, stat), shrink=0.9)
    _nan_note(fig, df["value"], "not measured")
    fig.suptitle(title)
    return fig


@_styled
def logit_lens_heatmap(acts: pd.DataFrame) -> Figure:
    """Logit-lens NLL (nats/token) of each block's output, layer × checkpoint, per task.

    Brighter = lower NLL: the layer by which a checkpoint can already read out the
    answer moves earlier as the language is learned.
    """
    df = _act_rows(acts, "logit_lens_nll", "resid")
    return _layer_heatmaps(df, "logit_lens_nll", "viridis_r",
                           "Logit lens: NLL when each block's output is read through the final norm + head")


@_styled
def drift_heatmap(acts: pd.DataFrame, stat: str = "drift_cos", site: str | None = None) -> Figure:
    """How far each block's activations moved from step 0, block × checkpoint, per task (and site).

    `stat`: drift_cos (1 − cosine similarity; 0 = unchanged), cka (linear CKA;
    1 = unchanged) or norm. `site=None` draws every site present.
    """
    if stat not in ("drift_cos", "cka", "norm"):
        raise CogprobeError(f"stat={stat!r} is not a drift statistic; use drift_cos, cka or norm")
    df = _act_rows(acts, stat, site)
    title = {"drift_cos": "Representation drift from step 0 (1 − cosine similarity)",
             "cka": "Similarity to step 0 (linear CKA; 1 = unchanged)",
             "norm": "Activation norm per token"}[stat]
    return _layer_heatmaps(df, stat, "viridis_r" if stat == "cka" else "viridis", title)


# ------------------------------------------------------------------ training and comparison

@_styled
def training_curve(train_log: pd.DataFrame) -> Figure:
    """Training loss (raw and a rolling mean) and the learning-rate schedule against step."""
    _require(train_log, ("step", "loss"), "train_log", "train with `cogprobe train` first")
    log = train_log.sort_values("step").drop_duplicates("step", keep="last")
    has_lr = "lr" in log.columns and log["lr"].notna().any()
    fig, axes = _grid(1, 2 if has_lr else 1, w=4.6, h=3.2)
    ax = axes[0, 0]
    window = max(1, len(log) // 20)
    ax.plot(log["step"], log["loss"], color="C0", alpha=0.35, lw=1, label="per step")
    if window > 1:
        smooth = log["loss"].rolling(window, min_periods=1, center=True).mean()
        ax.plot(log["step"], smooth, color="C0", lw=2, label=f"rolling mean ({window} steps)")
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="Loss")
    ax.legend(fontsize="small")
    if has_lr:
        axes[0, 1].plot(log["step"], log["lr"], color="C2", lw=1.5)
        axes[0, 1].set(xlabel="step", ylabel="learning rate", title="Learning rate")
        axes[0, 1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.suptitle("Training" + _training_summary(log))
    return fig


def _training_summary(log: pd.DataFrame) -> str:
    parts = []
    if "tokens" in log.columns and log["tokens"].notna().any():
        parts.append(f"{_human(float(log['tokens'].max()))} tokens")
    if "seconds" in log.columns and log["seconds"].notna().any():
        parts.append(f"{float(log['seconds'].sum()) / 60:.1f} min")
    return f": {len(log)} steps" + "".join(f", {p}" for p in parts)


def _human(n: float) -> str:
    for div, unit, fmt in ((1e9, "B", ".1f"), (1e6, "M", ".1f"), (1e3, "k", ".0f")):
        if abs(n) >= div:
            return f"{n / div:{fmt}}{unit}"
    return f"{n:.0f}"


@_styled
def comparison_bars(compare: pd.DataFrame, metric: str = "nll", intervals: pd.DataFrame | None = None) -> Figure:
    """Share of the full fine-tuning gain each strategy retains, perception and production.

    `metric="nll"` uses `{task}_share`, `metric="chrf"` uses `chrf_{task}_share`.
    Several rows per strategy (seeds) give mean bars with ±1 std error bars; one seed
    and `intervals` (`verdicts.comparison_table`) give 95% bootstrap error bars. Dashed
    lines mark full fine-tuning (1.0) and 97 % of it; tick labels carry each
    strategy's trainable parameter count.
    """
    if metric not in ("nll", "chrf"):
        raise CogprobeError(f"metric={metric!r} is not a comparison metric; use nll or chrf")
    cols = {t: (f"{t}_share" if metric == "nll" else f"chrf_{t}_share") for t in TASK_ORDER}
    _require(compare, ("strategy", *cols.values()), "compare", "run the study with `cogprobe run`")
    long = compare.melt(id_vars=["strategy"], value_vars=list(cols.values()), var_name="task", value_name="share")
    long["task"] = long["task"].map({v: k for k, v in cols.items()})
    order = _ordered(compare["strategy"], STRATEGY_ORDER)
    seeds = compare.groupby("strategy").size().max() > 1
    fig = Figure(figsize=(1.0 * len(order) + 3.5, 4.2), layout="constrained")
    ax = fig.subplots()
    palette = dict(zip(TASK_ORDER, sns.color_palette("colorblind", 2)))
    sns.barplot(long, x="strategy", y="share", hue="task", order=order, hue_order=list(TASK_ORDER), ax=ax,
                palette=palette, errorbar="sd" if seeds else None, capsize=0.15 if seeds else 0)
    for container in ax.containers:   # values inside the bars, clear of the error bars
        ax.bar_label(container, fmt="%.2f", label_type="center", fontsize="x-small", color="white")
    if intervals is not None and not seeds and metric == "nll":
        _interval_bars(ax, intervals, order)
    ax.axhline(1.0, color="0.2", ls="--", lw=1, label="full fine-tuning (1.0)")
    ax.axhline(0.97, color="0.55", ls="--", lw=1, label="97 % of full fine-tuning")
    ax.axhline(0.0, color="0.2", lw=0.8)
    ax.set_xticks(range(len(order)), labels=_param_labels(compare, order))
    what = "NLL" if metric == "nll" else "chrF"
    ax.set(xlabel="strategy (trainable parameters)", ylabel=f"share of full-FT {what} gain retained")
    handles, labels = ax.get_legend_handles_labels()
    ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize="small")
    n = int(compare.groupby("strategy").size().max())
    spread = f"; mean ± sd of {n} seeds" if seeds else (
        "; 95% bootstrap intervals" if intervals is not None and metric == "nll" else "")
    fig.suptitle(f"How much of full fine-tuning each strategy buys ({what} on the test split{spread})")
    return fig


def _interval_bars(ax, intervals: pd.DataFrame, order: list[str]) -> None:
    """Error bars from the share intervals, on the bars seaborn drew (one container per task)."""
    shares = intervals[intervals["quantity"] == "share"].set_index(["strategy", "task"])
    for container, task in zip(ax.containers, TASK_ORDER):
        for patch, strategy in zip(container, order):
            if (strategy, task) not in shares.index:
                continue
            r = shares.loc[(strategy, task)]
            x = patch.get_x() + patch.get_width() / 2
            ax.errorbar(x, r["estimate"], yerr=[[r["estimate"] - r["low"]], [r["high"] - r["estimate"]]],
                        fmt="none", ecolor="0.15", capsize=3, lw=1)


def _param_labels(compare: pd.DataFrame, order: list[str]) -> list[str]:
    if "trainable_params" not in compare.columns:
        return order
    params = compare.groupby("strategy")["trainable_params"].first()
    return [f"{s}\n{_human(float(params[s]))}" if pd.notna(params.get(s)) else s for s in order]


# ------------------------------------------------------------------ a whole run folder

def plot_run(run_dir: str | os.PathLike, *, dpi: int = 150) -> list[Path]:
    """Draw every figure whose table exists in `run_dir` into `run_dir/figures/`.

    Missing tables are skipped; so are figures whose rows are absent (e.g. no skip
    sweep). Returns the written paths in drawing order.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CogprobeError(f"no run folder at {run}; give the folder that `cogprobe train` or `cogprobe run` wrote")
    tables = {name: io.read_parquet(run / name) for name in TABLES if (run / name).is_file()}  # all read (and
    if not tables:  # checked) before the first figure is drawn, so a damaged table leaves no figure behind
        raise CogprobeError(f"no tables to plot in {run}; run `cogprobe sweep {run}` first")
    out = run / "figures"
    written = []
    for name, draw in _figures_for(tables):
        written.append(save(draw(), out / f"{name}.png", dpi=dpi))
    return written


def _figures_for(tables: dict[str, pd.DataFrame]):
    """(file stem, thunk) for each figure the present tables can feed."""
    if SWEEPS in tables:
        sw = tables[SWEEPS]
        modes = set(sw["mode"]) if "mode" in sw.columns else set()
        for mode in ("revert", "skip"):
            if mode not in modes:
                continue
            for y in (("share", "nll") if mode == "revert" else ("nll",)):
                yield f"specialization_curves_{mode}_{y}", functools.partial(specialization_curves, sw, mode, y)
                yield f"specialization_heatmap_{mode}_{y}", functools.partial(specialization_heatmaps, sw, mode, y)
            if sw["task"].isin(list(CONTROLS)).any():
                yield f"conditional_gain_{mode}", functools.partial(conditional_gain_curves, sw, mode)
    if ACTIVATIONS in tables:
        acts = tables[ACTIVATIONS]
        stats = set(acts["stat"]) if "stat" in acts.columns else set()
        if "logit_lens_nll" in stats:
            yield "logit_lens", functools.partial(logit_lens_heatmap, acts)
        for stat in ("drift_cos", "cka", "norm"):
            if stat in stats:
                yield f"{stat}_heatmap", functools.partial(drift_heatmap, acts, stat)
    from cogprobe.alignment_plots import figures as alignment_figures  # it imports this module's helpers
    yield from alignment_figures(tables)
    if TRAIN_LOG in tables:
        log = tables[TRAIN_LOG]
        if not log.empty:
            yield "training_curve", functools.partial(training_curve, log)
    if COMPARE in tables:
        cmp = tables[COMPARE]
        bars = None
        if SCORES in tables and "seed" in cmp.columns:
            bars = comparison_table(tables[SCORES], list(cmp[["strategy", "seed"]].itertuples(
                index=False, name=None)))
        yield "comparison_nll", functools.partial(comparison_bars, cmp, "nll", bars)
        chrf = [c for c in ("chrf_perception_share", "chrf_production_share") if c in cmp.columns]
        if len(chrf) == 2 and cmp[chrf].notna().any().any():
            yield "comparison_chrf", functools.partial(comparison_bars, cmp, "chrf")
