"""The converged study's reading, into figures/: its comparisons at step 400 and at the end, and the change.

    python analyses/converged.py otomi=analyses/evidence/converged-tsunkua

Reads a study folder of `cogprobe run --preset converged` (its tables; no weights needed) and writes
figures/converged.md, converged.csv and converged_changes.csv (`cogprobe.study.length` does the work:
the headline's comparisons at each of the study's `compare_steps` and at the end, side by side, and
for each NLL comparison the change from the step to the end with its interval over seeds, the bias
a cap at that step puts on it, the English prose at each reading, the pivot-only controls). It also
brings the study's own report.md (and its figures) up to date with what is done, as the study's last
stage would: a study still running gives what its compared runs allow.
"""
from __future__ import annotations

import argparse

from _common import FIGURES

from cogprobe.core.errors import CogprobeError
from cogprobe.study import evidence, length, report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="LANGUAGE=STUDY_DIR, a folder of `cogprobe run --preset converged`")
    try:
        [(language, folder)] = evidence.parse_studies([p.parse_args().study])
    except CogprobeError as e:
        p.error(str(e))
    print(length.write(language, folder, FIGURES)[0])
    print(report.write_report(folder)[0])


if __name__ == "__main__":
    main()
