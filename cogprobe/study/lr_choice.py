"""Choosing a learning rate per comparison row on dev: which rates to try, and which one wins.

Each row kind trains a short run at every rate of its grid and keeps the rate with the lowest dev
NLL. When the best rate sits at an edge of what was tried, the optimum may lie beyond it, so one
more rate is tried past that edge, a grid step further (the ratio of the grid's two nearest rates),
up to `MAX_BEYOND` rates beyond the grid on each side: the chosen rate is then an interior minimum,
or the study says it stopped at the limit (`at_edge`). Pure functions: the study runs the trials.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import pandas as pd

MAX_BEYOND = 2
COLUMNS = ["row", "lr", "steps", "dev_nll", "seconds"]   # seconds: the trial's wall time (its cost)


def trials_of(table: pd.DataFrame, row: str) -> dict[float, float]:
    """{rate: dev NLL} of one row kind's recorded trials."""
    mine = table[table["row"] == row]
    return dict(zip(mine["lr"].astype(float), mine["dev_nll"].astype(float)))


def best(trials: dict[float, float]) -> float:
    """The rate with the lowest dev NLL (ties to the lower rate)."""
    return min(trials, key=lambda lr: (trials[lr], lr))


def next_rate(trials: dict[float, float], grid: Sequence[float]) -> float | None:
    """The next rate to try once every rate of `grid` is in `trials` ({rate: dev NLL}): one step past
    the edge the best rate sits at, or None when the best is inside or MAX_BEYOND steps are used."""
    rates = sorted(trials)
    if len(rates) < 2 or not set(grid) <= set(rates):
        return None
    top = best(trials)
    if top == rates[0] and sum(r < min(grid) for r in rates) < MAX_BEYOND:
        return rates[0] / (rates[1] / rates[0])
    if top == rates[-1] and sum(r > max(grid) for r in rates) < MAX_BEYOND:
        return rates[-1] * (rates[-1] / rates[-2])
    return None


def at_edge(trials: dict[float, float]) -> bool:
    """Whether the chosen rate is the lowest or the highest tried (the search stopped at its limit)."""
    return len(trials) > 1 and best(trials) in (min(trials), max(trials))


def search(row: str, grid: Sequence[float], table: pd.DataFrame, trial: Callable[[float], float], steps: int,
           record: Callable[[pd.DataFrame], None]) -> pd.DataFrame:
    """Run the trials of `row` that `table` lacks (the grid, then the edge extensions), recording
    the table after each; returns it. `trial(lr)` trains and returns the dev NLL."""
    todo = [lr for lr in grid if lr not in trials_of(table, row)]
    while todo or (todo := [lr for lr in [next_rate(trials_of(table, row), grid)] if lr is not None]):
        lr = todo.pop(0)
        start = time.perf_counter()
        dev_nll = trial(lr)
        found = dict(row=row, lr=lr, steps=steps, dev_nll=dev_nll, seconds=round(time.perf_counter() - start, 1))
        table = pd.concat([table, pd.DataFrame([found])], ignore_index=True)
        record(table)
    return table


def chosen(table: pd.DataFrame, row: str, grid: Sequence[float]) -> float | None:
    """The winning rate of `row`, or None if its grid's trials are not all recorded yet."""
    trials = trials_of(table, row)
    if not set(grid) <= set(trials):
        return None
    return best(trials)
