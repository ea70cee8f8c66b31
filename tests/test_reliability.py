"""Bad input through the CLI: exit 2, one line naming the problem and the fix, nothing written.

Every case runs a real command (`cogprobe.cli.main`) on a tiny model and a tiny
corpus, and checks stderr is exactly one `cogprobe: error: ...` line and that
the output folder is as it was (absent, or unchanged). The last section checks
that loading is safe by default: no unpickling, no repository code, bounded
raw-activation dumps.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import cogprobe  # noqa: F401  (offline environment before transformers)
from cogprobe.tuning.checkpoints import Checkpoints, step_dir
from cogprobe.cli import main
from helpers import cli, corpus_rows, train_argv
from tiny import save_tiny, tiny_model, tiny_tokenizer

def write_gguf(path: Path) -> Path:
    """The tiny llama as a real GGUF file (f32 tensors, gpt2-style tokenizer), written with `gguf`."""
    import gguf
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([1] * len(vocab))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(0)
    w.add_bos_token_id(0)
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t.numpy())
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t.numpy())
        elif name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            w.add_tensor(f"blk.{i}.{block[rest.rsplit('.', 1)[0]]}.weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_run):
    """The session's tiny llama, 60-pair CSV and finished 4-step run (copied here: tests change it)."""
    root = tmp_path_factory.mktemp("reliability")
    run = shutil.copytree(trained_run["run"], root / "run")
    return dict(root=root, model=trained_run["model"], corpus=trained_run["corpus"], run=run)


def snapshot(folder: Path) -> dict | None:
    """Every file under `folder` with its size and mtime; None if the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def assert_refused(capsys, argv: list, *patterns: str, out: Path | None = None) -> str:
    """Exit 2, stderr exactly one `cogprobe: error:` line matching `patterns`, `out` untouched."""
    before = snapshot(out) if out is not None else None
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("cogprobe: error: "), err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    if out is not None:
        assert snapshot(out) == before, f"{out} changed"
    return lines[0]


# ------------------------------------------------------------------ models


def _missing(root, inputs):
    return root / "nope"


def _hub_id(root, inputs):
    return "HuggingFaceTB/SmolLM2-135M"


def _empty_folder(root, inputs):
    (root / "empty").mkdir()
    return root / "empty"


def _config_only(root, inputs):
    tiny_model().config.save_pretrained(root / "cfg")
    return root / "cfg"


def _truncated_safetensors(root, inputs):
    folder = shutil.copytree(inputs["model"], root / "trunc")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _random_gguf(root, inputs):
    (root / "x.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    return root / "x.gguf"


def _cut_gguf(keep):
    def make(root, inputs):
        data = write_gguf(root / "whole.gguf").read_bytes()
        (root / "cut.gguf").write_bytes(data[:keep(len(data))])
        return root / "cut.gguf"
    return make


def _bert(root, inputs):
    import transformers as tf
    config = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32)
    tf.BertForMaskedLM(config).save_pretrained(root / "bert")
    return root / "bert"


MODELS = {
    "does not exist": (_missing, r"no model at '.*nope': expected .*or a hub id org/name\[@revision\]"),
    "a hub id": (_hub_id, r"HuggingFaceTB/SmolLM2-135M@main is not in the Hugging Face cache .*HF_HUB_OFFLINE=1"),
    "folder without a model": (_empty_folder, r"has no config\.json: expected .*config\.json \+ \*\.safetensors"),
    "config without weights": (_config_only, r"no weights .*copy the weight files"),
    "truncated safetensors": (_truncated_safetensors, r"model\.safetensors .*damaged or truncated: re-copy"),
    "random bytes as gguf": (_random_gguf, r"cannot read GGUF file .*x\.gguf .*magic.*re-download"),
    "gguf cut in its header": (_cut_gguf(lambda n: 300), r"cannot read GGUF file .*cut\.gguf .*re-download"),
    "gguf cut in its tensors": (_cut_gguf(lambda n: n // 2), r"cannot read GGUF file .*cut\.gguf .*re-download"),
    "encoder model": (_bert, r"'bert' model, an encoder .*needs a decoder-only causal LM"),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_bad_model(inputs, tmp_path, capsys, case):
    make, pattern = MODELS[case]
    out = tmp_path / "out"
    assert_refused(capsys, train_argv(make(tmp_path, inputs), inputs["corpus"], out), pattern, out=out)


def test_the_intact_gguf_loads(tmp_path):
    """The truncation cases above are damaged copies of a file that does load."""
    from cogprobe.models.loading import load_model
    model, _ = load_model(write_gguf(tmp_path / "whole.gguf"))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 6


# ------------------------------------------------------------------ corpora


def _csv(text: str, encoding: str = "utf-8"):
    def make(root):
        (root / "c.csv").write_bytes(text.encode(encoding))
        return root / "c.csv"
    return make


ALL_EMPTY = "es,nah\n" + ",x\n" * 30 + "y,\n" * 30
ONE_PAIR = "es,nah\n" + "la casa,in calli\n" * 60
TEN = "es,nah\n" + "".join(f"casa {i},calli {i}\n" for i in range(10))

CORPORA = {
    "unknown name": (lambda root: "nahuatl", [], r"unknown corpus 'nahuatl': known corpora are axolotl"),
    "misnamed columns": (_csv("spanish,nahuatl\n" + "a,b\n" * 60), [],
                         r"cannot tell which columns .*spanish, nahuatl.*--pivot-col X --target-col Y"),
    "missing named column": (_csv(TEN), ["--target-col", "nhe"], r"no target column 'nhe'; the columns are es, nah"),
    "empty file": (_csv(""), [], r"c\.csv is empty; give a file with a header"),
    "header only": (_csv("es,nah\n"), [], r"c\.csv has no rows; give a file with sentence pairs"),
    "all pairs empty": (_csv(ALL_EMPTY), [], r"all 60 pairs were empty or duplicates; check the column"),
    "all pairs duplicates": (_csv(ONE_PAIR), [], r"has 1 distinct non-empty pair\(s\) \(59 duplicate dropped\)"),
    "split too small (fractions)": (_csv(TEN), [], r"test fraction 0\.05 of 10 pairs is an empty split; ask for"),
    "split too small (sizes)": (lambda root: None, ["--dev", "0.5", "--test", "0.5"],
                                r"too few for test=30 \+ dev=30 and a non-empty train split; ask for smaller"),
    "latin-1 text": (_csv("es,nah\n" + "".join(f"año {i},xihuitl {i}\n" for i in range(60)), "latin-1"), [],
                     r"c\.csv is not UTF-8 text \(bad byte at offset \d+\); re-save it as UTF-8"),
}


@pytest.mark.parametrize("case", list(CORPORA))
def test_bad_corpus_in_train(inputs, tmp_path, capsys, case):
    make, extra, pattern = CORPORA[case]
    corpus = make(tmp_path) or inputs["corpus"]
    out = tmp_path / "out"
    assert_refused(capsys, train_argv(inputs["model"], corpus, out) + extra, pattern, out=out)


@pytest.mark.parametrize("case", ["unknown name", "latin-1 text", "all pairs duplicates"])
def test_bad_corpus_in_sweep_leaves_no_table(inputs, tmp_path, capsys, case):
    make, _, pattern = CORPORA[case]
    out = tmp_path / "tables"
    assert_refused(capsys, ["sweep", inputs["run"], "--out", out, "--corpus", make(tmp_path)], pattern, out=out)


# ------------------------------------------------------------------ layer sets, fractions, tau, k


@pytest.mark.parametrize("layers, pattern", [
    ("0-9", r"blocks \[6, 7, 8, 9\] out of range for a model with 6 blocks \(valid: 0-5\)"),
    (",", r"layer set ',' is empty; give at least one block"),
    ("0-3,2-4", r"lists blocks \[2, 3\] more than once; give each block once"),
    ("3-1", r"layer range '3-1' .*runs backwards; write it as 1-3"),
    ("0-x", r"'0-x' is not a block number or range \(write e.g. '0-3,26-29'\)"),
    ("cogsym:1.5", r"CogSym fraction must be in \(0, 1\], got 1\.5"),
    ("cogsym:0", r"CogSym fraction must be in \(0, 1\], got 0\.0"),
    ("cogsym:-0.25", r"CogSym fraction must be in \(0, 1\]"),
    ("cogsym:0.05", r"rounds to zero blocks; use a fraction of at least"),
    ("cogsym:half", r"cannot read the fraction in 'cogsym:half'; write e.g. cogsym:0.25"),
])
def test_bad_layer_set(inputs, tmp_path, capsys, layers, pattern):
    out = tmp_path / "out"
    argv = train_argv(inputs["model"], inputs["corpus"], out, strategy="layers", layers=layers)
    assert_refused(capsys, argv, pattern, out=out)


@pytest.mark.parametrize("flags, pattern", [
    (["--tau", "0"], r"tau must be in \(0, 1\], got 0\.0"),
    (["--tau", "1.5"], r"tau must be in \(0, 1\], got 1\.5"),
    (["--rule", "fixed", "--fraction", "2"], r"CogSym fraction must be in \(0, 1\], got 2\.0"),
    (["--rule", "fixed", "--fraction", "0"], r"CogSym fraction must be in \(0, 1\], got 0\.0"),
])
def test_select_refuses_fraction_and_tau_outside_0_1(inputs, tmp_path, capsys, flags, pattern):
    out = tmp_path / "sel"
    assert_refused(capsys, ["select", inputs["run"], "--out", out] + flags, pattern, out=out)


@pytest.mark.parametrize("flags, pattern", [
    (["--fraction", "0"], r"fraction must be in \(0, 1\], got 0\.0"),
    (["--tau", "1.01"], r"tau must be in \(0, 1\], got 1\.01"),
])
def test_run_refuses_fraction_and_tau_outside_0_1(inputs, tmp_path, capsys, flags, pattern):
    out = tmp_path / "study"
    assert_refused(capsys, ["run", "--out", out, "--model", inputs["model"], "--corpus", inputs["corpus"]] + flags,
                   pattern, out=out)


def test_sweep_k_grid_beyond_L(inputs, tmp_path, capsys):
    out = tmp_path / "tables"
    assert_refused(capsys, ["sweep", inputs["run"], "--out", out, "--ks", "0,3,7-9"],
                   r"k values \[7, 8, 9\] are outside 0\.\.6 \(the model has 6 blocks\); ask for k within", out=out)


def test_run_k_grid_beyond_L_fails_before_the_study_starts(inputs, tmp_path, capsys):
    """A k grid for the 30-block embedded model (0-30) on 6 blocks must fail at once, not after the
    baseline and the first tuning run (the quick preset's adaptive grid scales with L: it names none)."""
    out = tmp_path / "study"
    assert_refused(capsys, ["run", "--out", out, "--model", inputs["model"], "--corpus", inputs["corpus"],
                            "--sweep-ks", "0-30"],
                   r"k values \[7, 8, .*30\] are outside 0\.\.6 .*sweep_ks", out=out)


# ------------------------------------------------------------------ checkpoints of a run


def test_sweep_of_a_run_without_checkpoints(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(inputs["run"] / "manifest.json", run)
    (run / "checkpoints").mkdir()
    shutil.copytree(step_dir(inputs["run"], 2), run / "checkpoints" / ".tmp-step-2.abc")  # a leftover: not a checkpoint
    assert_refused(capsys, ["sweep", run], r"no complete checkpoints in .*run; train with save steps", out=run)


def test_sweep_of_a_checkpoint_from_another_base(inputs, tmp_path, capsys):
    run = shutil.copytree(inputs["run"], tmp_path / "run")
    meta_path = step_dir(run, 2) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert_refused(capsys, ["sweep", run], r"step-2 was trained from a different base model \(fingerprint 000000000000",
                   out=run)


def test_sweep_with_a_base_that_is_not_the_runs(inputs, tmp_path, capsys):
    other = save_tiny(tmp_path / "other", "llama", seed=1)
    out = tmp_path / "tables"
    assert_refused(capsys, ["sweep", inputs["run"], "--base", other, "--out", out],
                   r"base model .*other \(fingerprint \w+\) is not the base of .*pass the base model the run", out=out)


# ------------------------------------------------------------------ --out


def test_train_out_holding_a_different_run(inputs, tmp_path, capsys):
    out = shutil.copytree(inputs["run"], tmp_path / "run")
    argv = train_argv(inputs["model"], inputs["corpus"], out, steps=4, save_steps="0,2,4", lr=3e-3)
    assert_refused(capsys, argv, r"holds a different run \(differs in lr\); choose another --out or pass --overwrite",
                   out=out)
    assert cli(argv + ["--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["lr"] == 3e-3


def test_train_out_holding_other_files(inputs, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_refused(capsys, train_argv(inputs["model"], inputs["corpus"], out),
                   r"not empty and holds no cogprobe run \(no manifest\.json\); choose an empty or new --out", out=out)


def test_sweep_out_holding_another_runs_table(inputs, tmp_path, capsys):
    other = tmp_path / "other-run"
    assert cli(train_argv(inputs["model"], inputs["corpus"], other, steps=2, save_steps="0,2", seed=1)) == 0
    out = tmp_path / "tables"
    assert cli(["sweep", inputs["run"], "--out", out, "--pairs", "3", "--ks", "0,6"]) == 0
    assert_refused(capsys, ["sweep", other, "--out", out, "--pairs", "3", "--ks", "0,6"],
                   r"sweeps\.parquet holds rows of other checkpoints .*differs in source.*--overwrite", out=out)
    assert_refused(capsys, ["sweep", inputs["run"], "--out", out, "--pairs", "3", "--ks", "0,3,6"],
                   r"holds a revert sweep of step 0 with other tasks, directions or ks.*--overwrite", out=out)
    assert cli(["sweep", other, "--out", out, "--pairs", "3", "--ks", "0,6", "--overwrite"]) == 0
    assert set(pd.read_parquet(out / "sweeps.parquet")["checkpoint_step"]) == {0, 2}


def test_run_out_holding_a_different_study(inputs, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    study = dict(out=str(out), model=str(inputs["model"]), corpus=str(inputs["corpus"]), steps=99)
    (out / "study.json").write_text(json.dumps(study))
    toml = tmp_path / "tiny.toml"
    toml.write_text('sweep_ks = "0-6"\n')
    assert_refused(capsys, ["run", "--out", out, "--config", toml, "--model", inputs["model"], "--corpus",
                            inputs["corpus"]], r"holds a different study \(differs in .*steps.*\); .*--overwrite",
                   out=out)


@pytest.mark.parametrize("verb", ["train", "sweep", "eval", "run"])
def test_out_under_a_regular_file(inputs, tmp_path, capsys, verb):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    argv = {"train": train_argv(inputs["model"], inputs["corpus"], out),
            "sweep": ["sweep", inputs["run"], "--out", out, "--pairs", "2"],
            "eval": ["eval", "--model", inputs["model"], "--corpus", inputs["corpus"], "--pairs", "2", "--out", out],
            "run": ["run", "--out", out, "--model", inputs["model"], "--corpus", inputs["corpus"],
                    "--sweep-ks", "0-6"]}[verb]
    assert_refused(capsys, argv, r"cannot create folder .*a-file.* \(Not a directory\); choose an output path",
                   out=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(inputs, tmp_path, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    assert_refused(capsys, train_argv(inputs["model"], inputs["corpus"], locked / "out"),
                   r"cannot create folder .*read-only/out \(Permission denied\); choose an output path", out=locked)


def test_out_is_a_regular_file(inputs, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    assert_refused(capsys, train_argv(inputs["model"], inputs["corpus"], out),
                   r"cannot create folder .*a-file \(File exists\); choose an output path", out=tmp_path)


# ------------------------------------------------------------------ training that diverges


def test_nan_from_a_huge_lr_stops_and_keeps_the_last_good_checkpoint(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(inputs["model"], inputs["corpus"], out, steps=6, save_steps="0,1,3", lr=1e30)
    line = assert_refused(capsys, argv, r"(loss|gradient norm) (nan|inf) at step 2: training stopped; .*step-1, "
                          r"are kept in .*lower --lr")
    assert "step-1" in line
    ckpts = Checkpoints.open(out)
    assert ckpts.steps == [0, 1]
    model, _ = ckpts.load(1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = pd.read_parquet(out / "train_log.parquet")
    assert list(log["step"]) == [1] and np.isfinite(log["loss"]).all()


def test_nan_loss_midway_keeps_a_checkpoint_equal_to_a_clean_runs(inputs, tmp_path, capsys, monkeypatch):
    from transformers.loss import loss_utils
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    flags = dict(steps=4, save_steps="0,2,4")
    assert cli(train_argv(inputs["model"], inputs["corpus"], clean, **flags)) == 0
    real, calls = loss_utils.fixed_cross_entropy, []

    def nan_at_third_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loss_utils, "fixed_cross_entropy", nan_at_third_step)
    assert_refused(capsys, train_argv(inputs["model"], inputs["corpus"], broken, **flags),
                   r"loss nan at step 3: training stopped; checkpoints up to the last good one, step-2, are kept")
    assert Checkpoints.open(broken).steps == [0, 2]
    a, b = (load_file(str(step_dir(run, 2) / "trainable.safetensors")) for run in (clean, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = (pd.read_parquet(run / "train_log.parquet") for run in (clean, broken))
    assert list(log_b["step"]) == [1, 2] and np.array_equal(log_b["loss"], log_a["loss"][:2])


# ------------------------------------------------------------------ configs


def test_run_config_with_an_unknown_key_or_a_wrong_type(inputs, tmp_path, capsys):
    out = tmp_path / "study"
    bad = tmp_path / "bad.toml"
    for text, pattern in [("stepz = 3\n", r"bad\.toml: unknown key 'stepz'; known keys: out, model"),
                          ('steps = "many"\n', r"bad\.toml: key 'steps' should be int, got str 'many'"),
                          ("tau = true\n", r"key 'tau' should be float, got bool True"),
                          ("steps = [\n", r"bad\.toml is not valid TOML .*; fix the file")]:
        bad.write_text(text)
        assert_refused(capsys, ["run", "--out", out, "--config", bad], pattern, out=out)
    assert_refused(capsys, ["run", "--out", out, "--config", tmp_path / "none.toml"],
                   r"config file .*none\.toml does not exist", out=out)


@pytest.mark.parametrize("flags, pattern", [
    (["--steps", "abc"], r"argument --steps: invalid int value: 'abc'; see `cogprobe train --help`"),
    (["--lr", "fast"], r"argument --lr: invalid float value: 'fast'"),
    (["--steps", "2.5"], r"argument --steps: invalid int value: '2\.5'"),
    (["--save-steps", "often"], r"save_steps='often': give steps like '0,10,20,40', log:N or every:N"),
    (["--save-steps", "every"], r"save_steps='every': write every:N with N >= 1"),
    (["--eval-steps", "every:x"], r"eval_steps='every:x': write every:N with N >= 1"),
    (["--steps", "0"], r"steps=0: give a whole number >= 1"),
    (["--strategy", "sgd"], r"strategy='sgd': use one of full"),
    (["--stepz", "3"], r"unrecognized arguments: --stepz 3"),
])
def test_train_flag_with_a_wrong_type(inputs, tmp_path, capsys, flags, pattern):
    out = tmp_path / "out"
    assert_refused(capsys, train_argv(inputs["model"], inputs["corpus"], out) + flags, pattern, out=out)


def test_run_flag_with_a_wrong_type(tmp_path, capsys):
    out = tmp_path / "study"
    assert_refused(capsys, ["run", "--out", out, "--steps", "many"], r"argument --steps: invalid int value", out=out)
    # chrf_pairs alone may be 0 (the NLL pairs); below that it is refused like any count
    assert_refused(capsys, ["run", "--out", out, "--chrf-pairs", "-1"], r"chrf_pairs=-1: give a whole number >= 0",
                   out=out)
    assert_refused(capsys, ["run", "--out", out, "--eval-pairs", "0"], r"eval_pairs=0: give a whole number >= 1",
                   out=out)


# ------------------------------------------------------------------ safe by default


class _Touch:
    """A pickle that creates a file when it is unpickled: proof of whether anything unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_weights_are_never_unpickled_unless_asked(inputs, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "unpickled"
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load called"))
    only_bin = tmp_path / "bin"
    tiny_model().config.save_pretrained(only_bin)
    tiny_tokenizer().save_pretrained(only_bin)
    (only_bin / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    assert_refused(capsys, train_argv(only_bin, inputs["corpus"], tmp_path / "out"),
                   r"only has pickle weights \(pytorch_model\.bin\), which can run code when loaded and are refused; "
                   r"if you trust them, convert them to safetensors once \(load_model\(path, allow_pickle=True\)", out=tmp_path / "out")
    # beside safetensors, a pickle is ignored: the safetensors load and the pickle stays shut
    both = shutil.copytree(inputs["model"], tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Touch(marker)))
    assert cli(["eval", "--model", both, "--corpus", inputs["corpus"], "--pairs", "2"]) == 0
    assert not marker.exists() and not loads


def test_remote_code_is_never_run(inputs, tmp_path, capsys, monkeypatch):
    import transformers
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _real=real, **kw: seen.append(kw.get("trust_remote_code")) or _real(*a, **kw))
    assert cli(["eval", "--model", inputs["model"], "--corpus", inputs["corpus"], "--pairs", "2"]) == 0
    assert len(seen) >= 3 and all(v is False for v in seen)  # the tokenizer reads the config again

    marker = tmp_path / "code-ran"
    custom = shutil.copytree(inputs["model"], tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="llama-custom", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama-custom'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    out = tmp_path / "out"
    assert_refused(capsys, train_argv(custom, inputs["corpus"], out),
                   r"custom needs its own Python code to load \(auto_map in config\.json\), which cogprobe does not "
                   r"run; use a model transformers ships", out=out)
    assert not marker.exists()


def test_raw_activation_budget_stops_with_a_clear_message(tmp_path):
    from cogprobe.probe.capture import capture
    from cogprobe.core.errors import CogprobeError
    from cogprobe.data.tasks import Example, batches
    tok, model = tiny_tokenizer(), tiny_model("llama")
    ids = [tuple(tok(f"Spanish: la casa {i}\nNahuatl: in calli {i}").input_ids) for i in range(8)]
    task = {"production": list(batches([Example(x, len(x) // 2) for x in ids], 2, pad_id=0))}
    budget = 6000  # a shard of 2 sequences x ~7 scored positions x 2 layers x 32 floats is ~4 kB
    with pytest.raises(CogprobeError) as info:
        capture([(0, model)], task, raw_dir=tmp_path / "raw", raw_layers=[0, 5], raw_budget_bytes=budget)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(r"raw activations would exceed raw_budget_bytes=6000 \(\d+ written, next shard \d+\); "
                     r"raise the budget, or choose fewer raw_layers or raw_positions", message)
    files = [p for p in (tmp_path / "raw").rglob("*") if p.is_file()]
    assert files and all(p.name.startswith("batch-") for p in files)  # no .tmp- leftovers
    assert sum(p.stat().st_size for p in files) <= budget
