"""The evidence study's headline tables and words, every language side by side, into figures/:

    python analyses/evidence.py nahuatl=analyses/evidence/axolotl otomi=analyses/evidence/tsunkua

Reads each study folder of `cogprobe run --preset standard` (its tables; no weights needed) and writes
figures/evidence.csv, evidence_rows.csv, evidence_cost.csv, evidence_status.csv and evidence.md: what
each holds is in `cogprobe.study.evidence`, which does the work; this script only says where.
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
    print(evidence.write(studies, FIGURES)[0])


if __name__ == "__main__":
    main()
