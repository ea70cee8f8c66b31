"""The evidence study's figures, every language side by side:

    python analyses/evidence_figures.py nahuatl=analyses/evidence/axolotl otomi=analyses/evidence/tsunkua

figures/evidence_share_curves.png: each row's dev NLL gain as a share of full fine-tuning's final
one, against step (mean over seeds; one panel row per language): learning speed and end point apart.
figures/evidence_specialization_<language>.png: the specialization curves of the study's probe run
(the `blocks` run of the first seed, the run the budget set is derived from) at its last checkpoint,
with 95% paired-bootstrap bands over its dev pairs.
figures/evidence_same_size.png: CogSym against the sets of its size (middle, bottom, top, each
random draw), each one's share of full fine-tuning's test-NLL gain with its interval, from
figures/evidence_rows.csv (so `analyses/evidence.py` runs first, as `make evidence-tables` does).
The CSV beside each PNG holds its numbers.
A study still running gives the figures of what it has (a line says what is not there yet).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from _common import FIGURES, publish, table

from cogprobe.core import io
from cogprobe.core import layout
from cogprobe.study.figures import same_size_rows, same_size_shares, share_curves
from cogprobe.plots.sweeps import specialization_curves


def last_checkpoint_reverts(sweeps: pd.DataFrame) -> pd.DataFrame:
    """Revert rows of the last swept checkpoint (the probe run's end point)."""
    revert = sweeps[(sweeps["mode"] == "revert") & ~sweeps["ends"].astype(bool)]
    return revert[revert["checkpoint_step"] == revert["checkpoint_step"].max()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", help="LANGUAGE=STUDY_DIR, a folder of `cogprobe run --preset standard`")
    a = p.parse_args()
    curves, languages = [], []
    for spec in a.studies:
        language, _, folder = spec.partition("=")
        languages.append(language)
        if not folder:
            p.error(f"{spec!r}: write LANGUAGE=STUDY_DIR, e.g. nahuatl=analyses/evidence/axolotl")
        if (Path(folder) / layout.DEV_CURVES).is_file():
            curves.append(table(Path(folder), layout.DEV_CURVES).assign(language=language))
        else:
            print(f"{language}: no run compared yet, so no share curves (the study is still running)")
        if "probe" in io.read_json(Path(folder) / layout.STUDY).get(layout.STAGE_SECONDS, {}):   # sweeps whole
            sweeps = last_checkpoint_reverts(table(Path(folder), layout.SWEEPS))
            publish(specialization_curves(sweeps), sweeps, f"evidence_specialization_{language}")
        else:
            print(f"{language}: not probed yet, so no specialization curves (the study is still running)")
    if curves:
        curves = pd.concat(curves, ignore_index=True)
        publish(share_curves(curves), curves, "evidence_share_curves")
    rows = FIGURES / "evidence_rows.csv"
    if rows.is_file():
        rows = pd.read_csv(rows)
        sets = same_size_rows(rows[rows["language"].isin(languages)])
        if not sets.empty:
            publish(same_size_shares(sets), sets, "evidence_same_size")
    else:
        print(f"no {rows}, so no same-size figure: run analyses/evidence.py first")


if __name__ == "__main__":
    main()
