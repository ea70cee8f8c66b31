"""Figures of a run or study folder: activations, training, the comparison, and `plot_run`, which
draws every figure the folder's tables can feed (sweep figures: `sweep_plots`; alignment:
`alignment_plots`; style and helpers: `plot_style`). Every function takes a DataFrame and returns a
`matplotlib.figure.Figure` built without pyplot.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from cogprobe import io
from cogprobe.alignment_plots import figures as alignment_figures
from cogprobe.errors import CogprobeError
from cogprobe.layout import ACTIVATIONS, COMPARE, DEV_CURVES, SCORES, SWEEPS, TRAIN_LOG
from cogprobe.plot_style import (ACT_COLUMNS, ROW_ORDER, STAT_LABELS, TABLES, TASK_FREE, TASK_ORDER, _grid, _heat,
                                 _nan_note, _ordered, _require, _styled, save)
from cogprobe.sweep_plots import conditional_gain_curves, specialization_curves, specialization_heatmaps
from cogprobe.rows import kind
from cogprobe.tasks import CONTROLS, TASKS
from cogprobe.verdicts import comparison_table


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
    """Share of the full fine-tuning gain each comparison row retains, perception and production.

    `metric="nll"` uses `{task}_share`, `metric="chrf"` uses `chrf_{task}_share`.
    Several lines per row (seeds) give mean bars with ±1 std error bars; one seed
    and `intervals` (`verdicts.comparison_table`) give 95% bootstrap error bars. Dashed
    lines mark full fine-tuning (1.0) and 97 % of it; tick labels carry each
    row's trainable parameter count.
    """
    if metric not in ("nll", "chrf"):
        raise CogprobeError(f"metric={metric!r} is not a comparison metric; use nll or chrf")
    cols = {t: (f"{t}_share" if metric == "nll" else f"chrf_{t}_share") for t in TASK_ORDER}
    _require(compare, ("row", *cols.values()), "compare", "run the study with `cogprobe run`")
    long = compare.melt(id_vars=["row"], value_vars=list(cols.values()), var_name="task", value_name="share")
    long["task"] = long["task"].map({v: k for k, v in cols.items()})
    order = _ordered(compare["row"], ROW_ORDER)
    seeds = compare.groupby("row").size().max() > 1
    fig = Figure(figsize=(1.0 * len(order) + 3.5, 4.2), layout="constrained")
    ax = fig.subplots()
    palette = dict(zip(TASK_ORDER, sns.color_palette("colorblind", 2)))
    sns.barplot(long, x="row", y="share", hue="task", order=order, hue_order=list(TASK_ORDER), ax=ax,
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
    ax.set(xlabel="comparison row (trainable parameters)", ylabel=f"share of full-FT {what} gain retained")
    handles, labels = ax.get_legend_handles_labels()
    ax.get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize="small")
    n = int(compare.groupby("row").size().max())
    spread = f"; mean ± sd of {n} seeds" if seeds else (
        "; 95% bootstrap intervals" if intervals is not None and metric == "nll" else "")
    fig.suptitle(f"How much of full fine-tuning each row buys ({what} on the test split{spread})")
    return fig


def _interval_bars(ax, intervals: pd.DataFrame, order: list[str]) -> None:
    """Error bars from the share intervals, on the bars seaborn drew (one container per task)."""
    shares = intervals[intervals["quantity"] == "share"].set_index(["row", "task"])
    for container, task in zip(ax.containers, TASK_ORDER):
        for patch, row in zip(container, order):
            if (row, task) not in shares.index:
                continue
            r = shares.loc[(row, task)]
            x = patch.get_x() + patch.get_width() / 2
            ax.errorbar(x, r["estimate"], yerr=[[r["estimate"] - r["low"]], [r["high"] - r["estimate"]]],
                        fmt="none", ecolor="0.15", capsize=3, lw=1)


def _param_labels(compare: pd.DataFrame, order: list[str]) -> list[str]:
    if "trainable_params" not in compare.columns:
        return order
    params = compare.groupby("row")["trainable_params"].first()
    return [f"{s}\n{_human(float(params[s]))}" if pd.notna(params.get(s)) else s for s in order]


def dev_shares(curves: pd.DataFrame) -> pd.DataFrame:
    """The dev curves as shares: per (seed, task), (NLL at step 0 - NLL at a step) / (NLL at step 0 -
    full fine-tuning's NLL at its last step). Every run starts from the base model, so step 0 is
    the same for all; 1 is where full fine-tuning ended."""
    _require(curves, ("row", "seed", "step", "task", "nll"), "dev_curves", "run a study with eval_steps")
    curves = curves[curves["task"].isin(TASKS)].copy()
    start = curves[curves["step"] == 0].groupby(["seed", "task"])["nll"].mean()
    full = curves[curves["row"] == "full"]
    end = full[full["step"] == full.groupby("seed")["step"].transform("max")].groupby(["seed", "task"])["nll"].mean()
    key = pd.MultiIndex.from_frame(curves[["seed", "task"]])
    gain = (start - end).reindex(key).to_numpy()
    curves["share"] = (start.reindex(key).to_numpy() - curves["nll"].to_numpy()) / np.where(gain > 0, gain, np.nan)
    return curves


@_styled
def share_curves(curves: pd.DataFrame) -> Figure:
    """Share of full fine-tuning's final dev gain against step, one line per row (the mean over
    seeds; random draws thin and grey): learning speed and end point, apart. With a `language`
    column (several studies), one row of panels per language, each language's shares its own."""
    if "language" not in curves:
        curves = curves.assign(language="")
    languages = list(dict.fromkeys(curves["language"]))
    shares = pd.concat([dev_shares(g) for _, g in curves.groupby("language", sort=False)])
    fig, axes = _grid(len(languages), len(TASKS), w=4.8, h=3.6, sharey=True)
    rows = _ordered(shares["row"], ROW_ORDER)
    # tab10 without its grey (the random draws' colour); past nine rows the colours repeat, dashed
    palette = [c for i, c in enumerate(sns.color_palette("tab10", 10)) if i != 7]
    styles = {row: dict(color=palette[i % len(palette)], ls="-" if i < len(palette) else "--", lw=1.8)
              for i, row in enumerate(r for r in rows if kind(r) != "random")}
    for i, language in enumerate(languages):
        for ax, task in zip(axes[i], TASKS):
            mine = shares[(shares["language"] == language) & (shares["task"] == task)]
            for row in rows:
                line = mine[mine["row"] == row].groupby("step")["share"].mean()
                style = dict(color="0.6", lw=0.8) if kind(row) == "random" else styles[row]
                ax.plot(line.index, line.to_numpy(), label=row, **style)
            ax.axhline(1, color="0.3", lw=0.6, ls=":")
            ax.set(xlabel="step", title=f"{language} · {task}" if language else task)
        axes[i, 0].set(ylabel="share of full fine-tuning's final dev gain")
    axes[0, -1].legend(fontsize="x-small", ncol=2)
    fig.suptitle("Learning curves on dev (mean over seeds)")
    return fig


SAME_SIZE = ("cogsym", "middle", "bottom", "top", "random")   # the row kinds with CogSym's number of blocks


def same_size_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The share rows of the sets with CogSym's number of blocks, per task: what `same_size_shares`
    draws, so the CSV published beside its figure holds exactly the figure's numbers."""
    return rows[(rows["quantity"] == "share") & rows["row"].map(kind).isin(SAME_SIZE) & rows["task"].isin(TASKS)]


@_styled
def same_size_shares(rows: pd.DataFrame) -> Figure:
    """CogSym against the sets of its size: each set's share of full fine-tuning's test-NLL gain with
    its 95% interval, one panel per (language, task). The random draws get a column of their own,
    one dot per draw, so they read as the distribution they are and not as one set. Takes the tidy
    table `analyses/evidence.py` writes (figures/evidence_rows.csv) as it is."""
    _require(rows, ("row", "task", "quantity", "estimate", "low", "high"), "evidence_rows",
             "write it with `python analyses/evidence.py LANGUAGE=STUDY_DIR`")
    rows = rows if "language" in rows else rows.assign(language="")
    shares = same_size_rows(rows)
    if shares.empty:
        raise CogprobeError("the table has no share of a CogSym-sized row (cogsym, middle, bottom, top, random); "
                            "compare those rows first (`cogprobe run --preset standard`)")
    kinds = shares["row"].map(kind)
    columns = [k for k in SAME_SIZE if (kinds == k).any()]
    draws = shares.loc[kinds == "random", "row"].nunique()
    labels = [f"random\n({draws} draw{'s' * (draws != 1)})" if k == "random" else k for k in columns]
    languages = list(dict.fromkeys(shares["language"]))
    fig, axes = _grid(len(languages), len(TASKS), w=0.9 * len(columns) + 1.2, h=3.4, sharey=True)
    for i, language in enumerate(languages):
        for ax, task in zip(axes[i], TASKS):
            mine = shares[(shares["language"] == language) & (shares["task"] == task)]
            for x, k in enumerate(columns):
                sets = mine[mine["row"].map(kind) == k].sort_values("row")
                offsets = np.linspace(-0.25, 0.25, len(sets)) if len(sets) > 1 else [0.0]
                colour = "C3" if k == "cogsym" else ("0.5" if k == "random" else "C0")
                for dx, r in zip(offsets, sets.itertuples()):
                    ax.errorbar(x + dx, r.estimate, yerr=[[r.estimate - r.low], [r.high - r.estimate]], fmt="o",
                                color=colour, capsize=3, lw=1, ms=4)
                if k == "cogsym" and len(sets):
                    ax.axhline(sets["estimate"].iloc[0], color="C3", lw=0.6, ls="--")
            ax.axhline(1, color="0.3", lw=0.6, ls=":")
            ax.set_xticks(range(len(columns)), labels=labels, fontsize="small")
            ax.set_xlim(-0.6, len(columns) - 0.4)
            ax.set(title=f"{language} · {task}" if language else task)
        axes[i, 0].set(ylabel="share of full fine-tuning's test NLL gain")
    fig.suptitle("CogSym against the sets of its size (95% intervals; dotted: full fine-tuning)")
    return fig


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
    yield from alignment_figures(tables)
    if TRAIN_LOG in tables:
        log = tables[TRAIN_LOG]
        if not log.empty:
            yield "training_curve", functools.partial(training_curve, log)
    if DEV_CURVES in tables and not tables[DEV_CURVES].empty:
        yield "share_curves", functools.partial(share_curves, tables[DEV_CURVES])
    if COMPARE in tables:
        cmp = tables[COMPARE]
        bars = None
        if SCORES in tables and "seed" in cmp.columns:
            bars = comparison_table(tables[SCORES], list(cmp[["row", "seed"]].itertuples(
                index=False, name=None)))
        yield "comparison_nll", functools.partial(comparison_bars, cmp, "nll", bars)
        chrf = [c for c in ("chrf_perception_share", "chrf_production_share") if c in cmp.columns]
        if len(chrf) == 2 and cmp[chrf].notna().any().any():
            yield "comparison_chrf", functools.partial(comparison_bars, cmp, "chrf")
