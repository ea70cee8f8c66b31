"""The options of the selection verbs, `select` and `rank`: one frozen dataclass each, every field
with its default and help (`knob`), read by the CLI, the folder verbs and the study alike.

`SelectOptions` is one flat record for every rule; each field's help says which rule reads it, and
`Selection.params` records the ones the chosen rule used.
"""
from __future__ import annotations

from dataclasses import dataclass

from cogprobe.core.knob import knob
from cogprobe.core.layout import SELECTION
from cogprobe.models.layersets import DEFAULT_FRACTION
from cogprobe.probe.conditional import GAINS
from cogprobe.probe.options import AUTO, BATCH_SIZE, EXACT_ENGINES, max_memory_knob

RANKINGS = ("block-influence", "angular", "weight-delta", "taylor")
DERIVED = ("fixed", "curves", "budget")   # the rules of `rules`: a set from the block count or the sweeps
RULES = (*DERIVED, *RANKINGS)            # a cheap ranking of `rank` is a rule too
CRITERIA = ("remove", "keep")
SEARCHES = ("frontier", "exhaustive")
TAU = 0.8   # share of the gain a derived set must account for: the study's default too


@dataclass(frozen=True)
class SelectOptions:
    """How a layer set is derived (`cogprobe select`, `cogprobe.select_run`)."""
    rule: str = knob("budget", "fixed, curves, budget; or the top blocks of a ranking of `cogprobe rank`",
                     choices=RULES)
    tau: float = knob(TAU, "share of the gain the set must account for / keep")
    fraction: float = knob(DEFAULT_FRACTION, "rule fixed (and rankings): the CogSym fraction of blocks")
    step: int | None = knob(None, "checkpoint to read (default: the last)")
    gain: str = knob("total", "rules curves, budget: locate the total gain of tuning, or the conditional gain "
                     "(NLL with shuffled sources minus NLL with the true ones: the part that uses the source; "
                     "needs the shuffled-source controls in the sweep, and budget scores them)", choices=GAINS)
    input_task: str = knob("perception", "rule curves: task read at the input end")
    output_task: str = knob("production", "rule curves: task read at the output end")
    criterion: str = knob("remove", "rule curves: an end's k blocks must remove tau of the gain when reverted "
                          "(remove), or keep it alone when every other block is reverted (keep)", choices=CRITERIA)
    max_total: int | None = knob(None, "rule budget: largest k_in + k_out to try")
    search: str = knob("frontier", "rule budget: walk the pass/fail frontier (assumes a superset of a passing set "
                       "passes; checked, with a fallback) or score every candidate of each size", choices=SEARCHES)
    by_tau: bool = knob(False, "rule taylor: the fewest top blocks whose estimated shares reach tau "
                        "(default: CogSym's size)")
    name: str = knob(SELECTION, "file written in the tables folder (keep several rules side by side)")
    batch_size: int = knob(BATCH_SIZE, "rule budget: pairs per forward pass")
    engine: str = knob(AUTO, "rule budget: memory (both models loaded; prefix states kept across candidates), "
                       "streamed (blocks read from the files for every batch of candidates), auto (memory where "
                       "two models fit --max-memory)", choices=EXACT_ENGINES)
    max_memory: str | None = max_memory_knob()


@dataclass(frozen=True)
class RankOptions:
    """Which cheap per-block rankings to compute (`cogprobe rank`, `cogprobe.rank_run`)."""
    rankings: tuple[str, ...] = knob(RANKINGS, "block-influence, angular (base model), weight-delta, taylor "
                                     "(per checkpoint)", choices=RANKINGS)
    batch_size: int = knob(BATCH_SIZE, "pairs per forward pass")
    engine: str = knob(AUTO, "memory (whole models), streamed (block-influence and angular read the reference "
                       "block by block, weight-delta reads the models tensor by tensor: the same numbers; taylor "
                       "needs gradients through whole models and is refused), auto (memory where the models fit "
                       "--max-memory, else streamed)", choices=EXACT_ENGINES)
    max_memory: str | None = max_memory_knob()
