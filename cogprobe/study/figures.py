"""The study's figures: the comparison bars, learning curves as shares of full fine-tuning's gain,
CogSym against the sets of its size, and `plot_run`, which draws every figure a run or study
folder's tables can feed. Here rather than in `plots`, because they know the comparison rows.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.core.layout import COMPARE, DEV_CURVES, SCORES
from cogprobe.data.tasks import TASKS
from cogprobe.plots.runs import figures_for
from cogprobe.plots.style import (DPI, TABLES, TASK_ORDER, Figure, human_count, ordered, panel_grid, require,
                                  save, styled)
from cogprobe.study.rows import ROWS, kind
from cogprobe.study.verdicts import comparison_table

ROW_ORDER = ROWS   # the comparison rows in the order `rows` lists them (random draws after them)


@styled
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
    require(compare, ("row", *cols.values()), "compare", "run the study with `cogprobe run`")
    long = compare.melt(id_vars=["row"], value_vars=list(cols.values()), var_name="task", value_name="share")
    long["task"] = long["task"].map({v: k for k, v in cols.items()})
    order = ordered(compare["row"], ROW_ORDER)
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
    return [f"{s}\n{human_count(float(params[s]))}" if pd.notna(params.get(s)) else s for s in order]


def dev_shares(curves: pd.DataFrame) -> pd.DataFrame:
    """The dev curves as shares: per (seed, task), (NLL at step 0 - NLL at a step) / (NLL at step 0 -
    full fine-tuning's NLL at its last step). Every run starts from the base model, so step 0 is
    the same for all; 1 is where full fine-tuning ended."""
    require(curves, ("row", "seed", "step", "task", "nll"), "dev_curves", "run a study with eval_steps")
    curves = curves[curves["task"].isin(TASKS)].copy()
    start = curves[curves["step"] == 0].groupby(["seed", "task"])["nll"].mean()
    full = curves[curves["row"] == "full"]
    end = full[full["step"] == full.groupby("seed")["step"].transform("max")].groupby(["seed", "task"])["nll"].mean()
    key = pd.MultiIndex.from_frame(curves[["seed", "task"]])
    gain = (start - end).reindex(key).to_numpy()
    curves["share"] = (start.reindex(key).to_numpy() - curves["nll"].to_numpy()) / np.where(gain > 0, gain, np.nan)
    return curves


@styled
def share_curves(curves: pd.DataFrame) -> Figure:
    """Share of full fine-tuning's final dev gain against step, one line per row (the mean over
    seeds; random draws thin and grey): learning speed and end point, apart. With a `language`
    column (several studies), one row of panels per language, each language's shares its own."""
    if "language" not in curves:
        curves = curves.assign(language="")
    languages = list(dict.fromkeys(curves["language"]))
    shares = pd.concat([dev_shares(g) for _, g in curves.groupby("language", sort=False)])
    fig, axes = panel_grid(len(languages), len(TASKS), w=4.8, h=3.6, sharey=True)
    rows = ordered(shares["row"], ROW_ORDER)
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


@styled
def same_size_shares(rows: pd.DataFrame) -> Figure:
    """CogSym against the sets of its size: each set's share of full fine-tuning's test-NLL gain with
    its 95% interval, one panel per (language, task). The random draws get a column of their own,
    one dot per draw, so they read as the distribution they are and not as one set. Takes the tidy
    table `analyses/evidence.py` writes (figures/evidence_rows.csv) as it is."""
    require(rows, ("row", "task", "quantity", "estimate", "low", "high"), "evidence_rows",
             "write it with `python analyses/evidence.py LANGUAGE=STUDY_DIR`")
    rows = rows if "language" in rows else rows.assign(language="")
    shares = same_size_rows(rows)
    if shares.empty:
        raise CogprobeError("the table has no share of a CogSym-sized row (cogsym, middle, bottom, top, random); "
                            "compare those rows first (`cogprobe run --preset standard`)")
    kinds = shares["row"].map(kind)
    columns = [k for k in SAME_SIZE if (kinds == k).any()]
    draws = shares.loc[kinds == "random", "row"].nunique()
    # a draw is drawn from the seed, so each dot (random-1, ...) averages a different set per seed
    labels = [f"random\n({draws} draw{'s' * (draws != 1)}\nper seed)" if k == "random" else k for k in columns]
    languages = list(dict.fromkeys(shares["language"]))
    fig, axes = panel_grid(len(languages), len(TASKS), w=0.9 * len(columns) + 1.2, h=3.4, sharey=True)
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

def plot_run(run_dir: str | os.PathLike, *, dpi: int = DPI) -> list[Path]:
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
    """(file stem, thunk) for each figure the present tables can feed: the probe's and training's
    (`plots.runs.figures_for`), then the study's dev curves and comparison."""
    yield from figures_for(tables)
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
