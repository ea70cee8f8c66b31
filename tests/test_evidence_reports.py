"""Every committed study report (analyses/evidence/*/report.md) states the README's pooled verdicts for
its language, cell for cell, and shows no n/a where the data exist (issue 39); the converged study's
report, whose reading is figures/converged.md, shows no n/a either."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cogprobe.study.report import POOLED, run_versions

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


@pytest.mark.parametrize("folder", [f for f, _ in STUDIES] + [CONVERGED])
def test_no_report_prints_a_question_its_study_does_not_ask(folder):
    """A headline question whose rows the study does not plan (random-ends in a 400-step study) is left
    out of its table, not printed as a row of empty cells."""
    report = (ROOT / "analyses" / "evidence" / folder / "report.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in report.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    assert rows and not [r[0] for r in rows if len(r) > 1 and not any(r[1:])]


@pytest.mark.parametrize("folder", [f for f, _ in STUDIES] + [CONVERGED])
def test_no_report_prints_an_empty_list_of_versions(folder):
    report = (ROOT / "analyses" / "evidence" / folder / "report.md").read_text()
    assert re.search(r"Versions: \w", report), "rerun the report: it printed no version of anything"


def test_the_versions_are_those_a_run_recorded_or_said_to_be_unknown(tmp_path):
    """runs/ is never committed: a study continued on a fresh machine may keep no run's manifest."""
    shutil.copy(ROOT / "analyses" / "evidence" / CONVERGED / "study.json", tmp_path / "study.json")
    assert run_versions(tmp_path).startswith("not known here")
    for run, torch in (("random-ends-s1", "2.0"), ("full-s0", "2.1")):
        (tmp_path / "runs" / run).mkdir(parents=True)
        manifest = {"config": {"steps": 1}, "base": {"fingerprint": "f"}, "save_steps": [],
                    "versions": {"torch": torch}}
        (tmp_path / "runs" / run / "manifest.json").write_text(json.dumps(manifest))
        assert run_versions(tmp_path) == f"torch {torch}"   # any run's, full fine-tuning's first once it is there
