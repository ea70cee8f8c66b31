"""Capture benchmark: per-block residual capture with an on-the-fly reduction, four ways.

The same batch (held-out axolotl production examples) through the same model
(SmolLM2-135M, eager attention); nnsight with and without its early stop:

  plain forward     model(...): no hooks, no capture; the floor (runs the LM head)
  plain decoder     the decoder alone (no final norm, no LM head): what a capture that
                    stops after the last block can at best cost; for reference
  cogprobe          open_backend("torch", layers=all, sites=("resid",)) -> run(batch);
                    it stops after the deepest requested block, so it skips the LM head
  transformerlens   TransformerBridge.run_with_cache(names_filter=the 30 hook_resid_post);
                    TL cannot stop after the last block: its stop_at_layer=i stops *before*
                    block i < L, and stop_at_layer=L runs everything (head included)
  nnsight           a trace saving the 30 block outputs
  nnsight, tracer.stop()   the same, stopped after the last saved output

Every capturing way reduces what it captured the same way, inside the measured
call: a running mean, per block, of the residual's L2 norm over the real (not
padding) tokens. The means are compared across ways (`max_abs_diff_vs_cogprobe`),
so a fast but wrong capture shows.

Time: one subprocess holds every way at once (the peers on their own copies of
the model, since they instrument what they are given) and times them in
`repeats` interleaved rounds, each way once per round in a rotated order, after
`warmup` untimed calls each: a change in the machine's load then hits all ways
alike. `seconds` is the median per way (`seconds_min` the fastest call); setting a way up (hooks, bridge boot,
wrapping) is not timed (`setup_s`, measured in the memory run).
Memory (see `common.PeakMemory`): each way alone in a fresh subprocess, over
`warmup` + `memory_calls` calls:
  peak_rss_mib     the process's peak resident memory: weights, the tool's libraries
                   and setup, and the call's own tensors
  call_extra_mib   that peak minus the resident memory just before the first call:
                   what capturing one batch adds. Measured from before the warm-up
                   because memory freed by a call stays in the allocator's free lists
                   and would not show again as growth in later calls; the weights
                   (memory-mapped, paged in lazily) are read once before, so they
                   are not counted as the first call's.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = dict(full=dict(batch=8, max_sentence_tokens=32, repeats=7, warmup=1, memory_calls=2),
             tiny=dict(batch=4, max_sentence_tokens=8, repeats=2, warmup=1, memory_calls=1))
# name -> (description, runs the LM head)
VARIANTS = {
    "plain forward": ("model(...) with no hooks: the floor", True),
    "plain decoder": ("decoder only, no final norm / LM head: no capture, for reference", False),
    "cogprobe": ("open_backend('torch') -> run(batch); stops after the last requested block", False),
    "transformerlens": ("TransformerBridge.run_with_cache, names_filter = the resid_post hooks", True),
    "nnsight": ("trace saving every block output", True),
    "nnsight, tracer.stop()": ("the same, tracer.stop() after the last saved output", False),
}
PEERS = ("transformerlens", "nnsight", "nnsight, tracer.stop()")
COLUMNS = ["method", "seconds", "ratio_to_plain", "seconds_min", "peak_rss_mib", "call_extra_mib", "runs_lm_head",
           "max_abs_diff_vs_cogprobe", "setup_s", "repeats", "batch", "real_tokens", "layers",
           "memory_kind", "description"]


def sizes() -> dict:
    return SIZES["tiny" if common.tiny() else "full"]


# ------------------------------------------------------------------ the ways

class NormMeans:
    """Running mean, per block, of the residual's L2 norm over real tokens (float64 sums)."""

    def __init__(self, n_layers: int):
        self.sums = [0.0] * n_layers
        self.counts = [0] * n_layers

    def add(self, acts: dict, mask) -> None:
        real = mask.bool()
        for i, h in acts.items():
            norms = h.float().norm(dim=-1)[real.to(h.device)]
            self.sums[i] += float(norms.double().sum())
            self.counts[i] += int(norms.numel())

    def means(self) -> list[float]:
        return [s / c if c else float("nan") for s, c in zip(self.sums, self.counts)]


@contextlib.contextmanager
def _way(name: str, model, tok, layers: list[int]):
    """Yield `capture(batch) -> {layer: [B, T, H]} or None` for one way."""
    from cogprobe.models.blocks import find_blocks
    blocks = find_blocks(model)
    inputs = lambda b: dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])  # noqa: E731
    if name == "plain forward":
        yield lambda b: (model(**inputs(b), use_cache=False), None)[1]
    elif name == "plain decoder":
        yield lambda b: (blocks.decoder(**inputs(b), use_cache=False), None)[1]
    elif name == "cogprobe":
        from cogprobe.probe.backends import open_backend, site_parts
        with open_backend("torch", model, layers=layers, sites=("resid",)) as run:
            yield lambda b: {site_parts(name)[0]: t for name, t in run(b).items()}
    elif name == "transformerlens":
        yield _tl(model, tok, layers)
    elif name.startswith("nnsight"):
        yield _nnsight(model, tok, blocks.layers_path, layers, stop=name != "nnsight")
    else:
        raise ValueError(name)


def _tl(model, tok, layers):
    """The bridge booted on the model itself, as a TransformerLens user would (it rewrites the
    model's modules in place; cogprobe's own TL backend boots a copy to leave the caller's
    model alone). The tokenizer loses BOS so TL does not reload it from name_or_path; we pass
    token ids, never text (see cogprobe.backends._bridge_tokenizer)."""
    from transformer_lens.model_bridge import TransformerBridge
    tk = copy.deepcopy(tok)
    tk.bos_token = None
    bridge = TransformerBridge.boot_transformers(model.config.name_or_path, hf_model=model, tokenizer=tk,
                                                 device=next(model.parameters()).device,
                                                 dtype=next(model.parameters()).dtype)
    names = {i: f"blocks.{i}.hook_resid_post" for i in layers}

    def capture(b):
        _, cache = bridge.run_with_cache(b["input_ids"], names_filter=list(names.values()),
                                         attention_mask=b["attention_mask"])
        return {i: cache[n] for i, n in names.items()}
    return capture


def _nnsight(model, tok, layers_path: str, layers, stop: bool):
    import nnsight
    from nnsight.modeling.transformers import TransformersModel
    wrapped = TransformersModel(model, tokenizer=tok)
    envoys = wrapped
    for part in layers_path.split("."):
        envoys = getattr(envoys, part)

    def capture(b):
        inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        with wrapped.trace(inputs, use_cache=False) as tracer:
            outs = nnsight.save([envoys[i].output for i in layers])
            if stop:
                tracer.stop()
        return {i: (o[0] if isinstance(o, tuple) else o) for i, o in zip(layers, outs)}
    return capture


# ------------------------------------------------------------------ measuring

TIMING = "timing"  # the worker that times every way, interleaved


def _inputs():
    """(model, tokenizer, batch, layers): the model's weights paged in, the batch collated."""
    from cogprobe.models.blocks import find_blocks
    from cogprobe.data.tasks import collate
    s = sizes()
    model, tok = common.load_bench_model("eager")
    common.touch_weights(model)
    examples = common.heldout_examples(tok, s["batch"], s["max_sentence_tokens"])["production"]
    return model, tok, collate(examples, pad_id=0), list(range(find_blocks(model).n))


def _call(capture, batch, reducer: NormMeans):
    def call():
        acts = capture(batch)
        if acts is not None:
            reducer.add(acts, batch["attention_mask"])
    return call


def measure(name: str) -> dict:
    """Memory and captured norms of one way, alone in this (fresh) process; or, for
    name == TIMING, the times of all ways."""
    import torch
    if name == TIMING:
        return time_all()
    s = sizes()
    model, tok, batch, layers = _inputs()
    reducer = NormMeans(len(layers))
    t0 = time.perf_counter()
    with torch.no_grad(), _way(name, model, tok, layers) as capture:
        setup_s = time.perf_counter() - t0
        call = _call(capture, batch, reducer)
        # From before the first call: the warm-up call's allocations stay in the
        # allocator's free lists and would not show as growth in later calls.
        with common.PeakMemory() as mem:
            for _ in range(s["warmup"] + s["memory_calls"]):
                call()
    return dict(method=name, setup_s=setup_s, peak=mem.peak, extra=mem.extra, memory_kind=mem.kind,
                norms=reducer.means() if reducer.counts[0] else None,
                batch="x".join(map(str, batch["input_ids"].shape)),
                real_tokens=int(batch["attention_mask"].sum()), layers=len(layers))


def time_all() -> dict:
    """Every way's call times, interleaved in one process: each round times every way once
    (in a rotated order), so a change in the machine's load hits all ways alike. The peers
    get their own copy of the model, since they instrument the model they are given."""
    import contextlib
    import torch
    s = sizes()
    model, tok, batch, layers = _inputs()
    calls = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for name in VARIANTS:
            own = model if name in ("plain forward", "plain decoder", "cogprobe") else copy.deepcopy(model)
            capture = stack.enter_context(_way(name, own, tok, layers))
            calls[name] = _call(capture, batch, NormMeans(len(layers)))
        for call in calls.values():
            for _ in range(s["warmup"]):
                call()
        names = list(calls)
        seconds: dict[str, list[float]] = {n: [] for n in names}
        for r in range(s["repeats"]):
            for n in names[r % len(names):] + names[:r % len(names)]:
                seconds[n] += common.times(calls[n], 1, warmup=0)
    return dict(seconds=seconds)


# ------------------------------------------------------------------ the table

def rows_from(results: list[dict], timing: dict) -> list[dict]:
    import statistics
    secs = {n: statistics.median(t) for n, t in timing["seconds"].items()}
    repeats = len(timing["seconds"]["plain forward"])
    ref = next(r for r in results if r["method"] == "cogprobe")["norms"]
    rows = []
    for r in results:
        sec = secs[r["method"]]
        diff = (max(abs(a - b) for a, b in zip(r["norms"], ref)) if r["norms"] is not None else None)
        desc, head = VARIANTS[r["method"]]
        rows.append(dict(method=r["method"], seconds=sec, ratio_to_plain=sec / secs["plain forward"],
                         seconds_min=min(timing["seconds"][r["method"]]),
                         peak_rss_mib=r["peak"] / common.MiB, call_extra_mib=r["extra"] / common.MiB,
                         runs_lm_head=head, max_abs_diff_vs_cogprobe=diff, setup_s=r["setup_s"],
                         repeats=repeats, batch=r["batch"], real_tokens=r["real_tokens"],
                         layers=r["layers"], memory_kind=r["memory_kind"], description=desc))
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue targets: cogprobe <= 1.10x the plain forward, and faster and lighter than both peers
    (nnsight at its better row, with or without tracer.stop(); lighter = the call's own
    peak memory above what the process held before it)."""
    by = {r["method"]: r for r in rows}
    me = by["cogprobe"]
    out = [dict(benchmark="capture", target="cogprobe time <= 1.10x plain forward",
                value=f"{me['ratio_to_plain']:.2f}x", met=me["ratio_to_plain"] <= 1.10)]
    for peer in ("transformerlens", "nnsight"):
        mine = [by[m] for m in PEERS if m.startswith(peer) and m in by]
        best_t = min(float(r["seconds"]) for r in mine)
        best_m = min(float(r["call_extra_mib"]) for r in mine)
        out.append(dict(benchmark="capture", target=f"cogprobe faster than {peer}",
                        value=f"{float(me['seconds']):.3f}s vs {best_t:.3f}s", met=float(me["seconds"]) < best_t))
        out.append(dict(benchmark="capture", target=f"cogprobe lighter than {peer} (call's extra memory)",
                        value=f"{float(me['call_extra_mib']):.3g} vs {best_m:.3g} MiB",
                        met=float(me["call_extra_mib"]) < best_m))
    return out


def main() -> None:
    import argparse
    args = common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS),
        p.add_argument("--method", choices=[*VARIANTS, TIMING], help=argparse.SUPPRESS)))
    if args.worker_json:
        common.write_worker_result(args.worker_json, measure(args.method))
        return
    info = common.machine_info()
    common.model_spec(), common.train_corpus()  # made once, before the workers
    print(f"capture: timing every way, {sizes()['repeats']} interleaved rounds ...", flush=True)
    timing = common.measure_in_worker(Path(__file__), measure, "--method", TIMING)
    results = []
    for name in VARIANTS:
        print(f"capture: memory of {name} ...", flush=True)
        results.append(common.measure_in_worker(Path(__file__), measure, "--method", name))
    rows = rows_from(results, timing)
    path = common.write_csv("capture", rows, info)
    print(common.show("capture (seconds: median per call; memory: MiB)", rows, COLUMNS[:7]))
    print("note: cogprobe stops after the deepest requested block, so it skips the final norm and the "
          "LM head that the plain forward runs (and TransformerLens too: it cannot stop after the last "
          "block); nnsight is shown both ways. Differences of a few percent are within the noise.")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
