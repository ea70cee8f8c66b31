"""Shared by the analysis scripts: read a study folder, write into figures/ (PNG + the CSV behind it)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from cogprobe.plots import style
from cogprobe.study.evidence_tables import study_table as table  # noqa: F401  (the scripts' checked read)

FIGURES = Path(os.environ.get("COGPROBE_FIGURES", Path(__file__).resolve().parent.parent / "figures"))


def study_dir() -> Path:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {Path(sys.argv[0]).name} STUDY_DIR   (a folder written by `cogprobe run`)")
    return Path(sys.argv[1])


def publish(fig, data: pd.DataFrame, stem: str) -> None:
    """figures/STEM.png and figures/STEM.csv (the numbers the figure shows; per-example lists stay in the
    study's tables)."""
    print(style.publish(fig, data, FIGURES / stem))
