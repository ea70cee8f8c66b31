"""When has fine-tuning stopped improving? The rule of `train --stop-on-plateau`, as pure functions.

A run with a dev curve scores its dev set at its evaluation steps (see `devcurve`); m(t) is the
dev NLL at evaluation step t: the mean over the two tasks of each task's token-weighted NLL. At an
evaluation step s,

    b(t)           = min { m(u) : u an evaluation step <= t }       the best dev NLL so far
    r              = the latest evaluation step <= (1 - window) * s  where the window starts
    improvement(s) = (b(r) - b(s)) / b(r)

and the run has converged at s when s >= min_step, r > 0 and improvement(s) < min_improvement:
over the last `window` fraction of the steps done, the best dev NLL fell by less than
`min_improvement` of itself. The run stops at the first such s; `steps` stays the cap.

Why this shape:
  - the window is a fraction of the steps done, not a fixed count: dev curves flatten roughly like
    power laws, so a fixed count is too long early and too short late, and the rule needs no
    guess of how long the run will be;
  - the best so far, not the latest score: one evaluation that lands above the trend does not end
    a run that is still improving (a rule comparing two single points would stop there), and a
    curve that turns up (overfitting) stops as soon as its best is a window old;
  - r > 0: the window starts at a trained evaluation, never at the base model, so every decision
    reads at least three evaluations (0, r, s) and is never the first steps' gain alone;
  - min_step: no decision before it (`train` passes the end of warm-up when that is later, since a
    rising learning rate makes slow early progress by design).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

Curve = Sequence[tuple[int, float]]  # (evaluation step, dev NLL), in step order, starting at step 0


@dataclass(frozen=True)
class Check:
    """The rule at one evaluation step, with every number it read (recorded in the manifest)."""
    step: int                    # s
    dev_nll: float               # m(s)
    best_nll: float              # b(s)
    reference_step: int | None   # r (None: no evaluation that early)
    improvement: float | None    # (b(r) - b(s)) / b(r); None without r
    converged: bool

    def to_dict(self) -> dict:
        return asdict(self)


def check(curve: Curve, window: float, min_improvement: float, min_step: int = 0) -> Check:
    """The rule at the last point of `curve` (see the module docstring)."""
    steps = [int(s) for s, _ in curve]
    if not steps or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"a dev curve needs evaluation steps in increasing order, got {steps}")
    s, m = steps[-1], float(curve[-1][1])
    limit = s - window * s
    r = max((u for u in steps if u <= limit + 1e-9), default=None)
    b_s = best(curve, s)
    improvement = None if r is None else (best(curve, r) - b_s) / best(curve, r)
    judged = improvement is not None and r > 0 and s >= min_step
    return Check(s, m, b_s, r, improvement, judged and improvement < min_improvement)


def best(curve: Curve, t: int) -> float:
    """b(t): the lowest dev NLL at an evaluation step <= t."""
    return min(float(m) for s, m in curve if s <= t)


def checks(curve: Curve, window: float, min_improvement: float, min_step: int = 0) -> list[Check]:
    """The rule at every evaluation step of `curve`, as the run met them."""
    return [check(curve[:i + 1], window, min_improvement, min_step) for i in range(len(curve))]


def first_plateau(curve: Curve, window: float, min_improvement: float, min_step: int = 0) -> int | None:
    """The evaluation step the run stops at (the first that converged); None: it runs to the cap."""
    return next((c.step for c in checks(curve, window, min_improvement, min_step) if c.converged), None)
