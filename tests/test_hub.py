"""Hub ids resolved offline from a Hugging Face cache laid out by hand, and stepN revisions as checkpoints."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.core.errors import CogprobeError
from cogprobe.models.loading import embedded_dir, load_model
from tiny import save_tiny


def lay_out(cache: Path, repo: str, revisions: dict[str, Path], link: bool = False) -> None:
    """The cache layout huggingface_hub writes: refs/<rev> holds a commit, snapshots/<commit>/ the files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for i, (rev, folder) in enumerate(revisions.items()):
        commit = f"{i + 1:040x}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / rev).write_text(commit)
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in folder.iterdir():
            if f.is_file() and not f.name.startswith("cogprobe-"):
                (snap / f.name).symlink_to(f) if link else shutil.copy(f, snap / f.name)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folders = {rev: save_tiny(tmp_path / rev, "llama", seed=s) for rev, s in
               (("main", 0), ("step2", 1), ("step10", 2))}
    lay_out(tmp_path / "hub", "org/tiny", folders)
    return tmp_path / "hub"


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 2, 3]])).logits


def test_hub_id_and_revision_load_from_the_cache(cache, tmp_path):
    main, _ = load_model("org/tiny")
    step2, tok = load_model("org/tiny@step2")
    assert torch.equal(_logits(main), _logits(load_model(tmp_path / "main")[0]))
    assert torch.equal(_logits(step2), _logits(load_model(tmp_path / "step2")[0]))
    assert len(tok) > 0


def test_missing_model_names_the_cache(cache):
    with pytest.raises(CogprobeError, match=f"org/absent@main is not in the Hugging Face cache {cache}") as info:
        load_model("org/absent")
    assert "\n" not in str(info.value)


def test_step_revisions_are_a_checkpoint_list(cache):
    ckpts = Checkpoints.open("org/tiny@step*", base="org/tiny")
    assert ckpts.steps == [0, 2, 10]
    assert torch.equal(_logits(ckpts.load(10)[0]), _logits(load_model("org/tiny@step10")[0]))
    assert Checkpoints.open("org/tiny@step10,step2").steps == [2, 10]   # the first is the reference
    with pytest.raises(CogprobeError, match="not stepN branches"):
        Checkpoints.open("org/tiny@main,step2")


@pytest.mark.slow
def test_embedded_model_through_a_hand_made_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    if not embedded_dir().is_dir():
        pytest.skip("the embedded model is not prepared (cogprobe prepare)")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lay_out(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", {"main": embedded_dir()}, link=True)
    ours, _ = load_model("smollm2-135m")
    theirs, _ = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert torch.equal(_logits(ours), _logits(theirs))


def test_sweep_cli_over_step_revisions(cache, tmp_path, capsys):
    import pandas as pd
    from cogprobe.cli import main
    pd.DataFrame([dict(es=f"la casa {i}", nah=f"in calli {i}") for i in range(40)]).to_csv(tmp_path / "p.csv", index=False)
    assert main(["sweep", "org/tiny@step*", "--base", "org/tiny", "--out", str(tmp_path / "t"),
                 "--corpus", str(tmp_path / "p.csv"), "--limit", "2", "--ks", "0,6"]) == 0
    table = pd.read_parquet(tmp_path / "t" / "sweeps.parquet")
    assert sorted(table["checkpoint_step"].unique()) == [0, 2, 10]
    assert main(["capture", "org/tiny@step2,step10", "--base", "org/tiny", "--out", str(tmp_path / "t"),
                 "--corpus", str(tmp_path / "p.csv"), "--limit", "2"]) == 0
    assert "capture: 100%" in capsys.readouterr().err   # one bar, ticking per checkpoint
    acts = pd.read_parquet(tmp_path / "t" / "activations.parquet")
    assert {2, 10} <= set(acts["checkpoint_step"].unique())
