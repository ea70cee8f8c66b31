"""Experiment tracking through accelerate's trackers: tensorboard, wandb, mlflow, ... (`--report-to`).

cogprobe writes no logging code of its own: it names the trackers to the Accelerator,
which writes local trackers' files under RUN/tracking/, and hands it the same per-step
values that go into train_log.parquet. `none` (the default) adds nothing.
"""
from __future__ import annotations

from pathlib import Path

from cogprobe.core.errors import CogprobeError

TRACKING = "tracking"   # folder of the run that local trackers (tensorboard, ...) write into
PROJECT = "cogprobe"


def trackers(report_to) -> list[str]:
    """`none` | `all` | a tracker name | a comma list (or list) -> accelerate's tracker names, checked."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    names = [n.strip() for n in (report_to.split(",") if isinstance(report_to, str) else report_to or [])]
    names = [n for n in names if n and n != "none"]
    known, ready = LoggerType.list(), {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise CogprobeError(f"--report-to {name!r} is not a tracker accelerate knows; use none or "
                                f"{', '.join(known)}")
        if name != "all" and name not in ready:
            raise CogprobeError(f"--report-to {name}: the {name} package is not installed; pip install {name}")
    return names


def accelerator_kwargs(report_to, out: Path) -> dict:
    """Arguments for `Accelerator(...)`: the trackers and where local ones write."""
    names = trackers(report_to)
    return dict(log_with=names, project_dir=str(Path(out) / TRACKING)) if names else {}


def start(acc, config: dict) -> None:
    """Open the trackers with the run's config (scalars as they are, anything else as text)."""
    if acc.log_with:
        acc.init_trackers(PROJECT, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                           for k, v in config.items()})
