"""Shared by the analysis scripts: read a study folder, write into figures/ (PNG + the CSV behind it)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError
from cogprobe.plots import style

FIGURES = Path(os.environ.get("COGPROBE_FIGURES", Path(__file__).resolve().parent.parent / "figures"))


def study_dir() -> Path:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {Path(sys.argv[0]).name} STUDY_DIR   (a folder written by `cogprobe run`)")
    return Path(sys.argv[1])


def table(study: Path, name: str) -> pd.DataFrame:
    """A study table read through `io`, so a folder written before a column was renamed reads with the
    new names (compare's `strategy` as `row`)."""
    path = study / name
    if not path.is_file():
        raise CogprobeError(f"{path} is missing; run `cogprobe run --out {study}` first")
    return io.read_parquet(path) if name.endswith(".parquet") else io.read_csv(path)


def publish(fig, data: pd.DataFrame, stem: str) -> None:
    """figures/STEM.png and figures/STEM.csv (the numbers the figure shows; per-example lists stay in the
    study's tables)."""
    print(style.publish(fig, data, FIGURES / stem))
