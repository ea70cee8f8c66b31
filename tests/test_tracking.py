"""--report-to through accelerate's trackers: tensorboard event files with the loss and lr, offline."""
from __future__ import annotations

import pandas as pd
import pytest

from cogprobe.core.errors import CogprobeError
from cogprobe.tuning.tracking import trackers
from cogprobe.tuning.loop import TrainConfig, train
from tiny import save_tiny


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {folder}"
    out = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_loss_and_lr_of_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    pd.DataFrame([dict(es=f"la casa {i}", nah=f"in calli {i}") for i in range(40)]).to_csv(tmp_path / "p.csv", index=False)
    run = train(TrainConfig(model=save_tiny(tmp_path / "m"), corpus=tmp_path / "p.csv", out=tmp_path / "run",
                            strategy="layers", layers="0,5", steps=3, batch_size=2, seq_len=16, warmup=0,
                            save_steps="0,3", threads=1, progress=False, report_to="tensorboard"))
    log = pd.read_parquet(run / "train_log.parquet")
    seen = _scalars(run / "tracking")
    for name in ("loss", "lr"):
        steps, values = zip(*sorted(seen[f"train/{name}"]))
        assert list(steps) == [1, 2, 3]
        assert values == pytest.approx(list(log[name]), rel=1e-6)


def test_unknown_or_missing_tracker_is_one_line():
    assert trackers("none") == [] and trackers("tensorboard") == ["tensorboard"]
    with pytest.raises(CogprobeError, match="not a tracker accelerate knows"):
        trackers("tensorbored")
