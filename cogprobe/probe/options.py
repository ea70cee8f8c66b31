"""The options of the probe verbs, `sweep` and `capture`: one frozen dataclass each, every field
with its default and help (`knob`). The CLI's flags, the folder verbs (`probe.folders`) and the
study (`study.config`) all read them, so a default is written once, here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cogprobe.core.knob import knob
from cogprobe.data.tasks import BATCH_SIZE, TASKS

DIRECTIONS = ("input", "output")
SWEEP_MODES = ("revert", "skip")
ENGINES = ("auto", "memory", "streamed", "naive", "taylor", "fast")
EXACT_ENGINES = ("auto", "memory", "streamed")   # whole models in memory, or blocks streamed from the files
AUTO = "auto"   # the engine that fits the memory (`probe.fit`): every verb's default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SITES = ("resid", "attn", "mlp")
BACKENDS = ("torch", "nnsight", "transformerlens")


def dtype_knob():
    """The precision knob of every verb that runs blocks."""
    return knob("float32", "precision of the weights and activations (the NLL is computed in float32 and summed "
                "in float64 either way); bfloat16 halves memory, see the docs' scaling page for what it moves",
                choices=tuple(DTYPES))


def max_memory_knob():
    """The memory budget knob of every verb that can stream blocks."""
    return knob(None, "memory the verb may use, e.g. 20GiB (default: the device's free memory); decides the "
                "engine under --engine auto")


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
    engine: str = knob(AUTO, "exact, the same numbers: memory (two models in memory), streamed (blocks read "
                       "from the files one at a time: memory that does not grow with depth), auto (memory where it "
                       "fits --max-memory, else streamed), naive (rebuilds each ablated model; a check); fast is "
                       "memory's older name; taylor: first-order estimates of a revert sweep from one backward "
                       "pass per pair (its own table: use --out)", choices=ENGINES)
    batch_size: int = knob(BATCH_SIZE, "pairs per forward pass")
    dtype: str = dtype_knob()
    max_memory: str | None = max_memory_knob()


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture records (`cogprobe capture`, `cogprobe.capture_run`)."""
    sites: tuple[str, ...] = knob(("resid",), "activation sites per block: resid, attn, mlp", choices=SITES)
    backend: str = knob("torch", "how activations are read: plain torch hooks, nnsight or TransformerLens "
                        "(the same numbers)", choices=BACKENDS)
    alignment: bool = knob(True, "also the cross-lingual alignment of the blocks (alignment.parquet)")
    batch_size: int = knob(BATCH_SIZE, "pairs per forward pass")
    engine: str = knob(AUTO, "memory (load each model whole, through --backend), streamed (blocks read from the "
                       "files one at a time, the torch backend's numbers), auto (memory where two models fit "
                       "--max-memory, else streamed)", choices=EXACT_ENGINES)
    dtype: str = dtype_knob()
    max_memory: str | None = max_memory_knob()
