"""Are two study folders' results the same? Every table compared cell for cell (per-example lists
included), timing columns left out, old column names read as the new ones; the selections' sets.

    python analyses/same_results.py OLD_STUDY NEW_STUDY      # exit 1 if any table differs

Used to check that a refactoring changes no result: run one study config at the commit before and
at the commit after (each in its own checkout), then compare the two folders.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from cogprobe.core import io
from cogprobe.core.layout import (ACTIVATIONS, BASELINE, COMPARE, SCORES, SELECTION_BUDGET, SELECTION_FIXED, SWEEPS,
                             TRANSLATIONS)

TIMING = ("sec_per_step", "peak_mem_mb")   # measured, not computed: they differ between any two runs


def same_table(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    a, b = (t.drop(columns=[c for c in TIMING if c in t.columns]) for t in (a, b))
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        return False
    lists = [c for c in a.columns if a[c].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any()]
    return a.drop(columns=lists).equals(b.drop(columns=lists)) and all(
        (a[c].map(list) == b[c].map(list)).all() for c in lists)


def main(old: Path, new: Path) -> int:
    differ = 0
    for name in (BASELINE, COMPARE, SCORES, TRANSLATIONS, SWEEPS, ACTIVATIONS):
        if not (old / name).exists() or not (new / name).exists():
            print(f"{name}: missing in {'old' if not (old / name).exists() else 'new'}")
            continue
        read = io.read_csv if name.endswith(".csv") else io.read_parquet
        same = same_table(read(old / name), read(new / name))
        differ += not same
        print(f"{name}: {'identical' if same else 'DIFFERENT'}")
    for name in (SELECTION_FIXED, SELECTION_BUDGET):
        here = [(folder / name).is_file() for folder in (old, new)]
        if not all(here):   # a study derives the budget set only where a row trains it
            differ += any(here)
            print(f"{name}: {'not in either' if not any(here) else 'DIFFERENT: only in ' + ('old' if here[0] else 'new')}")
            continue
        a, b = (json.loads((folder / name).read_text()) for folder in (old, new))
        same = a.get("layers") == b.get("layers")
        differ += not same
        print(f"{name}: {'same set' if same else 'DIFFERENT set'} {a.get('layers_arg')} / {b.get('layers_arg')} "
              f"({len(a.get('candidates', []))} / {len(b.get('candidates', []))} candidates)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
