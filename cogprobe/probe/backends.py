"""Three ways to read a model's insides, behind one interface.

`open_backend(name, model, ...)` is a context manager that yields a runner:
`run(batch) -> {"blocks.{i}.{site}": tensor [batch, seq, hidden]}`. The sites are

- `resid`: the block's output, i.e. the residual stream after the block;
- `attn`: the output of the block's attention submodule (before any post-norm);
- `mlp`: the output of the block's MLP submodule.

Each captured activation has one name, `blocks.{i}.{site}` (`site_name`): the runners' keys, the raw
dumps and the docs use it; the tables hold its two parts as their `block` and `site` columns.

Backends (they give the same numbers; tests hold them to 1e-4):

- `torch` (default, no extra dependency): `register_forward_hook` on each block and
  on its attention / MLP child, found by name. Hooks live for one forward only and
  are removed in `finally`, also when the forward raises.
- `nnsight`: `TransformersModel(model)` wraps the model without copying it; the
  trace saves the same module outputs. nnsight serves outputs in execution order,
  so per block they are requested attention, MLP, then block output.
- `transformerlens`: `TransformerBridge.boot_transformers` on a deep copy (the
  bridge rewrites the HF model's modules in place). It forces eager attention on
  its copy, so it matches the others exactly only when the model itself runs eager
  attention. Hook names: `blocks.{i}.hook_resid_post`, and for attn/mlp the
  submodule hooks `blocks.{i}.attn.hook_out` / `blocks.{i}.mlp.hook_out`: TL's
  `hook_attn_out`/`hook_mlp_out` come *after* Gemma 2's post-sublayer norms and so
  are not the submodule output on every architecture.

Every runner skips the LM head where it can (the capture decodes only scored
positions itself) and stops after the deepest requested block.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import importlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from cogprobe.probe.options import BACKENDS, SITES
from cogprobe.models.blocks import Blocks, check_indices, find_blocks, unwrap
from cogprobe.core.errors import CogprobeError

Acts = dict[str, torch.Tensor]   # site_name(block, site) -> [batch, seq, hidden]
Runner = Callable[[dict], Acts]

_CHILD_KEYS = {"attn": ("attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}
_NOT_SUBLAYER = ("norm", "drop", "ln_")
_TL_HOOKS = {"resid": "hook_resid_post", "attn": "attn.hook_out", "mlp": "mlp.hook_out"}
_EXTRA = "pip install cogprobe[backends]"


def site_name(block: int, site: str) -> str:
    """The one name of an activation site: `blocks.{i}.{resid|attn|mlp}` (as TransformerLens names
    its hooks, without their `hook_` prefix)."""
    return f"blocks.{block}.{site}"


def site_parts(name: str) -> tuple[int, str]:
    """(block, site) of a site name: `site_parts("blocks.3.mlp") == (3, "mlp")`."""
    _, block, site = name.split(".")
    return int(block), site


def check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise CogprobeError(f"unknown site(s) {bad or '(none given)'}; choose from {', '.join(SITES)}")
    return tuple(s for s in SITES if s in sites)  # canonical order, no duplicates


def site_child(block: nn.Module, site: str) -> str:
    """Name of the block's attention or MLP child (e.g. `self_attn`, `attn`, `mlp`)."""
    keys = _CHILD_KEYS[site]
    found = [name for name, _ in block.named_children()
             if any(k in name.lower() for k in keys) and not any(x in name.lower() for x in _NOT_SUBLAYER)]
    if len(found) != 1:
        children = ", ".join(name for name, _ in block.named_children())
        raise CogprobeError(f"cannot find the {site} submodule of {type(block).__name__} "
                            f"(children: {children}; matches: {found or 'none'}); "
                            "capture sites=('resid',) only for this architecture")
    return found[0]


def output_tensor(out) -> torch.Tensor:
    """A module output as a tensor (attention modules return (output, weights))."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach()


def _inputs(batch: dict, device: torch.device) -> dict:
    return {"input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device)}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------ torch hooks

def _site_modules(blocks: Blocks, layers: Sequence[int], sites: Sequence[str]) -> dict:
    mods = {}
    for i in layers:
        block = blocks.modules[i]
        for site in sites:
            mods[site_name(i, site)] = block if site == "resid" else block.get_submodule(site_child(block, site))
    return mods


class _Stop(Exception):
    """Raised by the last needed hook: the rest of the network is not run."""


def run_with_sites(model: nn.Module, batch: dict, layers: Sequence[int], sites: Sequence[str]) -> Acts:
    """One forward with plain PyTorch hooks; every hook is removed before returning or raising."""
    blocks = find_blocks(model)
    layers = check_indices(layers, blocks.n)
    return _hooked_run(blocks, _site_modules(blocks, layers, check_sites(sites)), batch)


def _hooked_run(blocks: Blocks, mods: dict, batch: dict) -> Acts:
    last = blocks.modules[max(site_parts(name)[0] for name in mods)]
    acts: Acts = {}
    handles = []

    def keep(key):
        def hook(module, args, out):
            acts[key] = output_tensor(out)
        return hook

    def stop(module, args, out):
        raise _Stop

    try:
        for key, mod in mods.items():
            handles.append(mod.register_forward_hook(keep(key)))
        handles.append(last.register_forward_hook(stop))  # registered last: runs after `keep`
        with torch.no_grad(), contextlib.suppress(_Stop):
            blocks.decoder(**_inputs(batch, _device(blocks.model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acts


@contextlib.contextmanager
def _torch_backend(model, tokenizer, layers, sites) -> Iterator[Runner]:
    blocks = find_blocks(model)
    mods = _site_modules(blocks, layers, sites)  # fails here, before any batch, on a missing submodule
    yield lambda batch: _hooked_run(blocks, mods, batch)


# ------------------------------------------------------------------ nnsight

def _optional(module: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CogprobeError(f"backend {backend!r} needs the optional package {module.split('.')[0]}; "
                            f"`{_EXTRA}`, or use backend='torch'") from None


@contextlib.contextmanager
def _nnsight_backend(model, tokenizer, layers, sites) -> Iterator[Runner]:
    nnsight = _optional("nnsight", "nnsight")
    TransformersModel = _optional("nnsight.modeling.transformers", "nnsight").TransformersModel
    model = unwrap(model)
    blocks = find_blocks(model)
    children = {s: site_child(blocks.modules[0], s) for s in sites if s != "resid"}
    order = [s for s in ("attn", "mlp", "resid") if s in sites]  # execution order inside a block
    keys = [(i, s) for i in sorted(layers) for s in order]
    before = _instance_state(model)
    try:
        wrapped = TransformersModel(model, tokenizer=tokenizer)
        envoy_layers = wrapped
        for part in blocks.layers_path.split("."):
            envoy_layers = getattr(envoy_layers, part)

        def run(batch: dict) -> Acts:
            with torch.no_grad(), wrapped.trace(_inputs(batch, _device(model)), use_cache=False) as tracer:
                outs = []
                for i, site in keys:
                    envoy = envoy_layers[i]
                    outs.append((envoy if site == "resid" else getattr(envoy, children[site])).output)
                outs = nnsight.save(outs)  # a plain list of .save()s would be lost after the block
                tracer.stop()  # nothing after the deepest requested block runs
            return {site_name(*key): output_tensor(out) for key, out in zip(keys, outs)}

        yield run
    finally:
        wrapped = envoy_layers = None
        _restore_instance_state(model, before)


def _instance_state(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    return [(m, {k: v for k, v in vars(m).items() if k == "forward" or k.startswith("__nnsight")})
            for m in model.modules()]


def _restore_instance_state(model: nn.Module, before) -> None:
    """Undo nnsight's instrumentation: it installs a controller as every module's
    instance `forward` (and state under `__nnsight__*`), which outlives the wrapper.
    Left in place it is a pass-through, but the caller's model should come back as it was."""
    for module, saved in before:
        for key in [k for k in vars(module) if k == "forward" or k.startswith("__nnsight")]:
            if key not in saved:
                delattr(module, key)
        for key, value in saved.items():
            setattr(module, key, value)


# ------------------------------------------------------------------ TransformerLens

def _bridge_tokenizer(tokenizer):
    """A private copy without BOS. We feed token ids, never text, so the bridge's
    tokenizer is unused; without BOS, TL does not reload it from `name_or_path`
    (which fails for in-memory tokenizers) nor prepend BOS anywhere."""
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = None
    return tok


@contextlib.contextmanager
def _tl_backend(model, tokenizer, layers, sites) -> Iterator[Runner]:
    bridge_module = _optional("transformer_lens.model_bridge", "transformerlens")
    model = unwrap(model)
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    arch = type(model).__name__
    try:
        bridge = bridge_module.TransformerBridge.boot_transformers(
            name, hf_model=copy.deepcopy(model), tokenizer=_bridge_tokenizer(tokenizer),
            device=_device(model), dtype=next(model.parameters()).dtype)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". Available")[0][:160]
        raise CogprobeError(f"backend 'transformerlens' cannot wrap {arch} ({type(e).__name__}: {first}); "
                            "use backend='torch'") from None
    names = {(i, s): f"blocks.{i}.{_TL_HOOKS[s]}" for i in sorted(layers) for s in sites}
    missing = sorted({_TL_HOOKS[s] for (i, s), n in names.items() if n not in bridge.hook_dict})
    if missing:
        del bridge
        raise CogprobeError(f"backend 'transformerlens' has no hook {', '.join(missing)} for {arch}; "
                            "use backend='torch'")
    wanted = list(names.values())
    stop_at = max(layers) + 1 if max(layers) + 1 < find_blocks(model).n else None  # None: run all

    def run(batch: dict) -> Acts:
        inputs = _inputs(batch, _device(model))
        with torch.no_grad():
            _, cache = bridge.run_with_cache(inputs["input_ids"], names_filter=wanted,
                                             attention_mask=inputs["attention_mask"],
                                             stop_at_layer=stop_at)
        return {site_name(*key): output_tensor(cache[n]) for key, n in names.items()}

    try:
        yield run
    finally:
        del bridge
        gc.collect()


_BACKENDS = {"torch": _torch_backend, "nnsight": _nnsight_backend, "transformerlens": _tl_backend}


def open_backend(name: str, model: nn.Module, *, layers: Sequence[int], sites: Sequence[str] = SITES[:1],
                 tokenizer=None):
    """Context manager yielding `run(batch) -> {site_name(block, site): [B, T, H] tensor}`.

    `batch` is a dict with `input_ids` and `attention_mask` (right padding).
    """
    if name not in _BACKENDS:
        raise CogprobeError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if not layers:
        raise CogprobeError("no layers to capture; give at least one block index")
    layers = check_indices(layers, find_blocks(model).n)
    if tokenizer is None and name != "torch":  # both build pipelines/bridges around it
        raise CogprobeError(f"backend {name!r} needs the model's tokenizer; pass tokenizer=... "
                            "(or (step, model, tokenizer) tuples), or use backend='torch'")
    return _BACKENDS[name](model, tokenizer, layers, check_sites(sites))
