"""Write the evidence study's results into README.md, between its two markers, from figures/:

    python analyses/evidence.py ... && python analyses/evidence_figures.py ...   # first (`make evidence-tables`)
    python analyses/evidence_readme.py

So the README's headline is generated, never typed, and `tests/test_evidence_readme.py` fails when
the README and the committed tables disagree. While any language is still running, only its status
goes in (how many runs are compared of those planned): no finding is quoted from a partial study.
Once every language is done: the tables, the sentences its intervals allow, the wall times and the
figures, as `analyses/evidence.py` and `analyses/evidence_figures.py` wrote them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from _common import FIGURES

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- evidence results: written by analyses/evidence_readme.py from figures/, do not edit by hand -->"
END = "<!-- end of evidence results -->"
FIGURE_NAMES = {"evidence_share_curves.png": "Share of full fine-tuning's dev gain against step, per row",
                "evidence_same_size.png": "CogSym against the sets of its size, random draws one by one",
                "evidence_specialization_{}.png": "Specialization curves of the probe run, {}"}


def block(figures: Path) -> str:
    """The README's evidence block, from the tables in `figures`."""
    status = pd.read_csv(figures / "evidence_status.csv")
    if (status["compared"] < status["planned"]).any():
        runs = [f"- **{s.language}**: {s.compared} of {s.planned} runs compared ({s.rows} rows × seeds {s.seeds})"
                for s in status.itertuples()]
        return "\n\n".join(["**In progress.**\n\n" + "\n".join(runs),
                             "No finding of the study is quoted here before every language is done; what is "
                             "compared so far is in `figures/evidence.md` (`make evidence-tables` redraws it)."])
    lines = [(figures / "evidence.md").read_text().strip()]
    for name, caption in FIGURE_NAMES.items():
        for language in (status["language"] if "{}" in name else [None]):
            png = name.format(language)
            if (figures / png).is_file():
                lines.append(f"![{caption.format(language)}](figures/{png})")
    return "\n\n".join(lines)


def spliced(readme: str, text: str) -> str:
    """`readme` with the text between its markers replaced by `text`."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise CogprobeError(f"README.md needs the two markers once each, in order: {START!r} then {END!r}; "
                            "put them where the evidence results go")
    head, rest = readme.split(START)
    return f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}"


def main() -> None:
    try:
        io.write_text(README, spliced(README.read_text(), block(FIGURES)))
    except (CogprobeError, FileNotFoundError) as e:
        sys.exit(f"evidence_readme: {e} (run `make evidence-tables` first if a figures/evidence_* file is missing)")
    print(README)


if __name__ == "__main__":
    main()
