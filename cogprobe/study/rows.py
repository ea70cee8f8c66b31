"""What each comparison row of a study trains: its strategy, blocks, ends and LoRA rank.

A row is one line of the comparison (see the README's glossary). The rows come in matched groups,
so that a difference between two of them has one cause:

  full                 every parameter, the embeddings and the tied head included
  blocks               every block, the embeddings and head frozen: full fine-tuning matched to
                       CogSym (which freezes them too)
  cogsym               the outer `fraction` of the blocks (the paper's rule), ends frozen
  cogsym-ends          the same blocks with the embeddings and head trained (what full has and
                       CogSym lacks)
  lora                 LoRA adapters on every block
  cogsym-lora          LoRA adapters on CogSym's blocks, the same rank
  cogsym-lora-matched  LoRA on CogSym's blocks with the rank that gives it all-block LoRA's
                       parameter count (rank x L / k, rounded): the set, not the size, differs
  budget               the set the budget rule derives from the probe run on dev; where it finds
                       none, the fixed CogSym set in its place, labelled FIXED_USED (the study's
                       budget_no_set = "fixed"), or no row, the report saying why ("skip")
  middle, bottom, top  same-size controls: the middle blocks, the first k, the last k
  random               a same-size set drawn at random; with `random_draws` > 1 the draws are the
                       rows random-1 ... random-N, reported as a distribution, never as one draw
  random-ends          one same-size random set for every seed (`random`'s draw at seed 0), the
                       embeddings and head trained: cogsym-ends' control, whose seeds differ by
                       data order only, as cogsym-ends' do

Every layer-restricted row has CogSym's size k = round(fraction * L), so they differ by which
blocks, not by how many.

A pivot-only control `ROW@pivot` (e.g. `full@pivot`, `cogsym-ends@pivot`) trains what ROW trains, at
ROW's learning rate, for as many steps of as many packed rows of as many tokens, on the pivot side
of the same training pairs as plain text: no word of the new language. Its gain on the test set is
what tuning these parameters on any text in this format gives; the report subtracts it from ROW's
(`pivot_control`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.models.layersets import DEFAULT_FRACTION, cogsym, to_string
from cogprobe.core.layout import SELECTION_BUDGET

ROWS = ("full", "blocks", "lora", "cogsym", "cogsym-ends", "cogsym-lora", "cogsym-lora-matched", "budget",
        "middle", "bottom", "top", "random", "random-ends")
LORA_ROWS = ("lora", "cogsym-lora", "cogsym-lora-matched")
DRAW = re.compile(r"random-(\d+)$")
PIVOT_ONLY = "@pivot"   # ROW@pivot: ROW's parameters tuned on pivot-side text alone
FIXED_USED = "budget: no set, fixed used"   # the budget row's name in the report where it trained the fixed set


@dataclass(frozen=True)
class Plan:
    """How one row trains: TrainConfig's strategy, --layers, whether the ends train, the LoRA rank."""
    strategy: str
    layers: str | None = None
    train_ends: bool = False
    lora_r: int | None = None       # None: the study's lora_r
    pivot_only: bool = False        # trained on the pivot side alone (ROW@pivot)

    @property
    def lora(self) -> bool:
        return self.strategy.startswith("lora")


class Skip(Exception):
    """A row that cannot run (e.g. no budget set), with the reason the report gives."""


def kind(row: str) -> str:
    """The row's kind: a random draw `random-3` is of kind `random`."""
    return "random" if DRAW.match(row) else row


def controlled(row: str) -> str:
    """The row a pivot-only control stands beside (`full` of `full@pivot`); any other row itself."""
    return row[:-len(PIVOT_ONLY)] if row.endswith(PIVOT_ONLY) else row


def derives_budget(rows: list[str]) -> bool:
    """Whether a study with these rows derives the budget set: only where a row (or its pivot-only
    control) trains it, since the rule's search is a study's costliest decision."""
    return any(controlled(r) == "budget" for r in rows)


def expand(rows: list[str], draws: int) -> list[str]:
    """The rows with `random` replaced by its draws (random-1 ... random-N) when there are several
    (`random@pivot` by the draws' controls, random-1@pivot ...)."""
    if draws < 1:
        raise CogprobeError(f"random_draws={draws}: give a whole number >= 1")
    out = []
    for row in rows:
        tail = row[len(controlled(row)):]
        out += ([f"random-{d}{tail}" for d in range(1, draws + 1)] if controlled(row) == "random" and draws > 1
                else [row])
    return out


def matched_rank(r: int, n_layers: int, k: int) -> int:
    """The LoRA rank on k blocks that gives r on all n_layers blocks' parameter count (every block
    has the same linear modules, so the count is proportional to rank x blocks)."""
    return max(1, round(r * n_layers / k))


def plan(row: str, *, n_layers: int, fraction: float, lora_r: int, seed: int, study: Path | None = None) -> Plan:
    """The Plan of `row` for a model of n_layers blocks (`study`: the folder holding the budget selection)."""
    if controlled(row) != row:
        return replace(plan(controlled(row), n_layers=n_layers, fraction=fraction, lora_r=lora_r, seed=seed,
                            study=study), pivot_only=True)
    k = len(cogsym(n_layers, fraction))
    fixed = f"cogsym:{fraction}"
    simple = {"full": Plan("full"), "lora": Plan("lora"),
              "blocks": Plan("layers", to_string(range(n_layers))),
              "cogsym": Plan("layers", fixed), "cogsym-ends": Plan("layers", fixed, train_ends=True),
              "cogsym-lora": Plan("lora-layers", fixed),
              "cogsym-lora-matched": Plan("lora-layers", fixed, lora_r=matched_rank(lora_r, n_layers, k))}
    if row in simple:
        return simple[row]
    if row == "budget":
        return Plan("layers", _budget_layers(study))
    start = (n_layers - k) // 2
    fixed_sets = {"middle": range(start, start + k), "bottom": range(k), "top": range(n_layers - k, n_layers)}
    if row in fixed_sets:
        return Plan("layers", to_string(fixed_sets[row]))
    if kind(row) == "random":
        return Plan("layers", to_string(sorted(int(b) for b in random_set(row, seed, n_layers, k))))
    if row == "random-ends":
        return Plan("layers", to_string(sorted(int(b) for b in random_set("random", 0, n_layers, k))), train_ends=True)
    raise CogprobeError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")


def table(n_layers: int, lora_r: int, *, fraction: float = DEFAULT_FRACTION, seed: int = 0,
          study: Path | None = None) -> pd.DataFrame:
    """Every row's `Plan` on a model of n_layers blocks, one line each (row, strategy, layers, train_ends,
    lora_r; layers "" where the strategy takes no --layers, lora_r 0 where no LoRA; train_ends as TrainConfig
    reads it, for the layers strategies: `full` trains everything anyway): `cogprobe ls rows`.
    The budget row's layers come from a study's select stage (`study`); without one, why it cannot run;
    where that stage found no set and the fixed one was used, the row is named so (`label`)."""
    out = []
    for row in ROWS:
        try:
            p = plan(row, n_layers=n_layers, fraction=fraction, lora_r=lora_r, seed=seed, study=study)
        except Skip as e:
            out.append(dict(row=row, strategy="layers", layers=str(e), train_ends=False, lora_r=0))
            continue
        out.append(dict(row=label(row, study), strategy=p.strategy, layers=p.layers or "", train_ends=p.train_ends,
                        lora_r=(p.lora_r or lora_r) if p.lora else 0))
    return pd.DataFrame(out)


def random_set(row: str, seed: int, n_layers: int, k: int) -> np.ndarray:
    """k distinct blocks drawn for a random row: `random` from the seed alone (as before draws
    existed, so earlier studies keep their sets), draw d of `random-d` from (seed, d)."""
    draw = DRAW.match(row)
    rng = np.random.default_rng(seed if draw is None else (seed, int(draw.group(1))))
    return rng.choice(n_layers, size=k, replace=False)


def _budget_layers(study: Path | None) -> str:
    if study is None or not (Path(study) / SELECTION_BUDGET).is_file():
        raise Skip("no budget selection yet (the select stage writes it)")
    selection = io.read_json(Path(study) / SELECTION_BUDGET)
    if "error" in selection and selection.get("fallback") != "fixed":
        raise Skip(f"budget selection failed: {selection['error']}")
    return selection["layers_arg"]


def fixed_used(study: Path | None) -> bool:
    """Whether the study's budget rule found no set and its row trained the fixed set instead (the
    select stage records that choice in selection-budget.json, so the row is what that file says)."""
    path = None if study is None else Path(study) / SELECTION_BUDGET
    return path is not None and path.is_file() and io.read_json(path).get("fallback") == "fixed"


def label(row: str, study: Path | None) -> str:
    """A row's name as the report's tables print it: a budget row that trained the fixed set says so."""
    return FIXED_USED if row == "budget" and fixed_used(study) else row
