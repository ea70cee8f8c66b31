"""The plateau rule on hand-made dev curves: where it fires, where it must not."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cogprobe.tuning.plateau import check, checks, first_plateau

RULE = dict(window=0.2, min_improvement=0.01)


def curve(fn, every=10, last=400):
    return [(s, fn(s)) for s in range(0, last + 1, every)]


def test_fires_at_the_first_step_whose_window_starts_on_a_planted_plateau():
    # falls 0.05 a step (far above 1% of a window) until step 100, then flat
    planted = curve(lambda s: 10 - 0.05 * min(s, 100))
    expected = next(s for s, _ in planted if max(u for u, _ in planted if u <= 0.8 * s) >= 100)
    assert expected == 130  # 0.8 * 120 = 96 still reaches back before the plateau
    assert first_plateau(planted, **RULE) == expected
    assert not any(c.converged for c in checks(planted, **RULE) if c.step < expected)


def test_a_flat_curve_stops_at_the_first_point_the_rule_may_judge():
    flat = curve(lambda s: 5.0, every=1, last=50)
    assert first_plateau(flat, **RULE) == 2  # r(1) = 0 (the base): step 2 is the first with r > 0
    assert first_plateau(flat, **RULE, min_step=7) == 7


def test_never_before_three_evaluations():
    flat = [(0, 5.0), (10, 5.0)]
    assert not check(flat, **RULE).converged and check(flat, **RULE).reference_step == 0
    assert check([*flat, (20, 5.0)], **RULE).converged


def test_a_noisy_curve_that_keeps_improving_never_stops():
    rng = np.random.default_rng(0)
    noisy = curve(lambda s: 6.0 * (1 + s) ** -0.3 * (1 + 0.02 * rng.standard_normal()), every=10, last=2000)
    assert first_plateau(noisy, **RULE) is None
    # comparing the latest point with the window's first instead would have stopped it on an up-tick
    at = dict(noisy)
    point_rule = [s for s, m in noisy[2:] if (at[max(u for u in at if u <= 0.8 * s)] - m) / m < 0.01]
    assert point_rule


def test_a_curve_that_turns_up_stops_once_its_best_is_a_window_old():
    overfit = curve(lambda s: 4 + 0.01 * abs(s - 100))  # best at step 100, worse after
    assert first_plateau(overfit, **RULE) == 130  # the first step whose window starts at 100 or later
    assert check(overfit[:14], **RULE).improvement == 0.0


def test_the_record_names_every_number_the_rule_read():
    c = check([(0, 8.0), (10, 6.0), (20, 5.0), (30, 4.98)], **RULE)
    assert (c.step, c.dev_nll, c.best_nll, c.reference_step) == (30, 4.98, 4.98, 20)
    assert c.improvement == pytest.approx(0.02 / 5.0) and c.converged
    assert set(c.to_dict()) == {"step", "dev_nll", "best_nll", "reference_step", "improvement", "converged"}


def test_log_spaced_evaluations_read_the_latest_step_before_the_window():
    log = [(s, 5.0 - (0.5 if s >= 8 else 0.0)) for s in (0, 1, 2, 4, 8, 16, 32)]
    assert [c.reference_step for c in checks(log, **RULE)] == [0, 0, 1, 2, 4, 8, 16]
    assert first_plateau(log, **RULE) == 2 and first_plateau(log, **RULE, min_step=8) == 16


def test_steps_out_of_order_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        check([(0, 1.0), (0, 1.0)], **RULE)
    assert math.isfinite(check([(0, 1.0)], **RULE).best_nll)
