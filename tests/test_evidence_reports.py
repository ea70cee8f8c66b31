"""Every committed study report (analyses/evidence/*/report.md) states the README's pooled verdicts for
its language, cell for cell, and shows no n/a where the data exist (issue 39); the converged study's
report, whose reading is figures/converged.md, shows no n/a either."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cogprobe.study.report import POOLED

ROOT = Path(__file__).resolve().parent.parent


def _languages() -> dict[str, str]:
    """{study folder under analyses/evidence: language}, as `make evidence-tables` names them."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "analyses/evidence.py" in x)
    return {folder: language for language, folder in re.findall(r"(\w+)=\$\(EVIDENCE\)/(\w+)", line)}


def _verdicts(text: str) -> dict[tuple[str, str], str]:
    """{(question, column): cell} of the first table that begins "| question |"."""
    lines = text[text.index("| question |"):].split("\n\n", 1)[0].splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out.update({(cells[0], column): cell for column, cell in zip(columns, cells[1:])})
    return out


STUDIES = sorted(_languages().items())
# the converged study (`make converged`): its reading is figures/converged.md, beside the README's headline
CONVERGED = re.search(r"--preset converged --out \$\(EVIDENCE\)/([\w-]+)", (ROOT / "Makefile").read_text()).group(1)


def test_every_committed_study_has_a_report_and_a_language():
    reports = {p.parent.name for p in (ROOT / "analyses" / "evidence").glob("*/report.md")}
    assert {folder for folder, _ in STUDIES} | {CONVERGED} == reports


@pytest.mark.parametrize("folder, language", STUDIES)
def test_each_report_states_the_readmes_pooled_verdicts(folder, language):
    readme = _verdicts((ROOT / "README.md").read_text())
    report = (ROOT / "analyses" / "evidence" / folder / "report.md").read_text()
    assert f"## {POOLED}" in report
    mine = _verdicts(report[report.index(f"## {POOLED}"):])
    # the report labels its columns by its corpus (`folder`), the README by language
    theirs = {(q, column.replace(language, folder, 1)): cell for (q, column), cell in readme.items()
              if column.startswith(f"{language} ")}
    assert mine == theirs


@pytest.mark.parametrize("folder, language", STUDIES + [(CONVERGED, "otomi")])
def test_no_report_shows_na_where_the_data_exist(folder, language):
    report = (ROOT / "analyses" / "evidence" / folder / "report.md").read_text()
    cells = [c.strip() for line in report.splitlines() if line.startswith("|") for c in line.strip("|").split("|")]
    assert cells and not [c for c in cells if "n/a" in c]   # every table cell where the data exist has a number
