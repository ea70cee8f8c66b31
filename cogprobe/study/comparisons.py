"""The comparisons that matter, as data (`comparisons.toml`), read once for every reader.

The study's verdict table and report (`verdicts`, `report`) and the evidence headline (`evidence`)
each kept a list of which rows to compare; two lists drift. Here each comparison is written once,
with its two rows, its quantity and the question the headline asks, and `table` lists them for
`cogprobe ls comparisons`. The rows themselves are defined in `rows` only; this file names them.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cogprobe.core.errors import CogprobeError
from cogprobe.study.rows import ROWS

FILE = Path(__file__).with_name("comparisons.toml")
QUANTITIES = ("rel_deviation", "chrf_rel_deviation", "share_minus")
RANDOM = "random"   # as `other`: every random draw (and, in the evidence tables, all draws pooled)


@dataclass(frozen=True)
class Comparison:
    """row against other by quantity, and the headline's question with the bar filled in."""
    row: str
    other: str
    quantity: str
    question: str

    @property
    def name(self) -> str:
        return f"{self.row}/{self.other}"


def read(path: Path = FILE) -> tuple[float, tuple[Comparison, ...], tuple[Comparison, ...]]:
    """(bar, every comparison in the file's order, the report's in its order), checked: each row a
    row of `rows.ROWS`, each quantity known, no comparison twice, each report name an NLL comparison (all
    of that pair's NLL quantities)."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    bar = data["bar"]
    if not 0 < bar < 1:
        raise CogprobeError(f"{path}: bar = {bar}; give the relative deviation the paper allows, e.g. 0.03")
    found = []
    for entry in data["comparison"]:
        c = Comparison(entry["row"], entry["other"], entry["quantity"], entry["question"].format(bar=f"{bar:.0%}"))
        if not {c.row, c.other} <= set(ROWS):
            raise CogprobeError(f"{path}: comparison {c.name}: rows must be of {', '.join(ROWS)}")
        if c.quantity not in QUANTITIES:
            raise CogprobeError(f"{path}: comparison {c.name}: quantity {c.quantity!r}; use one of {QUANTITIES}")
        found.append(c)
    if len(set((c.name, c.quantity) for c in found)) < len(found):
        raise CogprobeError(f"{path}: a comparison is listed twice; keep one")
    report = []
    for name in data["report"]:
        nll = [c for c in found if c.name == name and c.quantity != "chrf_rel_deviation"]
        if not nll:
            raise CogprobeError(f"{path}: report names {name!r}, which is no NLL comparison of the file")
        report += nll
    return bar, tuple(found), tuple(report)


BAR, COMPARISONS, REPORT = read()


def table() -> pd.DataFrame:
    """Every comparison, one line each (row, other, quantity, question, in_report): `cogprobe ls comparisons`."""
    return pd.DataFrame([dict(row=c.row, other=c.other, quantity=c.quantity, question=c.question,
                              in_report=c in REPORT) for c in COMPARISONS])
