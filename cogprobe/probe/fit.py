"""Which exact sweep engine fits in the memory a probe may use.

The in-memory engine (`memory`, formerly `fast`) holds the reference and one checkpoint whole,
plus up to `CACHE_BYTES` of reference states it reuses across checkpoints. The streamed engine
(`probe.streamed`) holds two blocks, each model's ends (embeddings, final norm, head) and the
states in flight. `auto` picks the in-memory engine when it fits, since it does less work (it
reuses reference states across checkpoints), and the streamed one otherwise. A budget too small even for the streamed engine fails in one line that
names the smallest that would work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from weakref import WeakKeyDictionary

from cogprobe.core.errors import CogprobeError
from cogprobe.core.memory import available, gib, parse_bytes
from cogprobe.models.blocks import find_blocks
from cogprobe.probe.engine import CACHE_BYTES, largest_batch
from cogprobe.probe.streamed import Skeleton, StreamedEngine
from cogprobe.probe.streamed_acts import Streaming

STREAMABLE = ("auto", "streamed")
SWEEP_MODELS = 2   # models a sweep holds at once: the reference and one checkpoint (`evaluate` holds one)


@dataclass(frozen=True)
class Fit:
    """What each engine needs (bytes, estimated from the weight files' headers) and what was chosen."""
    engine: str
    budget: int        # the memory the probe may use
    model: int         # one model's weights at the probe's dtype
    block: int         # the largest block
    ends: int          # embeddings, final norm and head (tied tensors once)
    in_memory: int     # the in-memory engine's need
    streamed: int      # the streamed engine's need, with one batch in flight

    def record(self) -> dict:
        return asdict(self)


def measure(skeleton: Skeleton, weights, batch_states: int, models: int = SWEEP_MODELS) -> dict:
    """Sizes at the skeleton's dtype: one model, its largest block, its ends; and each engine's need
    when the verb holds `models` models at once (a sweep two, with its state cache; `evaluate` one)."""
    sizes = weights.sizes(skeleton.dtype)
    blocks = [sum(sizes.get(n, 0) for n in skeleton.block_names(i)) for i in range(skeleton.n)]
    model = sum(sizes.values())
    ends = model - sum(blocks)
    return dict(model=model, block=max(blocks), ends=ends,
                in_memory=models * model + (CACHE_BYTES if models > 1 else 0) + batch_states,
                streamed=models * (ends + max(blocks)) + batch_states)


_SKELETONS: WeakKeyDictionary = WeakKeyDictionary()   # Checkpoints -> {(dtype, device): Skeleton}


def skeleton_of(checkpoints) -> Skeleton:
    """The reference's weightless model at the checkpoints' dtype and device, built once per
    `Checkpoints` (a study sweeps one run in several calls)."""
    built = _SKELETONS.setdefault(checkpoints, {})
    key = (checkpoints.dtype, str(checkpoints.device))
    if key not in built:
        built[key] = Skeleton(checkpoints.reference_config(), dtype=checkpoints.dtype, device=checkpoints.device)
    return built[key]


def check_precision(device, dtype) -> None:
    """A precision the device cannot compute in fails here, in one line, before anything is written."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CogprobeError(f"{torch.cuda.get_device_name(device)} cannot compute in bfloat16; pass --dtype "
                            "float16 or float32")


def check_files(checkpoints, skeleton: Skeleton) -> None:
    """Every checkpoint's weight files opened from their headers (a shard missing, or lacking a tensor
    its index places there, fails now in one line rather than halfway through the sweep)."""
    for step in checkpoints.steps:
        checkpoints.weights(step, skeleton.rename)


def skeleton_for(engine: str, checkpoints) -> Skeleton | None:
    """The weightless model an engine choice needs, or None where the models are in memory already.

    `auto` falls back to the in-memory engine where the reference cannot be read block by block
    (a single GGUF file, weights in pickle files); `streamed` says why in one line."""
    if engine not in STREAMABLE:
        return None
    if not hasattr(checkpoints, "weights"):
        if engine == "streamed":
            raise CogprobeError("the streamed engine reads checkpoints from their files; give a run folder or "
                                "Checkpoints, not models already in memory")
        return None
    try:
        skeleton = skeleton_of(checkpoints)
        checkpoints.reference_weights(skeleton.rename)
    except CogprobeError:
        if engine == "streamed":
            raise
        return None
    return skeleton


def block_count(checkpoints) -> int:
    """The reference's number of blocks, from its config where it can be (no weights read)."""
    if not checkpoints.reference_loaded:
        try:
            return skeleton_of(checkpoints).n
        except CogprobeError:
            pass
    return find_blocks(checkpoints.reference()[0]).n


def choose(engine: str, checkpoints, skeleton: Skeleton, *, max_memory=None, states: int = 0,
           models: int = SWEEP_MODELS) -> Fit:
    """What each engine needs with `states` bytes of activations in flight, and which one runs:
    `auto` is the in-memory engine where `models` models fit `max_memory` (it does less work), else the
    streamed one; a budget too small even for the streamed engine fails in one line."""
    need = measure(skeleton, checkpoints.reference_weights(skeleton.rename), states, models)
    budget = parse_bytes(max_memory) if max_memory is not None else available(checkpoints.device)
    if engine == "auto":
        engine = "memory" if need["in_memory"] <= budget else "streamed"
    if engine == "streamed" and need["streamed"] > budget:
        raise CogprobeError(f"--max-memory {gib(budget)} is too small for one block plus the activations: the "
                            f"streamed engine needs at least {gib(need['streamed'])} here ({models} block(s) of "
                            f"{gib(need['block'])}, the ends, one batch in flight); raise --max-memory or "
                            "lower --batch-size")
    return Fit(engine=engine, budget=budget, **need)


def pick(engine: str, checkpoints, skeleton: Skeleton, *, max_memory=None, batch_tokens: int = 0,
         n_configs: int = 1, models: int = SWEEP_MODELS):
    """(engine, `Fit`, the streamed engine or None) for a sweep of `checkpoints` (see `choose`): one
    batch in flight holds two states of every configuration."""
    hidden = skeleton.empty.config.get_text_config().hidden_size
    states = batch_tokens * hidden * skeleton.dtype.itemsize * 2 * (n_configs + 1)
    chosen = choose(engine, checkpoints, skeleton, max_memory=max_memory, states=states, models=models)
    runner = None
    if chosen.engine == "streamed":
        runner = StreamedEngine(skeleton, checkpoints.reference_weights(skeleton.rename),
                                state_bytes=max(states, chosen.budget - chosen.streamed + states))
    return chosen.engine, chosen, runner


def sweep_engine(engine: str, checkpoints, *, dtype, max_memory=None, examples, batch_size: int, n_configs: int):
    """(engine, `Fit` or None, the streamed engine or None) of an exact sweep of `checkpoints` at `dtype`:
    `auto` resolved to the engine that fits `max_memory`, the others as given. Checked before any file is
    written: the precision on the device, the budget, and (streamed) every checkpoint's weight files."""
    check_precision(checkpoints.device, dtype)
    skeleton = skeleton_for(engine, checkpoints)
    if skeleton is None:
        return ("memory" if engine == "auto" else engine), None, None
    chosen, fit, runner = pick(engine, checkpoints, skeleton, max_memory=max_memory,
                               batch_tokens=largest_batch(examples, batch_size), n_configs=n_configs)
    if chosen == "streamed":
        check_files(checkpoints, skeleton)
    return chosen, fit, runner


def capture_engine(o, ckpts, examples) -> tuple[Streaming | None, Fit | None]:
    """Whether a capture (`CaptureOptions` o) streams its blocks: `auto` where two models do not fit,
    never for another backend than torch (the streamed runner's hooks are torch's): `streamed`
    refuses one, `auto` keeps it in memory."""
    check_precision(ckpts.device, ckpts.dtype)
    if o.engine == "streamed" and o.backend != "torch":
        raise CogprobeError(f"--engine streamed reads activations with its own torch hooks, not {o.backend}; "
                            "pass --backend torch, or --engine memory")
    engine = o.engine if o.backend == "torch" else "memory"
    skeleton = skeleton_for(engine, ckpts)
    if skeleton is None:
        return None, None
    hidden = skeleton.empty.config.get_text_config().hidden_size
    states = largest_batch(examples, o.batch_size) * hidden * skeleton.dtype.itemsize * (skeleton.n * len(o.sites) + 2)
    chosen = choose(engine, ckpts, skeleton, max_memory=o.max_memory, states=states)
    if chosen.engine != "streamed":
        return None, chosen
    check_files(ckpts, skeleton)
    return Streaming(skeleton, state_bytes=max(states, chosen.budget - chosen.streamed + states)), chosen
