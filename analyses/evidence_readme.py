"""Write the evidence study's results into README.md and docs/results.md, between their markers, from figures/:

    python analyses/evidence.py ... && python analyses/evidence_figures.py ...   # first (`make evidence-tables`)
    python analyses/evidence_readme.py

So the results are generated, never typed, and `tests/test_evidence_readme.py` fails when either
file and the committed tables disagree. While any language is still running, only its status goes
in (how many runs are compared of those planned): no finding is quoted from a partial study. Once
every language is done, README.md gets the short form (`headline`: the headline table and the
sentences against the paper, then a link), and docs/results.md the whole block (`block`: every
table, the sentences its intervals allow, the wall times and the figures), as `analyses/evidence.py`
and `analyses/evidence_figures.py` wrote them. The figures are linked as `figures/NAME.png`, which
`docs/figures` (a link to the repository's `figures/`) resolves in the docs site.

The converged study (`analyses/converged.py`, figures/converged.md) has its own pair of markers in
both pages: README.md gets what is compared so far, the headline at step 400 and at the end side by
side and the change between them (`converged_headline`); docs/results.md all of figures/converged.md.
That study fills in over sessions, so its reading is quoted as it stands, its seed counts first: each
cell's interval is valid at the seeds it has, and a cell with fewer seeds than its column says so.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from _common import FIGURES

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
START = "<!-- evidence results: written by analyses/evidence_readme.py from figures/, do not edit by hand -->"
END = "<!-- end of evidence results -->"
FIGURE_NAMES = {"evidence_share_curves.png": "Share of full fine-tuning's dev gain against step, per row",
                "evidence_same_size.png": "CogSym against the sets of its size, random draws one by one",
                "evidence_specialization_{}.png": "Specialization curves of the probe run, {}"}


CONVERGED_START = ("<!-- converged results: written by analyses/evidence_readme.py from figures/converged.md, "
                   "do not edit by hand -->")
CONVERGED_END = "<!-- end of converged results -->"
# the paragraphs of figures/converged.md that README.md quotes, by how they begin
CONVERGED = ("Compared so far", "| question |", "From the earlier step")
CONVERGED_MORE = ("The English prose and the pivot-only controls at each reading: "
                  "[docs/results.md](docs/results.md#the-converged-study).")

# the paragraphs of figures/evidence.md that README.md quotes, by how they begin
HEADLINE = ("Headline:", "| question |", "**Against the paper**")
MORE = "Every table, each comparison in words, the cost and the figures: [docs/results.md](docs/results.md)."


def in_progress(figures: Path) -> str | None:
    """The status of a study still running (no finding), or None once every language is done."""
    status = pd.read_csv(figures / "evidence_status.csv")
    if not (status["compared"] < status["planned"]).any():
        return None
    runs = [f"- **{s.language}**: {s.compared} of {s.planned} runs compared ({s.rows} rows × seeds {s.seeds})"
            for s in status.itertuples()]
    return "\n\n".join(["**In progress.**\n\n" + "\n".join(runs),
                         "No finding of the study is quoted here before every language is done; what is "
                         "compared so far is in `figures/evidence.md` (`make evidence-tables` redraws it)."])


def headline(figures: Path) -> str:
    """README.md's short form: the headline table and the sentences against the paper, then a link."""
    if (running := in_progress(figures)) is not None:
        return running
    return "\n\n".join([*quoted(figures / "evidence.md", HEADLINE), MORE])


def converged_headline(figures: Path) -> str:
    """README.md's converged reading: what is compared, the headline at each reading, the change."""
    return "\n\n".join([*quoted(figures / "converged.md", CONVERGED), CONVERGED_MORE])


def quoted(page: Path, starts: tuple[str, ...]) -> list[str]:
    """The paragraphs of `page` that begin with each of `starts`, in that order."""
    paragraphs = page.read_text().strip().split("\n\n")
    found = [next((p for p in paragraphs if p.startswith(start)), None) for start in starts]
    if None in found:
        missing = [s for s, p in zip(starts, found) if p is None]
        raise CogprobeError(f"{page} has no paragraph beginning {missing}; the README quotes them")
    return found


def block(figures: Path) -> str:
    """docs/results.md's evidence block, from the tables in `figures`."""
    if (running := in_progress(figures)) is not None:
        return running
    languages = pd.read_csv(figures / "evidence_status.csv")["language"]
    lines = [(figures / "evidence.md").read_text().strip()]
    for name, caption in FIGURE_NAMES.items():
        for language in (languages if "{}" in name else [None]):
            png = name.format(language)
            if (figures / png).is_file():
                lines.append(f"![{caption.format(language)}](figures/{png})")
    return "\n\n".join(lines)


def spliced(page: str, text: str, name: str = "README.md", start: str = START, end: str = END) -> str:
    """`page` (the text of file `name`) with the text between its markers `start` and `end` replaced by `text`."""
    if page.count(start) != 1 or page.count(end) != 1 or page.index(start) > page.index(end):
        raise CogprobeError(f"{name} needs the two markers once each, in order: {start!r} then {end!r}; "
                            "put them where the results go")
    head, rest = page.split(start)
    return f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}"


def generated(figures: Path = FIGURES) -> dict[Path, str]:
    """What README.md and docs/results.md should hold, from the committed files and the tables in `figures`."""
    converged = dict(start=CONVERGED_START, end=CONVERGED_END)
    readme = spliced(README.read_text(), headline(figures))
    results = spliced(RESULTS.read_text(), block(figures), "docs/results.md")
    return {README: spliced(readme, converged_headline(figures), **converged),
            RESULTS: spliced(results, (figures / "converged.md").read_text().strip(), "docs/results.md", **converged)}


def main() -> None:
    try:
        pages = generated()
    except (CogprobeError, FileNotFoundError) as e:
        sys.exit(f"evidence_readme: {e} (run `make evidence-tables` first if a figures/evidence_* file is missing)")
    for path, text in pages.items():
        io.write_text(path, text)
        print(path)


if __name__ == "__main__":
    main()
