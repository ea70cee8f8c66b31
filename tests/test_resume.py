"""The resume state format (`resume`): a round trip restores the optimizer exactly, other
parameters are refused, a changed file is caught, and only the kept checkpoint keeps one."""
from __future__ import annotations

import pytest
import torch

from cogprobe.core import io
from cogprobe.tuning import resume
from cogprobe.core.errors import CogprobeError


def stepped_optimizer(seed: int = 0) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:],
                             "weight_decay": 0.0}], lr=1e-2)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    return opt, params


def saved(tmp_path, names=("w", "b")):
    opt, _ = stepped_optimizer()
    folder = tmp_path / "step-2"
    folder.mkdir()
    resume.write(folder, resume.capture(opt, list(names), step=2, tokens_seen=99))
    recorded = {name: io.file_sha256(folder / name) for name in resume.FILES}
    return opt, folder, recorded


def test_round_trip_restores_the_optimizer_exactly(tmp_path):
    opt, folder, recorded = saved(tmp_path)
    fresh, _ = stepped_optimizer(seed=1)  # other values, same shapes
    info = resume.restore(fresh, folder, ["w", "b"], recorded)
    assert (info["step"], info["tokens_seen"]) == (2, 99)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][idx][key]), (idx, key)


def test_other_parameters_and_changed_files_are_refused(tmp_path):
    _, folder, recorded = saved(tmp_path)
    fresh, _ = stepped_optimizer()
    with pytest.raises(CogprobeError, match="other trainable parameters"):
        resume.restore(fresh, folder, ["w", "bias"], recorded)
    data = bytearray((folder / resume.OPTIMIZER).read_bytes())
    data[-1] ^= 1
    (folder / resume.OPTIMIZER).write_bytes(bytes(data))
    with pytest.raises(CogprobeError):
        resume.restore(fresh, folder, ["w", "b"], recorded)
    (folder / resume.STATE).unlink()
    with pytest.raises(CogprobeError, match="no resume state"):
        resume.restore(fresh, folder, ["w", "b"], recorded)


def test_drop_keeps_only_the_kept_step(tmp_path):
    opt, _ = stepped_optimizer()
    folders = []
    for step in (2, 4, 6):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        resume.write(folder, resume.capture(opt, ["w", "b"], step=step, tokens_seen=step))
        folders.append((step, folder))
    resume.drop(folders, keep=4)
    assert [resume.present(f) for _, f in folders] == [False, True, False]
    assert not any(p.name == ".old-resume" for _, f in folders for p in f.iterdir())
    resume.drop(folders, keep=None)
    assert not any(resume.present(f) for _, f in folders)
