"""How stable a layer set is: the rule rerun on bootstrap resamples of the probe's examples.

A layer set is a decision read off a few dozen pairs, so `select` reports, beside the
set, what the same rule chooses when the examples are resampled (with replacement,
the same resample for every configuration of a task, as the pairs are shared): the
distribution of the chosen (k_in, k_out), how often the rule finds no set, and the
probability that the chosen set still meets tau. Every resample recomputes each
configuration's NLL from the sweep's stored per-example sums, so nothing is scored
again. 200 resamples and seed 0 by default.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from cogprobe.core.errors import CogprobeError

RESAMPLES, SEED = 200, 0


def resampled(rows: pd.DataFrame, n_resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[pd.DataFrame]:
    """Copies of a sweep table with nll, nll_reference, nll_checkpoint and share recomputed on
    a bootstrap resample of each task's examples."""
    if "example_nll" not in rows.columns or rows["example_nll"].isna().any():
        raise CogprobeError("the sweep rows have no per-example scores; rerun the sweep with this version")
    rng = np.random.default_rng(seed)
    tasks = {t: rows.index[rows["task"] == t] for t in rows["task"].unique()}
    arrays = {t: _arrays(rows.loc[ix]) for t, ix in tasks.items()}
    for _ in range(n_resamples):
        copy = rows.copy()
        for task, ix in tasks.items():
            own, ref, ck, tokens = arrays[task]
            pick = rng.integers(0, len(tokens), size=len(tokens))
            n = tokens[pick].sum()
            nll, nll_ref, nll_ck = own[:, pick].sum(1) / n, ref[:, pick].sum(1) / n, ck[:, pick].sum(1) / n
            gain = nll_ref - nll_ck
            copy.loc[ix, "nll"], copy.loc[ix, "nll_reference"], copy.loc[ix, "nll_checkpoint"] = nll, nll_ref, nll_ck
            copy.loc[ix, "share"] = np.where(gain > 0, (nll_ref - nll) / np.where(gain > 0, gain, 1), np.nan)
        yield copy


def _arrays(rows: pd.DataFrame) -> tuple[np.ndarray, ...]:
    tokens = np.asarray(rows["example_tokens"].iloc[0], float)
    stack = lambda col: np.stack([np.asarray(v, float) for v in rows[col]])  # noqa: E731
    return stack("example_nll"), stack("reference_example_nll"), stack("checkpoint_example_nll"), tokens


def stability(decide: Callable, rows: pd.DataFrame, chosen: tuple[int, int], *, n_resamples: int = RESAMPLES,
              seed: int = SEED) -> dict:
    """`decide(table, chosen) -> ((k_in, k_out) or None for "no set", whether `chosen` meets tau there)`,
    run on every resample of `rows` (see `select.curves_decider`, `select.budget_decider`)."""
    choices, met, none = Counter(), 0, 0
    for table in resampled(rows, n_resamples, seed):
        choice, ok = decide(table, chosen)
        if choice is None:
            none += 1
        else:
            choices[tuple(int(k) for k in choice)] += 1
        met += bool(ok)
    dist = [dict(k_in=k[0], k_out=k[1], share=c / n_resamples) for k, c in choices.most_common()]
    return dict(n_resamples=n_resamples, seed=seed, chosen=dict(k_in=chosen[0], k_out=chosen[1]),
                p_same_set=choices[tuple(chosen)] / n_resamples, p_meets_tau=met / n_resamples,
                p_no_set=none / n_resamples, distribution=dist)


def table(stab: dict) -> str:
    """The CLI's one table: each (k_in, k_out) the resamples chose, with its frequency."""
    rows = pd.DataFrame(stab["distribution"][:8])
    head = (f"stability over {stab['n_resamples']} resamples of the probe pairs: the same set "
            f"{stab['p_same_set']:.0%}, the chosen set meets tau {stab['p_meets_tau']:.0%}, no set "
            f"{stab['p_no_set']:.0%}")
    return head + ("\n" + rows.to_string(index=False, float_format=lambda x: f"{x:.0%}") if len(rows) else "")
