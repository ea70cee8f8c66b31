"""Checking a cheap ranking (or the taylor engine) against the exact revert sweep.

The exact per-block importance at a checkpoint comes from its four revert curves (two tasks, two
directions). Each curve adds one block per step from its end; the share of the task's gain
(nll_reference - nll_checkpoint, measured) that the block removes there is
(nll(k+1) - nll(k)) / gain, the block being k (input direction) or L-1-k (output direction). A
block's importance is the mean of its four shares; the L importances add up to the mean share that
reverting every block removes (about 1 here). A taylor sweep table gives its own importances by the
same formula, over the same measured gain: the first-order estimates' own total can be near zero or
negative, and dividing by it would flip or scramble their order.

Every statistic is recomputed on paired bootstrap resamples of the evaluation pairs
(`intervals.paired`): all curve points, exact and estimated, on the same resampled pairs. A ranking
that does not come from the sweep's examples (weight delta, base-model geometry) is held fixed, so
its interval is the exact side's sampling alone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from cogprobe.core.errors import CogprobeError
from cogprobe.core.intervals import Interval, paired
from cogprobe.selection.rules import EPS
from cogprobe.probe.sweep import check_one_engine

TASK_DIRECTIONS = [(t, d) for t in ("perception", "production") for d in ("input", "output")]


def curve_rows(sweeps: pd.DataFrame, step: int) -> pd.DataFrame:
    """The revert rows (without --ends) of one checkpoint, one engine, every k of both directions and tasks."""
    check_one_engine(sweeps, "the sweep table")
    rows = sweeps[(sweeps["mode"] == "revert") & (sweeps["checkpoint_step"] == step) & ~sweeps["ends"].astype(bool)]
    if rows.empty:
        raise CogprobeError(f"no revert rows at step {step}; sweep that checkpoint (cogprobe sweep RUN --mode revert)")
    L = int(rows["k"].max())
    for task, direction in TASK_DIRECTIONS:
        ks = set(rows[(rows["task"] == task) & (rows["direction"] == direction)]["k"].astype(int))
        if ks != set(range(L + 1)):
            raise CogprobeError(f"step {step}: the {task} {direction} curve lacks k values; sweep every k (omit --ks)")
    return rows


def arms(sweeps: pd.DataFrame, step: int, prefix: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (per-pair nll sums, tokens)} of every curve point, the reference and the checkpoint."""
    out = {}
    for _, r in curve_rows(sweeps, step).iterrows():
        tokens = np.asarray(r["example_tokens"], float)
        out[f"{prefix}{r['task']}|{r['direction']}|{int(r['k'])}"] = (np.asarray(r["example_nll"], float), tokens)
        out[f"{prefix}{r['task']}|reference"] = (np.asarray(r["reference_example_nll"], float), tokens)
        out[f"{prefix}{r['task']}|checkpoint"] = (np.asarray(r["checkpoint_example_nll"], float), tokens)
    return out


def importance(means: dict, n_layers: int, prefix: str = "") -> np.ndarray:
    """Per block (axis 0), the mean over the four curves of the share of the task's gain it removes;
    any trailing axes are bootstrap resamples."""
    shares = []
    for task, direction in TASK_DIRECTIONS:
        nll = np.stack([np.asarray(means[f"{prefix}{task}|{direction}|{k}"], float) for k in range(n_layers + 1)])
        gain = np.asarray(means[f"{prefix}{task}|reference"], float) - np.asarray(means[f"{prefix}{task}|checkpoint"], float)
        share = np.diff(nll, axis=0) / gain
        shares.append(share if direction == "input" else share[::-1])
    return np.mean(shares, axis=0)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho along axis 0 (average ranks for ties), for each trailing index."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    return (ra * rb).sum(axis=0) / np.sqrt((ra ** 2).sum(axis=0) * (rb ** 2).sum(axis=0))


def _statistic(fn):
    """Wrap fn(means) -> array over resamples for `intervals.paired` (a scalar for the point estimate)."""
    def stat(means):
        scalar = np.ndim(next(iter(means.values()))) == 0
        value = fn(means)
        return float(np.ravel(value)[0]) if scalar else value
    return stat


def agreement(scores, sweeps: pd.DataFrame, step: int, *, taylor: pd.DataFrame | None = None, **kw) -> Interval:
    """Spearman's rho between a ranking's per-block scores and the exact importances at `step`, with
    its paired bootstrap interval. `scores=None` with a `taylor` sweep table: the taylor importances."""
    data = arms(sweeps, step)
    L = int(curve_rows(sweeps, step)["k"].max())
    if scores is None:
        if taylor is None:
            raise CogprobeError("agreement needs a ranking's scores or a taylor sweep table")
        data.update(arms(taylor, step, prefix="taylor:"))
        return paired(_statistic(lambda m: spearman(importance(m, L, "taylor:"), importance(m, L))), data, **kw)
    scores = np.asarray(scores, float)
    if scores.shape != (L,):
        raise CogprobeError(f"a ranking of {scores.shape[0]} blocks against a sweep of {L}; rank the same model")

    def rho(m):
        exact = importance(m, L)
        return spearman(scores.reshape((L,) + (1,) * (exact.ndim - 1)), exact)
    return paired(_statistic(rho), data, **kw)


def curve_error(sweeps: pd.DataFrame, taylor: pd.DataFrame, step: int, task: str, direction: str, **kw) -> Interval:
    """The mean over k of |taylor - exact| gain retained on one curve, as a share of the exact gain."""
    data = {**arms(sweeps, step), **arms(taylor, step, prefix="taylor:")}
    L = int(curve_rows(sweeps, step)["k"].max())
    names = [f"{task}|{direction}|{k}" for k in range(L + 1)]
    keep = [f"{task}|reference", f"{task}|checkpoint", *names, *[f"taylor:{n}" for n in names]]

    def mean_abs(m):
        gain = np.asarray(m[f"{task}|reference"]) - np.asarray(m[f"{task}|checkpoint"])
        errors = [np.abs(np.asarray(m[f"taylor:{n}"]) - np.asarray(m[n])) / gain for n in names]
        return np.mean(errors, axis=0)
    return paired(_statistic(mean_abs), {n: data[n] for n in keep}, **kw)


def point_errors(sweeps: pd.DataFrame, taylor: pd.DataFrame, step: int) -> pd.DataFrame:
    """Every curve point of `step`: exact and estimated gain retained, and their difference."""
    exact, est = curve_rows(sweeps, step), curve_rows(taylor, step)
    keys = ["checkpoint_step", "task", "direction", "k"]
    both = exact[keys + ["share", "nll"]].merge(est[keys + ["share", "nll"]], on=keys,
                                                       suffixes=("_exact", "_taylor"))
    both["error"] = both["share_taylor"] - both["share_exact"]
    return both


def top_set(scores, n: int) -> list[int]:
    """The n highest-scoring blocks, sorted (ties to the lower block)."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    return sorted(int(b) for b in order[:n])


def tau_set(shares, tau: float) -> list[int]:
    """The fewest top blocks whose shares add up to tau."""
    order = np.argsort(-np.asarray(shares, float), kind="stable")
    cumulative = np.cumsum(np.asarray(shares, float)[order])
    hit = np.nonzero(cumulative >= tau * (1 - EPS))[0]
    n = int(hit[0]) + 1 if len(hit) else len(order)
    return sorted(int(b) for b in order[:n])


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0
