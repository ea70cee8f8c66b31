"""The options of the probe verbs, `sweep` and `capture`: one frozen dataclass each, every field
with its default and help (`knob`). The CLI's flags, the folder verbs (`probe.folders`) and the
study (`study.config`) all read them, so a default is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass

from cogprobe.core.knob import knob
from cogprobe.data.tasks import BATCH_SIZE, TASKS

DIRECTIONS = ("input", "output")
SWEEP_MODES = ("revert", "skip")
ENGINES = ("fast", "naive", "taylor")
SITES = ("resid", "attn", "mlp")
BACKENDS = ("torch", "nnsight", "transformerlens")


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep ablates and how it is computed (`cogprobe sweep`, `cogprobe.sweep_run`)."""
    mode: str = knob("revert", "revert blocks to the reference's weights, or skip them (identity)",
                     choices=SWEEP_MODES)
    directions: tuple[str, ...] = knob(DIRECTIONS, "ends ablated: input (blocks [0, k)), output ([L-k, L))",
                                       choices=DIRECTIONS)
    tasks: tuple[str, ...] = knob(TASKS,
                                  "tasks scored: perception, production and their -shuffled controls")
    ks: tuple[int, ...] | None = knob(None, "k grid, e.g. '0-30' or '0,2,4,8' (default: every k from 0 to L)")
    ends: bool = knob(False, "revert the embedding with the input end and final norm + head with the output end")
    engine: str = knob("fast", "fast, naive: exact (the same numbers); taylor: first-order estimates of a revert "
                       "sweep from one backward pass per pair (its own table: use --out)", choices=ENGINES)
    batch_size: int = knob(BATCH_SIZE, "pairs per forward pass")


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture records (`cogprobe capture`, `cogprobe.capture_run`)."""
    sites: tuple[str, ...] = knob(("resid",), "activation sites per block: resid, attn, mlp", choices=SITES)
    backend: str = knob("torch", "how activations are read: plain torch hooks, nnsight or TransformerLens "
                        "(the same numbers)", choices=BACKENDS)
    alignment: bool = knob(True, "also the cross-lingual alignment of the blocks (alignment.parquet)")
    batch_size: int = knob(BATCH_SIZE, "pairs per forward pass")
