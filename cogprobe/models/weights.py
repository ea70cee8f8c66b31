"""A model's weights by parameter name, read one tensor at a time from safetensors files.

Why: the streamed engine (`probe.streamed`) runs one block at a time and should hold only that
block's weights, whatever the model's size. Every source of weights cogprobe reads is a view of
this kind:
  - `FolderWeights`: an HF model folder, one `model.safetensors` or shards listed by
    `model.safetensors.index.json` (as `save_pretrained` writes large models);
  - `OverlayWeights`: a checkpoint stored as the tensors it trained (`trainable.safetensors`) over
    the reference's;
  - `LoraWeights`: a peft LoRA adapter over the reference, merged tensor by tensor exactly as
    peft's `merge_and_unload` merges it (same operations, same order, so the same bits).

The folder's files are checked when it is opened, from their headers only: a shard the index names
that is missing, or that lacks a tensor the index places in it, fails in one line before any work.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cogprobe.core import io
from cogprobe.core.errors import CogprobeError

INDEX = "model.safetensors.index.json"
RECOPY = "re-copy the model folder (or re-save it with save_pretrained)"


class FolderWeights:
    """The tensors of one model folder (single file or sharded), opened lazily."""

    def __init__(self, folder: str | Path, where: dict[str, Path] | None = None, rename=None):
        """`rename(key)`: the model's name for a key in the files (transformers renames some when it
        loads, e.g. GPT-NeoX's `embed_out` is `lm_head`); names are the model's from then on."""
        self.folder = Path(folder)
        if where is None:
            where = _index(self.folder) if (self.folder / INDEX).is_file() else _scan(self.folder)
        self.rename = rename
        self.key = {rename(k) if rename else k: k for k in where}   # model name -> key in its file
        if len(self.key) < len(where):
            raise CogprobeError(f"{self.folder}: two tensors in its files load as one parameter; {RECOPY}")
        self.where = {name: where[key] for name, key in self.key.items()}

    @classmethod
    def of_file(cls, path: str | Path) -> "FolderWeights":
        """The tensors of one safetensors file (a checkpoint's trained tensors, an adapter)."""
        return cls(Path(path).parent, _keys_of(Path(path)))

    def names(self) -> set[str]:
        return set(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, as stored (dtype included)."""
        path = self.where.get(name)
        if path is None:
            raise CogprobeError(f"{self.folder} has no tensor {name}: a block or an end of the model is missing "
                                f"from its weight files; {RECOPY}")
        try:   # opened per read: a mapping kept open keeps every page read so far resident
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(self.key[name])
        except SafetensorError as e:
            raise CogprobeError(f"cannot read {name} from {path} ({e}); the file is damaged: {RECOPY}") from None

    def sizes(self, dtype: torch.dtype | None = None) -> dict[str, int]:
        """{name: bytes} of every tensor at `dtype` (default: as stored), from the headers alone."""
        out = {}
        for path in sorted(set(self.where.values())):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    size = dtype.itemsize if dtype is not None else _itemsize(sl.get_dtype())
                    out[self.rename(key) if self.rename else key] = math.prod(sl.get_shape()) * size
        return out

    def may_differ(self, name: str) -> bool:
        """Whether `name` may differ from the reference: unknown for a whole folder, so compared."""
        return True


class OverlayWeights:
    """The reference's tensors with those of one file (a checkpoint's trained tensors) in their place."""

    def __init__(self, reference: FolderWeights, file: str | Path):
        self.reference = reference
        self.own = FolderWeights.of_file(file)

    def read(self, name: str) -> torch.Tensor:
        return self.own.read(name) if self.own.has(name) else self.reference.read(name)

    def has(self, name: str) -> bool:
        return self.own.has(name) or self.reference.has(name)

    def may_differ(self, name: str) -> bool:
        return self.own.has(name)


class LoraWeights:
    """The reference's tensors with a LoRA adapter merged into the ones it targets.

    Only what cogprobe's and peft's default LoRA writes is read: `lora_A`/`lora_B` pairs on linear
    layers (plus whole tensors saved with `modules_to_save`); DoRA, per-module rank or alpha
    patterns and LoRA biases are refused, since their merge is not this one."""

    def __init__(self, reference: FolderWeights, folder: str | Path):
        self.reference, self.folder = reference, Path(folder)
        config = io.read_json(self.folder / "adapter_config.json")
        unsupported = [k for k in ("use_dora", "alpha_pattern", "rank_pattern", "lora_bias") if config.get(k)]
        if unsupported or config.get("peft_type", "LORA") != "LORA":
            what = ", ".join(unsupported) or f"peft_type {config.get('peft_type')}"
            raise CogprobeError(f"{self.folder} is an adapter with {what}, which the streamed engine does not "
                                "merge; sweep it with --engine memory")
        r = config["r"]
        self.scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        self.file = FolderWeights.of_file(self.folder / "adapter_model.safetensors")
        self.pairs: dict[str, tuple[str, str]] = {}   # target weight -> (lora_A key, lora_B key)
        self.whole: dict[str, str] = {}               # tensor replaced whole -> its key
        for key in self.file.where:
            name = key.removeprefix("base_model.model.")
            module, lora, rest = name.partition(".lora_")
            if not lora:
                self.whole[name] = key
            elif rest in ("A.weight", "B.weight"):
                a, b = self.pairs.get(f"{module}.weight", (None, None))
                self.pairs[f"{module}.weight"] = (key, b) if rest == "A.weight" else (a, key)
            else:
                raise CogprobeError(f"{self.folder} holds {key}, a LoRA tensor the streamed engine does not merge "
                                    "(only lora_A/lora_B of linear layers); sweep it with --engine memory")
        stray = sorted(n for n, ab in self.pairs.items() if None in ab or not reference.has(n))
        stray += sorted(n for n in self.whole if not reference.has(n))
        if stray:   # merged nowhere, the adapter would be silently left out of the numbers
            raise CogprobeError(f"{self.folder} adapts {stray[0]}, which is not a tensor of the reference (or "
                                "lacks its lora_A or lora_B): the adapter is not for this base model; pass the "
                                "base it was trained from (--base), or sweep it with --engine memory")

    def read(self, name: str) -> torch.Tensor:
        if name in self.whole:
            return self.file.read(self.whole[name])
        base = self.reference.read(name)
        if name not in self.pairs:
            return base
        a, b = (self.file.read(k).to(torch.float32) for k in self.pairs[name])
        delta = b @ a   # peft's get_delta_weight, with the adapter in float32 (peft's autocast_adapter_dtype)
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling
        return (base.to(torch.float32) + delta).to(base.dtype) if base.dtype != torch.float32 else base + delta

    def has(self, name: str) -> bool:
        return name in self.whole or self.reference.has(name)

    def may_differ(self, name: str) -> bool:
        return name in self.whole or name in self.pairs


# --------------------------------------------------------------------- reading headers


def _keys_of(path: Path) -> dict[str, Path]:
    """{tensor name: path} from a safetensors file's header; a damaged header fails in one line."""
    if not path.is_file():
        raise CogprobeError(f"{path} is missing; {RECOPY}")
    try:
        with safe_open(str(path), "pt") as f:
            return {name: path for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CogprobeError(f"cannot read the header of {path} ({e}); the file is damaged or truncated: "
                            f"{RECOPY}") from None


def _index(folder: Path) -> dict[str, Path]:
    """The index's weight map, checked against the shards' headers."""
    index = folder / INDEX
    weight_map = io.read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CogprobeError(f"{index} has no weight_map; {RECOPY}")
    where: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            raise CogprobeError(f"{index} names the shard {shard}, which is not in {folder}; copy the missing "
                                f"shard (or {RECOPY})")
        have = _keys_of(path)
        lacking = sorted(n for n, s in weight_map.items() if s == shard and n not in have)
        if lacking:
            more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
            raise CogprobeError(f"{path} lacks {lacking[0]}{more}, which {INDEX} places there: the shards "
                                f"disagree with their index; {RECOPY}")
        where.update({n: path for n in weight_map if weight_map[n] == shard})
    return where


def _scan(folder: Path) -> dict[str, Path]:
    """Every *.safetensors file's tensors, for a folder without an index (one file, usually)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CogprobeError(f"{folder} has no *.safetensors weights; the streamed engine reads safetensors only "
                            "(convert the model once with save_pretrained)")
    where: dict[str, Path] = {}
    for path in files:
        for name, p in _keys_of(path).items():
            if name in where:
                raise CogprobeError(f"{folder}: tensor {name} is in both {where[name].name} and {path.name}; "
                                    f"keep one copy of the weights ({RECOPY})")
            where[name] = p
    return where


_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def _itemsize(dtype: str) -> int:
    return _SIZES.get(dtype, 4)
