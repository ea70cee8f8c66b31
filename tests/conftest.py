import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# and the processes the tests start run one thread as well (`make test` runs two test processes at once)
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models are overhead-bound: one thread is faster, and it keeps parallel
# test runs from oversubscribing the cores (2 OpenMP threads per process spin
# against each other on a loaded 2-core machine: 10x slower, measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """(llama folder, qwen2 folder, gpt2 folder, corpus csv), written once (a module's own `inputs`
    fixture, where it has one, takes its place)."""
    from helpers import write_corpus
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("inputs")
    return dict(llama=save_tiny(root / "llama", "llama"), qwen2=save_tiny(root / "qwen2", "qwen2"),
                gpt2=save_tiny(root / "gpt2", "gpt2"), corpus=write_corpus(root / "corpus.csv"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny llama folder, the 60-pair CSV, and a finished 4-step full run with checkpoints 0, 2, 4,
    trained once through the CLI. Read-only: a test that changes the run copies it first."""
    from helpers import cli, train_argv, write_corpus
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("trained")
    model, corpus = save_tiny(root / "llama", "llama"), write_corpus(root / "pairs.csv")
    assert cli(train_argv(model, corpus, root / "run", steps=4, save_steps="0,2,4")) == 0
    return dict(model=model, corpus=corpus, run=root / "run")
