"""The evidence results in README.md (short form) and docs/results.md (whole block) are generated from the
committed tables (analyses/evidence_readme.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "analyses"))

from evidence_readme import (CONVERGED_END, CONVERGED_START, END, README, RESULTS, START, block,  # noqa: E402
                             converged_headline, generated, headline, spliced)

from cogprobe.core.errors import CogprobeError  # noqa: E402


@pytest.mark.parametrize("page", [README, RESULTS], ids=["README.md", "docs/results.md"])
def test_each_page_holds_what_the_committed_tables_give(page):
    assert generated(ROOT / "figures")[page] == page.read_text(), "rerun `python analyses/evidence_readme.py`"


def test_a_changed_table_makes_both_pages_stale(tmp_path):
    """A number of the headline table moved in figures/ leaves neither committed page current."""
    _copied(tmp_path)
    text = (tmp_path / "evidence.md").read_text()
    (tmp_path / "evidence.md").write_text(text.replace("6.0% [-7.0%, 18.9%]", "6.1% [-7.0%, 18.9%]"))
    for page, text in generated(tmp_path).items():
        assert text != page.read_text(), page


def _copied(folder: Path) -> Path:
    for name in ("evidence.md", "evidence_status.csv", "converged.md"):
        (folder / name).write_text((ROOT / "figures" / name).read_text())
    return folder


def test_a_changed_converged_reading_makes_both_pages_stale(tmp_path):
    """The converged block is generated as the evidence block is: its headline in the README, all of
    figures/converged.md in docs/results.md, each between its own markers."""
    text = (_copied(tmp_path) / "converged.md").read_text()
    status = text.split("\n\n")[0]
    assert status.startswith("Compared so far") and status in README.read_text() and status in RESULTS.read_text()
    (tmp_path / "converged.md").write_text(text.replace(status, status.replace("(", "(of ", 1)))
    for page, text in generated(tmp_path).items():
        assert text != page.read_text(), page


def test_the_readme_quotes_what_is_compared_the_headline_and_its_change_only(tmp_path):
    (tmp_path / "converged.md").write_text(
        "Compared so far: full 0.\n\n| question | a |\n|---|---|\n| q | no |\n\n"
        "From the earlier step to the end:\n- moved\n\n| row | english |\n|---|---|\n")
    text = converged_headline(tmp_path)
    assert text.startswith("Compared so far: full 0.") and "| q | no |" in text and "- moved" in text
    assert "| row | english |" not in text and "(docs/results.md#the-converged-study)" in text
    (tmp_path / "converged.md").write_text("Compared so far: full 0.\n")
    with pytest.raises(CogprobeError, match="From the earlier step"):
        converged_headline(tmp_path)
    readme = f"{START}\n{END}\n{CONVERGED_START}\nold\n{CONVERGED_END}\n"
    assert (spliced(readme, "new", start=CONVERGED_START, end=CONVERGED_END)
            == f"{START}\n{END}\n{CONVERGED_START}\nnew\n{CONVERGED_END}\n")


def _tables(folder: Path, compared: list[int]) -> Path:
    pd.DataFrame([dict(language=lang, compared=c, planned=28, rows=14, seeds="0,1")
                  for lang, c in zip(["nahuatl", "otomi"], compared)]).to_csv(folder / "evidence_status.csv",
                                                                               index=False)
    (folder / "evidence.md").write_text("| row | nll |\n|---|---|\n| cogsym | 3.1 [3.0, 3.2] |\n")
    (folder / "evidence_share_curves.png").write_bytes(b"png")
    return folder


def test_a_study_still_running_gives_its_status_and_no_finding(tmp_path):
    text = block(_tables(tmp_path, [28, 5]))
    assert "**otomi**: 5 of 28 runs compared" in text and "**In progress.**" in text
    assert "**nahuatl**: 28 of 28 runs compared" in text
    assert "cogsym" not in text and "png" not in text            # no table, no figure, while one runs


def test_a_finished_study_gives_its_tables_and_the_figures_that_exist(tmp_path):
    text = block(_tables(tmp_path, [28, 28]))
    assert "| cogsym | 3.1 [3.0, 3.2] |" in text
    assert "(figures/evidence_share_curves.png)" in text and "specialization" not in text


def test_the_readme_gets_the_headline_and_the_sentences_against_the_paper_only(tmp_path):
    _tables(tmp_path, [28, 28])
    (tmp_path / "evidence.md").write_text("Headline: how to read it.\n\n| question | a |\n|---|---|\n| q | yes |\n\n"
                                          "**Against the paper** (setting):\n- claim one\n\n| row | nll |\n|---|---|\n")
    text = headline(tmp_path)
    assert text.startswith("Headline:") and "| q | yes |" in text and "- claim one" in text
    assert "| row | nll |" not in text and "png" not in text and "(docs/results.md)" in text
    assert "**In progress.**" in headline(_tables(tmp_path, [28, 5]))
    with pytest.raises(CogprobeError, match="Against the paper"):
        headline(_tables(tmp_path, [28, 28]))


def test_splice_replaces_only_between_the_markers():
    readme = f"# title\n\nbefore\n{START}\nold text\n{END}\nafter\n"
    new = spliced(readme, "new text")
    assert new == f"# title\n\nbefore\n{START}\nnew text\n{END}\nafter\n"
    assert spliced(new, "new text") == new                        # idempotent
    for broken in (readme.replace(END, ""), readme + START, f"{END}\n{START}\n"):
        with pytest.raises(CogprobeError, match="markers"):
            spliced(broken, "x")
