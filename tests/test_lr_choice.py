"""Choosing a learning rate on dev: the grid, then past its edge while the best sits there."""
import pandas as pd
import pytest

from cogprobe.study.lr_choice import COLUMNS, at_edge, chosen, next_rate, search

GRID = [1e-4, 3e-4, 1e-3]


def run_search(curve, table=None):
    """search() against a planted dev NLL as a function of the rate; returns the table and the trials run."""
    ran = []

    def trial(lr):
        ran.append(lr)
        return curve(lr)
    table = search("full", GRID, pd.DataFrame(columns=COLUMNS) if table is None else table, trial, 30,
                   lambda t: None)
    return table, ran


def test_an_interior_best_needs_only_the_grid():
    table, ran = run_search(lambda lr: abs(lr - 3e-4))
    assert ran == GRID and chosen(table, "full", GRID) == 3e-4 and not at_edge(dict(zip(table.lr, table.dev_nll)))
    assert (table["seconds"] >= 0).all()   # each trial's wall time: what the search cost


def test_a_table_recorded_before_trial_times_were_kept_still_chooses():
    old = pd.DataFrame(dict(row="full", lr=GRID, steps=30, dev_nll=[2.0, 1.0, 3.0]))   # no seconds column
    table, ran = run_search(lambda lr: 0.0, old)
    assert ran == [] and chosen(table, "full", GRID) == 3e-4


def test_a_best_at_the_low_edge_is_followed_until_the_minimum_is_inside():
    table, ran = run_search(lambda lr: abs(lr - 4e-5))     # the optimum lies below the grid
    assert ran[:3] == GRID and ran[3] == pytest.approx(1e-4 / 3)
    assert len(ran) == 5 and ran[4] == pytest.approx(1e-4 / 9)   # 3.3e-5 was best, so one more below
    assert chosen(table, "full", GRID) == pytest.approx(1e-4 / 3)
    assert not at_edge(dict(zip(table.lr, table.dev_nll)))


def test_the_search_stops_after_two_rates_beyond_the_grid_and_says_so():
    table, ran = run_search(lambda lr: lr)                 # lower is always better
    assert len(ran) == 5 and chosen(table, "full", GRID) == pytest.approx(min(ran))
    assert at_edge(dict(zip(table.lr, table.dev_nll)))
    high, ran = run_search(lambda lr: -lr)                 # higher is always better
    assert ran[3:] == [pytest.approx(1e-3 * 10 / 3), pytest.approx(1e-3 * 100 / 9)]


def test_a_rerun_runs_only_what_is_missing_and_a_partial_table_chooses_nothing():
    table, _ = run_search(lambda lr: abs(lr - 3e-4))
    again, ran = run_search(lambda lr: abs(lr - 3e-4), table)
    assert ran == [] and again.equals(table)
    assert chosen(table.iloc[:2], "full", GRID) is None
    assert next_rate({1e-4: 1.0, 3e-4: 2.0}, GRID) is None   # the grid first
