"""Training health: stop on a non-finite loss or gradient, warn (or stop) when the loss diverges.

A learning rate that is too high does not always give NaN: the loss can climb
from 5.9 to 37 with finite numbers, and the run would otherwise end with exit 0
and checkpoints that are worse than the base model. Two rules:
  - non-finite: a NaN or infinite loss or gradient norm stops the run before the
    optimizer applies it, so every checkpoint on disk is finite;
  - divergence: the loss has stayed above FACTOR x the run's first logged loss
    (step 1, read back from the log on a resume) for PATIENCE steps in a row.
    `--on-divergence warn` (the default) says so once, on stderr, on the progress
    bar and in the manifest; `stop` also stops the run there.
Each event is recorded in manifest.json under "health", so `cogprobe verify`
reports it and the study refuses to compute shares of a diverged full
fine-tuning run's gain.
"""
from __future__ import annotations

import math
from pathlib import Path

from cogprobe.core import io
from cogprobe.core.layout import MANIFEST
from cogprobe.core.errors import CogprobeError

FACTOR = 2.0   # a loss twice the first one: far above any noise of a healthy run's early steps
PATIENCE = 3   # steps in a row, so that one bad batch is not a divergence


class NonFinite(CogprobeError):
    """A NaN or infinite loss or gradient norm: the run stopped before applying it."""


class Diverged(CogprobeError):
    """The loss diverged and `--on-divergence stop` was asked for."""


def check_finite(step: int, loss: float, grad_norm: float, last_saved: int, out: Path) -> None:
    """Raise `NonFinite` unless both numbers are finite (called before the optimizer step)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    err = NonFinite(f"{what} at step {step}: training stopped; checkpoints up to the last good one, "
                    f"step-{last_saved}, are kept in {out}; lower --lr (or clip with --max-grad-norm) and rerun "
                    "with --overwrite")
    err.summary = f"training stopped at step {step} on a non-finite value ({what})"  # what the manifest records
    raise err


class Monitor:
    """Follows the loss step by step and says once when the run diverges (see the module's rule)."""

    def __init__(self, first_loss: float | None = None, warned: bool = False):
        self.first, self.warned, self.above = first_loss, warned, 0

    def update(self, step: int, loss: float, grad_norm: float) -> str | None:
        """The divergence message the first time the rule holds; None otherwise."""
        if self.first is None:
            self.first = loss
            return None
        self.above = self.above + 1 if loss > FACTOR * self.first else 0
        if self.above < PATIENCE or self.warned:
            return None
        self.warned = True
        return (f"training diverged at step {step}: the loss ({loss:.3g}) has stayed above {FACTOR:g}x the first "
                f"loss ({self.first:.3g}) for {PATIENCE} steps (gradient norm {grad_norm:.3g}); lower --lr")


def events(manifest: dict) -> list[dict]:
    return manifest.get("health", {}).get("events", [])


def record(out: Path, event: dict) -> None:
    """Append `event` (step, kind, message, ...) to the manifest's health events (atomic rewrite)."""
    manifest = io.read_json(Path(out) / MANIFEST)
    manifest.setdefault("health", {}).setdefault("events", []).append(event)
    io.write_json(Path(out) / MANIFEST, manifest)


def check_healthy(run: Path, manifest: dict, use: str) -> None:
    """Refuse to build on a run whose training stopped or diverged: `use` says what would be built."""
    for event in events(manifest):
        raise CogprobeError(f"{run}: {event['message']}; {use} would be meaningless: retrain it with a lower "
                            "learning rate (--overwrite)")
