"""Figures of a probe or training run: activations (logit lens, drift, CKA, norms), the training
curve, and `figures_for`, the figures a folder's probe and training tables can feed (sweep figures:
`plots.sweeps`; alignment: `plots.alignment`; style and helpers: `plots.style`; the study's
comparison figures and `plot_run`: `study.figures`). Every function takes a DataFrame and returns a
`matplotlib.figure.Figure` built without pyplot.
"""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import ACTIVATIONS, SWEEPS, TRAIN_LOG
from cogprobe.data.tasks import CONTROLS
from cogprobe.plots.alignment import figures as alignment_figures
from cogprobe.plots.style import (ACT_COLUMNS, STAT_LABELS, TASK_FREE, TASK_ORDER, heat, human_count, nan_note,
                                  ordered, panel_grid, require, styled)
from cogprobe.plots.sweeps import conditional_gain_curves, specialization_curves, specialization_heatmaps


# ------------------------------------------------------------------ activations

def _act_rows(acts: pd.DataFrame, stat: str, site: str | None) -> pd.DataFrame:
    require(acts, ACT_COLUMNS, "activations", "write it with `cogprobe capture RUN`")
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
    sites = ordered(df["site"], ("resid", "attn", "mlp"))
    tasks = ordered(df["task"], TASK_ORDER)
    fig, axes = panel_grid(len(sites), len(tasks), w=5.0, h=3.0)
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
            mesh = heat(ax, grid, cmap, vmin, vmax) or mesh
            ax.set_title(f"{task} · {site}" if len(sites) > 1 else task)
            ax.set_xlabel("block (its output)" if i == len(sites) - 1 else "")
            ax.set_ylabel("checkpoint step" if j == 0 else "")
        if mesh is not None:
            fig.colorbar(mesh, ax=axes[i].tolist(), label=STAT_LABELS.get(stat, stat), shrink=0.9)
    nan_note(fig, df["value"], "not measured")
    fig.suptitle(title)
    return fig


@styled
def logit_lens_heatmap(acts: pd.DataFrame) -> Figure:
    """Logit-lens NLL (nats/token) of each block's output, layer × checkpoint, per task.

    Brighter = lower NLL: the layer by which a checkpoint can already read out the
    answer moves earlier as the language is learned.
    """
    df = _act_rows(acts, "logit_lens_nll", "resid")
    return _layer_heatmaps(df, "logit_lens_nll", "viridis_r",
                           "Logit lens: NLL when each block's output is read through the final norm + head")


@styled
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

@styled
def training_curve(train_log: pd.DataFrame) -> Figure:
    """Training loss (raw and a rolling mean) and the learning-rate schedule against step."""
    require(train_log, ("step", "loss"), "train_log", "train with `cogprobe train` first")
    log = train_log.sort_values("step").drop_duplicates("step", keep="last")
    has_lr = "lr" in log.columns and log["lr"].notna().any()
    fig, axes = panel_grid(1, 2 if has_lr else 1, w=4.6, h=3.2)
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
        parts.append(f"{human_count(float(log['tokens'].max()))} tokens")
    if "seconds" in log.columns and log["seconds"].notna().any():
        parts.append(f"{float(log['seconds'].sum()) / 60:.1f} min")
    return f": {len(log)} steps" + "".join(f", {p}" for p in parts)


# ------------------------------------------------------------------ a whole run folder


def figures_for(tables: dict[str, pd.DataFrame]):
    """(file stem, thunk) for each figure of the probe and training tables present: sweeps,
    activations, alignment and the training log (the study adds its own: `study.figures`)."""
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
                if mode == "revert":   # where the source-dependent part of the gain lives, beside the total
                    for kind, draw in (("curves", specialization_curves), ("heatmap", specialization_heatmaps)):
                        yield (f"specialization_{kind}_{mode}_conditional_share",
                               functools.partial(draw, sw, mode, "share", gain="conditional"))
    if ACTIVATIONS in tables:
        acts = tables[ACTIVATIONS]
        stats = set(acts["stat"]) if "stat" in acts.columns else set()
        if "logit_lens_nll" in stats:
            yield "logit_lens", functools.partial(logit_lens_heatmap, acts)
        for stat in ("drift_cos", "cka", "norm"):
            if stat in stats:
                yield f"{stat}_heatmap", functools.partial(drift_heatmap, acts, stat)
    yield from alignment_figures(tables)
    if TRAIN_LOG in tables:
        log = tables[TRAIN_LOG]
        if not log.empty:
            yield "training_curve", functools.partial(training_curve, log)
