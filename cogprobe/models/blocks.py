"""The anatomy of a causal LM: its L decoder blocks, embedding, final norm and head.

One rule instead of a table per architecture: the blocks are the only
`nn.ModuleList` whose length is `config.num_hidden_layers`; the final norm is the
norm-like direct child of the base model; embedding and head come from
transformers' own `get_input_embeddings` / `get_output_embeddings`. This maps
Llama/SmolLM2, Qwen2, Mistral, Gemma 2/3, GPT-2, GPT-NeoX and Phi without naming
any of them, and fails with a clear message on anything it cannot map.

Temporary surgery (swapping a block for another model's, skipping a block) is
done with context managers that always restore the model, also on error.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from cogprobe.core.errors import CogprobeError


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (or the model itself)."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@dataclass
class Blocks:
    """Handles on the parts of a causal LM that ablations and training need."""

    model: nn.Module        # the causal LM (peft wrappers unwrapped)
    decoder: nn.Module      # base model: embeddings -> blocks -> final norm
    modules: nn.ModuleList  # the L blocks (HF decoder layers), input end first
    layers_path: str        # e.g. "model.layers" (parameter-name prefix of the blocks)
    embeddings: dict[str, nn.Module]   # token (and position) embeddings by qualified name
    final_norm_path: str | None
    head_path: str

    @property
    def n(self) -> int:
        return len(self.modules)

    @property
    def final_norm(self) -> nn.Module | None:
        return self.model.get_submodule(self.final_norm_path) if self.final_norm_path else None

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_path)

    def block_prefix(self, i: int) -> str:
        """Parameter-name prefix of block i, e.g. "model.layers.3."."""
        return f"{self.layers_path}.{i}."

    def block_of(self, param_name: str) -> int | None:
        """The block index a parameter name belongs to, or None (embedding, norm, head)."""
        prefix = self.layers_path + "."
        if not param_name.startswith(prefix):
            return None
        return int(param_name[len(prefix):].split(".", 1)[0])

    def input_end_names(self) -> list[str]:
        """Parameter names of the input end outside the blocks (embeddings)."""
        return [f"{path}.{n}" for path, mod in self.embeddings.items() for n, _ in mod.named_parameters()]

    def output_end_names(self) -> list[str]:
        """Parameter names of the output end outside the blocks (final norm + LM head)."""
        paths = [p for p in (self.final_norm_path, self.head_path) if p]
        return [f"{p}.{n}" for p in paths for n, _ in self.model.get_submodule(p).named_parameters()]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of already final-normed hidden states (with Gemma's soft-capping)."""
        logits = self.head(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def decode(self, resid: torch.Tensor) -> torch.Tensor:
        """Logit lens: a residual-stream state read through the final norm and the head."""
        norm = self.final_norm
        return self.logits(norm(resid) if norm is not None else resid)


def _n_layers(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise CogprobeError(f"{type(config).__name__} has no num_hidden_layers; cogprobe needs a decoder-only causal LM")
    return n


def find_blocks(model: nn.Module) -> Blocks:
    """Locate the decoder blocks, embeddings, final norm and head of a causal LM."""
    model = unwrap(model)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise CogprobeError(f"{name} is an encoder-decoder model; cogprobe needs a decoder-only causal LM")
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise CogprobeError(f"{name} is not a generative causal LM (e.g. an encoder with a masked-LM head); "
                            "cogprobe needs a decoder-only model such as *ForCausalLM")
    n = _n_layers(model.config)
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        found = ", ".join(p for p, _ in lists) or "none"
        raise CogprobeError(f"cannot find the {n} decoder blocks of {name} (ModuleLists of that length: {found}); "
                            "this architecture is not supported")
    layers_path, layers = lists[0]
    decoder_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    decoder = model.get_submodule(decoder_path)
    head = model.get_output_embeddings()
    if head is None:
        raise CogprobeError(f"{name} has no LM head (get_output_embeddings() is None); it is not a causal LM")
    paths = {id(m): p for p, m in model.named_modules()}
    return Blocks(
        model=model, decoder=decoder, modules=layers, layers_path=layers_path,
        embeddings=_embeddings(model, decoder, decoder_path, paths),
        final_norm_path=_final_norm_path(decoder, decoder_path),
        head_path=paths[id(head)],
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _embeddings(model, decoder, decoder_path, paths) -> dict[str, nn.Module]:
    token = model.get_input_embeddings()
    found = {paths[id(token)]: token}
    for child_name, child in decoder.named_children():  # e.g. GPT-2's learned positions (wpe)
        if isinstance(child, nn.Embedding) and child is not token:
            found[_join(decoder_path, child_name)] = child
    return found


def _final_norm_path(decoder: nn.Module, decoder_path: str) -> str | None:
    norms = [name for name, child in decoder.named_children() if "norm" in type(child).__name__.lower()
             or name in ("ln_f", "norm", "final_layer_norm", "final_layernorm")]
    if len(norms) > 1:
        raise CogprobeError(f"{type(decoder).__name__} has several final-norm candidates {norms}; not supported")
    return _join(decoder_path, norms[0]) if norms else None


# --- temporary surgery ---------------------------------------------------------------


class SkipBlock(nn.Module):
    """A block that is the identity on the residual stream: `skip` ablation, and fast-forward."""

    def __init__(self, original: nn.Module):
        super().__init__()
        # keep attributes the decoder loop reads (e.g. Gemma's attention_type)
        for attr in ("attention_type", "layer_idx"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def swapped(blocks: Blocks, replacements: Mapping[int, nn.Module]) -> Iterator[Blocks]:
    """Temporarily put other modules in place of some blocks (restored on exit)."""
    originals = {i: blocks.modules[i] for i in replacements}
    try:
        for i, module in replacements.items():
            blocks.modules[i] = module
        yield blocks
    finally:
        for i, module in originals.items():
            blocks.modules[i] = module


def check_indices(indices: Iterable[int], n: int) -> list[int]:
    """Sorted unique block indices, each in [0, n)."""
    out = sorted(set(int(i) for i in indices))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise CogprobeError(f"block indices {bad} are out of range for a model with {n} blocks (valid: 0-{n - 1})")
    return out
