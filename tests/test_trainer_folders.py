"""HF Trainer output folders as transformers.Trainer writes them: checkpoints without a tokenizer."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.cli import main
from cogprobe.core.errors import CogprobeError
from tiny import save_tiny, tiny_model


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """A base folder (model + tokenizer) and checkpoint-2/4 written by Trainer without processing_class."""
    from transformers import Trainer, TrainingArguments
    root = tmp_path_factory.mktemp("hf")
    base = save_tiny(root / "base", "llama")
    model = tiny_model("llama").train()
    ids = torch.randint(1, 300, (8, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(root / "out"), max_steps=4, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[dict(input_ids=r, labels=r) for r in ids]).train()
    return base, root / "out"


def test_trainer_wrote_no_tokenizer(trainer_run):
    _, out = trainer_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list((out / "checkpoint-2").glob("tokenizer*"))


def test_checkpoints_take_the_base_tokenizer(trainer_run):
    base, out = trainer_run
    ckpts = Checkpoints.open(out, base=base)
    assert ckpts.steps == [0, 2, 4]
    model, tok = ckpts.load(2)
    assert tok is ckpts.reference()[1]
    assert not torch.equal(model.lm_head.weight, ckpts.reference()[0].lm_head.weight)


def test_without_base_the_error_says_to_pass_it(trainer_run):
    _, out = trainer_run
    with pytest.raises(CogprobeError, match="--base"):
        Checkpoints.open(out).load(4)


def test_a_different_vocabulary_is_refused(trainer_run, tmp_path):
    base, _ = trainer_run
    model = tiny_model("llama")
    model.resize_token_embeddings(model.config.vocab_size + 16)
    model.save_pretrained(tmp_path / "bigger")
    with pytest.raises(CogprobeError, match="vocabulary of 400 tokens"):
        Checkpoints.open([tmp_path / "bigger"], base=base).load(1)


def test_sweep_cli_on_a_trainer_folder(trainer_run, tmp_path):
    """The reported case: `cogprobe sweep OUT --base BASE --out TABLES` scores every checkpoint."""
    base, out = trainer_run
    rows = [dict(es=f"la casa {i} es grande", nah=f"in calli {i} huei") for i in range(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    assert main(["sweep", str(out), "--base", str(base), "--out", str(tmp_path / "tables"), "--corpus",
                 str(tmp_path / "pairs.csv"), "--limit", "2", "--ks", "0,6"]) == 0
    table = pd.read_parquet(tmp_path / "tables" / "sweeps.parquet")
    assert sorted(table["checkpoint_step"].unique()) == [0, 2, 4]


def test_tokenizer_flag_serves_checkpoints_without_a_base(trainer_run, tmp_path):
    base, out = trainer_run
    ckpts = Checkpoints.open(out, tokenizer=base)
    assert ckpts.steps == [2, 4]        # no base: the first checkpoint is the reference
    model, tok = ckpts.load(4)
    assert len(tok) == model.get_input_embeddings().num_embeddings   # the tiny tokenizer fills the vocabulary
    rows = [dict(es=f"la casa {i} es grande", nah=f"in calli {i} huei") for i in range(40)]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    assert main(["sweep", str(out), "--tokenizer", str(base), "--out", str(tmp_path / "tables"), "--corpus",
                 str(tmp_path / "pairs.csv"), "--limit", "2", "--ks", "0,6"]) == 0


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(trainer_run, tmp_path):
    from tiny import tiny_tokenizer
    _, out = trainer_run
    tok = tiny_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(8)])
    tok.save_pretrained(tmp_path / "bigtok")
    with pytest.raises(CogprobeError, match="392 tokens but the model has 384 embedding rows"):
        Checkpoints.open(out, tokenizer=tmp_path / "bigtok").load(4)
