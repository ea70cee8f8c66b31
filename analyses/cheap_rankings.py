"""Do you need a probe run? Cheap per-block rankings checked against the exact revert sweep (issue 19).

For each language's probe run (a full fine-tuning run with an exact revert sweep of every k in its
sweeps.parquet), on the same evaluation pairs as that sweep:
  1. `cogprobe rank`: block influence and angular distance (base model), weight delta and the taylor
     share (per checkpoint), each timed;
  2. the taylor engine's sweep of the same checkpoints, timed;
  3. Spearman's rho of each ranking against the exact per-block importance, with a paired bootstrap
     interval (`cogprobe.agreement`); the taylor curves' mean error against the exact ones; the sets
     each implies at CogSym's size and at tau = 0.8, beside the exact sets.
The exact sweep's wall time is read from `--exact-seconds LANG=SECONDS` (measured when it ran).

  python analyses/cheap_rankings.py --probe nahuatl=RUN --exact-seconds nahuatl=S [--probe otomi=RUN ...]
writes runs/cheap-rankings/LANG/{rankings,sweeps}.parquet and figures/cheap_rankings{,_sets,_curves}.{csv,png}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from _common import FIGURES, publish

from cogprobe.selection import agreement
from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.data.evalset import EvalSet
from cogprobe.models.layersets import cogsym, to_string
from cogprobe.probe.folders import sweep_run
from cogprobe.selection.rankings import RANKINGS, ranking_rows, rank_run, select_ranking
from cogprobe.selection.rules import select_curves

TAU = 0.8


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def same_evalset(run: Path) -> EvalSet:
    """The evaluation set of the run's exact sweep, rebuilt from its metadata (so every number below
    is on the same pairs)."""
    meta = io.read_json(run / "sweeps.parquet.json")
    evalset = EvalSet.for_run(run, split=meta["split"], n=meta["n"], sample_seed=meta["sample_seed"],
                              max_sentence_tokens=meta["max_sentence_tokens"])
    mine = {k: v for k, v in evalset.to_dict().items()}
    differ = [k for k in mine if k in meta and meta[k] != mine[k]]
    if differ:
        raise CogprobeError(f"cannot rebuild the evaluation set of {run}/sweeps.parquet (differs in {differ})")
    return evalset


def measure(run: Path, out: Path, steps: list[int]) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """The rankings and the taylor sweep of the checkpoints the exact sweep covers, with its seconds.

    The taylor ranking is read off the taylor sweep (the same estimates: its importances are the
    ranking's shares, see `agreement`), at the sweep's cost, instead of computing them twice."""
    evalset = same_evalset(run)
    ranks = rank_run(run, rankings=[r for r in RANKINGS if r != "taylor"], evalset=evalset, out=out, device="cpu")
    t0 = time.perf_counter()
    taylor = sweep_run(run, engine="taylor", evalset=evalset, out=out, device="cpu", overwrite=True, steps=steps)
    seconds = time.perf_counter() - t0
    L = int(taylor["k"].max())
    rows = []
    for step in steps:
        means = {k: v[0].sum() / v[1].sum() for k, v in agreement.arms(taylor, step).items()}
        rows += ranking_rows(step, "taylor", agreement.importance(means, L), taylor_examples(taylor, step),
                      taylor_examples(taylor, step), seconds / len(steps))
    return pd.concat([ranks, pd.DataFrame(rows, columns=ranks.columns)], ignore_index=True), taylor, seconds


def taylor_examples(taylor: pd.DataFrame, step: int) -> int:
    """Examples the taylor engine ran forward and backward at a checkpoint (every task's pairs)."""
    rows = taylor[taylor["checkpoint_step"] == step].drop_duplicates("task")
    return int(sum(len(x) for x in rows["example_nll"]))


def agreement_rows(language, exact, ranks, taylor, exact_seconds, taylor_seconds) -> list[dict]:
    steps = sorted(s for s in exact["checkpoint_step"].unique() if s != 0)
    L = int(exact["k"].max())
    n = len(cogsym(L))
    rows = []
    for step in steps:
        means = {k: v[0].sum() / v[1].sum() for k, v in agreement.arms(exact, step).items()}
        imp = agreement.importance(means, L)
        exact_top = agreement.top_set(imp, n)
        for name in RANKINGS:
            r = ranks[(ranks["ranking"] == name)]
            r = r[r["checkpoint_step"] == (0 if name in ("block-influence", "angular") else step)].sort_values("block")
            scores = r["score"].to_numpy()
            rho = (agreement.agreement(None, exact, step, taylor=taylor) if name == "taylor"
                   else agreement.agreement(scores, exact, step))
            top = agreement.top_set(scores, n)
            rows.append(dict(language=language, checkpoint_step=int(step), ranking=name, spearman=rho.estimate,
                             spearman_low=rho.low, spearman_high=rho.high, top_set=to_string(top),
                             exact_top_set=to_string(exact_top), jaccard=agreement.jaccard(top, exact_top),
                             seconds=float(r["seconds"].iloc[0]), forward_passes=int(r["forward_passes"].iloc[0]),
                             backward_passes=int(r["backward_passes"].iloc[0]),
                             exact_sweep_seconds_per_checkpoint=exact_seconds / len(steps),
                             taylor_sweep_seconds_per_checkpoint=taylor_seconds / len(steps)))
    return rows


def set_rows(language, run, exact, ranks, taylor) -> list[dict]:
    """The sets at the last checkpoint: CogSym's size and tau, exact beside estimated."""
    step = int(exact["checkpoint_step"].max())
    L = int(exact["k"].max())
    n = len(cogsym(L))
    means = {k: v[0].sum() / v[1].sum() for k, v in agreement.arms(exact, step).items()}
    imp = agreement.importance(means, L)
    rows = [("CogSym (fixed)", "size", cogsym(L), None),
            ("exact importance, top", "size", agreement.top_set(imp, n), None),
            ("exact importance, shares reach tau", "tau", agreement.tau_set(imp, TAU), None)]
    for name in RANKINGS:
        rows.append((name, "size", select_ranking(ranks, name, n_layers=L, step=step).layers, "exact importance, top"))
    rows.append(("taylor", "tau", _refused_or(lambda: select_ranking(ranks, "taylor", n_layers=L, step=step, tau=TAU)),
                 "exact importance, shares reach tau"))
    for criterion in ("remove", "keep"):
        want = f"curves ({criterion}), exact sweep"
        rows.append((want, "tau", select_curves(exact, tau=TAU, step=step, criterion=criterion).layers, None))
        rows.append((f"curves ({criterion}), taylor sweep", "tau",
                     _refused_or(lambda: select_curves(taylor, tau=TAU, step=step, criterion=criterion)), want))
    budget = run / "selection-budget.json"
    if budget.is_file():
        rows.append(("budget (exact keep-outer search)", "tau", io.read_json(budget)["layers"], None))
    found = {name: layers for name, _, layers, _ in rows}
    out = []
    for name, by, layers, against in rows:
        ok = isinstance(layers, list)
        out.append(dict(language=language, checkpoint_step=step, set=name, by=by,
                        blocks=to_string(layers) if ok else layers, n_blocks=len(layers) if ok else None,
                        compared_with=against or "",
                        jaccard=agreement.jaccard(layers, found[against]) if ok and against else None))
    return out


def _refused_or(select):
    """The set a rule gives, or why it refused (an estimate may never reach tau): a row either way."""
    try:
        return select().layers
    except CogprobeError as err:
        return f"refused: {str(err).split(': ', 1)[-1].split(';')[0]}"


def curve_rows(language, exact, taylor) -> list[dict]:
    rows = []
    for step in sorted(s for s in exact["checkpoint_step"].unique() if s != 0):
        for task, direction in agreement.TASK_DIRECTIONS:
            err = agreement.curve_error(exact, taylor, step, task, direction)
            pts = agreement.point_errors(exact, taylor, step)
            pts = pts[(pts.task == task) & (pts.direction == direction)]
            rows.append(dict(language=language, checkpoint_step=int(step), task=task, direction=direction,
                             mean_abs_error=err.estimate, low=err.low, high=err.high,
                             max_abs_error=float(pts["error"].abs().max()),
                             exact_share_at_L=float(pts[pts.k == pts.k.max()]["share_exact"].iloc[0]),
                             taylor_share_at_L=float(pts[pts.k == pts.k.max()]["share_taylor"].iloc[0])))
    return rows


def figure(agree: pd.DataFrame, curves: dict[str, tuple[pd.DataFrame, pd.DataFrame]]):
    languages = list(curves)
    fig, axes = plt.subplots(2, len(languages), figsize=(6 * len(languages), 8), squeeze=False)
    for j, language in enumerate(languages):
        ax = axes[0, j]
        a = agree[agree.language == language]
        steps = sorted(a.checkpoint_step.unique())
        for i, name in enumerate(RANKINGS):
            r = a[a.ranking == name].set_index("checkpoint_step").loc[steps]
            x = np.arange(len(steps)) + (i - 1.5) * 0.18
            ax.errorbar(x, r.spearman, yerr=[r.spearman - r.spearman_low, r.spearman_high - r.spearman],
                        fmt="o", capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(steps)), [f"step {s}" for s in steps])
        ax.set_ylim(-1, 1)
        ax.set_ylabel("Spearman vs exact block importance (95% CI)")
        ax.set_title(f"{language}: cheap rankings against the exact sweep")
        ax.legend(fontsize=8)
        exact, taylor = curves[language]
        step = exact["checkpoint_step"].max()
        pts = agreement.point_errors(exact, taylor, step)
        ax = axes[1, j]
        for (task, direction), color in zip(agreement.TASK_DIRECTIONS, ["C0", "C1", "C2", "C3"]):
            p = pts[(pts.task == task) & (pts.direction == direction)].sort_values("k")
            ax.plot(p.k, 1 - p.share_exact, color=color, label=f"{task}, {direction}: exact")
            ax.plot(p.k, 1 - p.share_taylor, color=color, ls="--", label="taylor")
        ax.set_xlabel("k blocks reverted from the end")
        ax.set_ylabel("share of the gain removed")
        ax.set_title(f"{language}, step {step}: exact (solid) and taylor (dashed) curves")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="append", required=True, help="LANG=RUN (a probe run with an exact sweep)")
    p.add_argument("--exact-seconds", action="append", required=True, help="LANG=SECONDS of its exact sweep")
    p.add_argument("--out", type=Path, default=Path("runs/cheap-rankings"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    probes, seconds = _pairs(a.probe), {k: float(v) for k, v in _pairs(a.exact_seconds).items()}
    agree, sets, errors, curves = [], [], [], {}
    for language, run in probes.items():
        run = Path(run)
        exact = io.read_parquet(run / "sweeps.parquet")
        steps = sorted(int(s) for s in exact["checkpoint_step"].unique() if s != 0)
        ranks, taylor, taylor_seconds = measure(run, a.out / language, steps)
        print(f"{language}: taylor sweep {taylor_seconds:.0f} s; exact {seconds[language]:.0f} s")
        agree += agreement_rows(language, exact, ranks, taylor, seconds[language], taylor_seconds)
        sets += set_rows(language, run, exact, ranks, taylor)
        errors += curve_rows(language, exact, taylor)
        curves[language] = (exact, taylor)
    agree = pd.DataFrame(agree)
    publish(figure(agree, curves), agree, "cheap_rankings")
    io.write_text(FIGURES / "cheap_rankings_sets.csv", pd.DataFrame(sets).to_csv(index=False))
    io.write_text(FIGURES / "cheap_rankings_curves.csv", pd.DataFrame(errors).to_csv(index=False))
    print(agree.drop(columns=["top_set", "exact_top_set"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(pd.DataFrame(sets).to_string(index=False))
    print(pd.DataFrame(errors).to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
