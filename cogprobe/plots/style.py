"""What every figure module shares: the style, the colours, the orders, small drawing helpers.

Figures are drawn from the tidy tables only (never from models or live runs).

Every function takes a DataFrame and returns a `matplotlib.figure.Figure` built
without pyplot: no global figure registry, no backend switch, nothing leaks into
a notebook's state. Such a figure is not shown by the inline backend (it registers
its PNG formatter only once pyplot is imported), so figures are `Figure` below, a
matplotlib Figure that renders itself to PNG for IPython (`_repr_png_`). Seaborn styles
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

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import colormaps
from matplotlib import figure

from cogprobe.core.errors import CogprobeError
from cogprobe.core.io import atomic_path, write_text
from cogprobe.core.layout import ACTIVATIONS, ALIGNMENT, COMPARE, DEV_CURVES, SCORES, SWEEPS, TRAIN_LOG


TASK_ORDER = ("perception", "production")
DIRECTION_ORDER = ("input", "output", "both")
NAN_GREY = "0.85"
DPI = 150                 # saved figures: sharp on a screen, small in a repository
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
TABLES = (SWEEPS, ACTIVATIONS, TRAIN_LOG, COMPARE, SCORES, ALIGNMENT, DEV_CURVES)


# ------------------------------------------------------------------ shared helpers

def styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw inside seaborn's style contexts, leaving global rcParams as they were."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            return fn(*args, **kwargs)
    return wrapper


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG atomically (a reader never sees half a file) and free it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        fig.clear()
    return path


def publish(fig: Figure, data: pd.DataFrame, stem: str | os.PathLike) -> Path:
    """STEM.png and STEM.csv beside it: the figure and the numbers it shows (per-example lists stay in
    the study's tables, so the CSV stays small enough to read). Returns the PNG's path."""
    data = data.drop(columns=[c for c in data.columns if "example_" in c])
    png = save(fig, f"{stem}.png")
    write_text(f"{stem}.csv", data.to_csv(index=False))
    return png


def require(df: pd.DataFrame, columns: Sequence[str], table: str, fix: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CogprobeError(f"the {table} table lacks column(s) {missing}; {fix}")
    if df.empty:
        raise CogprobeError(f"the {table} table has no rows; {fix}")


def ordered(values, preferred: Sequence[str]) -> list:
    """Known names in their canonical order, then any others in order of appearance."""
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + [v for v in present if v not in preferred]


def step_colors(steps: Sequence[int]) -> dict[int, tuple]:
    """One viridis colour per checkpoint by rank; the pale yellow end is left out."""
    cmap = colormaps["viridis"]
    n = max(len(steps) - 1, 1)
    return {s: cmap(0.85 * i / n) for i, s in enumerate(sorted(steps))}


class Figure(figure.Figure):
    """A matplotlib Figure that a notebook shows inline: IPython displays an object through its
    `_repr_png_`, whatever backend is active, where a plain pyplot-free Figure shows only as text."""

    def _repr_png_(self) -> bytes:
        import io
        buffer = io.BytesIO()
        self.savefig(buffer, format="png")
        return buffer.getvalue()


def empty_panel(ax, text: str, *, clear: bool = True) -> None:
    """Say why a panel is blank; `clear=False` keeps ticks that shared axes need."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    if clear:
        ax.set_xticks([])
        ax.set_yticks([])


def panel_grid(nrows: int, ncols: int, *, w: float, h: float, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w * ncols + 1.5, h * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def heat(ax, grid: pd.DataFrame, cmap: str, vmin: float, vmax: float, empty: str = "no data", **kw):
    """One seaborn heatmap (NaN cells masked, shown grey); returns its mesh for a colourbar."""
    if grid.empty or grid.isna().all().all():
        empty_panel(ax, empty)
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


def nan_note(fig: Figure, values: pd.Series, why: str) -> None:
    if values.isna().any():
        fig.supxlabel(f"grey cells: {why}", fontsize="x-small", color="0.35")   # laid out, never overlaps


def human_count(n: float) -> str:
    """1234567 -> '1.2M': a count short enough for a tick label or a title."""
    for div, unit, fmt in ((1e9, "B", ".1f"), (1e6, "M", ".1f"), (1e3, "k", ".0f")):
        if abs(n) >= div:
            return f"{n / div:{fmt}}{unit}"
    return f"{n:.0f}"
