"""The evidence results in README.md (short form) and docs/results.md (whole block) are generated from the
committed tables (analyses/evidence_readme.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "analyses"))

from evidence_readme import END, README, RESULTS, START, block, generated, headline, spliced  # noqa: E402

from cogprobe.core.errors import CogprobeError  # noqa: E402


@pytest.mark.parametrize("page", [README, RESULTS], ids=["README.md", "docs/results.md"])
def test_each_page_holds_what_the_committed_tables_give(page):
    assert generated(ROOT / "figures")[page] == page.read_text(), "rerun `python analyses/evidence_readme.py`"


def test_a_changed_table_makes_both_pages_stale(tmp_path):
    """A number of the headline table moved in figures/ leaves neither committed page current."""
    for name in ("evidence.md", "evidence_status.csv"):
        (tmp_path / name).write_text((ROOT / "figures" / name).read_text())
    text = (tmp_path / "evidence.md").read_text()
    (tmp_path / "evidence.md").write_text(text.replace("6.0% [-7.0%, 18.9%]", "6.1% [-7.0%, 18.9%]"))
    for page, text in generated(tmp_path).items():
        assert text != page.read_text(), page


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
