"""The evidence study's figures, every language side by side, into figures/:

    python analyses/evidence_figures.py nahuatl=analyses/evidence/axolotl otomi=analyses/evidence/tsunkua

figures/evidence_share_curves.png, evidence_specialization_<language>.png and evidence_same_size.png,
each with the CSV of its numbers beside it: what each shows is in `cogprobe.study.evidence.figures`.
The same-size figure reads figures/evidence_rows.csv, so `analyses/evidence.py` runs first, as
`make evidence-tables` does. A study still running gives the figures of what it has.
"""
from __future__ import annotations

import argparse

from _common import FIGURES

from cogprobe.core.errors import CogprobeError
from cogprobe.study import evidence


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", help="LANGUAGE=STUDY_DIR, a folder of `cogprobe run --preset standard`")
    try:
        studies = evidence.parse_studies(p.parse_args().studies)
    except CogprobeError as e:
        p.error(str(e))
    for path in evidence.figures(studies, FIGURES):
        print(path)


if __name__ == "__main__":
    main()
