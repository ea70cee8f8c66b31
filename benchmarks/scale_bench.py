"""Scale benchmark: what a sweep costs in memory as the model grows, per engine.

Every measured variant sweeps one checkpoint against its reference, both directions, mode revert,
in a fresh subprocess, and records the process's peak resident memory (`process_peak`), the wall
time, the block evaluations and the block reads. The two engines must give the same rows
(`max_abs_dnll`, 0.0 expected).

  embedded     the embedded SmolLM2-135M and the sweep benchmark's full fine-tuning run (fp32, its
               real checkpoint), every k: the streamed engine's price where both fit
  llama-1b     random-initialised Llama shapes (hidden 2048, 16 blocks, 1.2B parameters), saved as
  llama-3b     sharded bf16 folders (hidden 3072, 28 blocks, 3.2B; llama-7b: hidden 4096, 32 blocks,
               6.7B, Llama-2-7B's blocks with this tokenizer), the checkpoint with its first and
               last blocks moved; bf16 weights; k in {0, L/4, L/2, L} (the cost is per block, the
               peak is what is measured). The in-memory engine is run only where two models fit
               the machine's memory; otherwise its row says what it would need.

A projection table (`scale_projection.csv`) gives each engine's need for Llama-3 8B and 70B
shapes and the machine's and two GPUs' memory, from the same formula the engine choice uses
(`probe.fit.measure`) on weightless models: a projection, not a measurement.

    python benchmarks/scale_bench.py            # ~25 min on 2 cores, ~45 GB of disk under the cache
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GiB = 1 << 30
SHAPES = {   # name -> (Llama config fields, dtype of the weights)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),   # Llama-2-7B's blocks
}
TINY_SHAPES = {"llama-1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True)}
PROJECTED = {   # Llama-3 shapes (config.json of the public checkpoints)
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
BUDGETS = {"this machine": None, "24 GB GPU": 24 * 10**9, "80 GB GPU": 80 * 10**9}
COLUMNS = ["model", "engine", "dtype", "params_b", "peak_gib", "need_gib", "wall_s", "block_evals", "block_loads",
           "max_abs_dnll", "ks", "pairs_per_task", "note"]
PROJECTION_COLUMNS = ["model", "dtype", "params_b", "block_gib", "ends_gib", "memory_engine_gib",
                      "streamed_engine_gib", "budget", "budget_gib", "memory_fits", "streamed_fits"]
PAIRS, MAX_TOKENS, BATCH = 2, 12, 2


def shapes() -> dict:
    return TINY_SHAPES if common.tiny() else SHAPES


# ------------------------------------------------------------------ inputs

def random_pair(name: str) -> tuple[Path, Path]:
    """(reference, checkpoint) folders of a random-initialised Llama of shape `name`, bf16, sharded
    as save_pretrained shards large models; the checkpoint moves the first and last blocks."""
    import torch
    import transformers as tf
    from cogprobe.core import io
    root = common.cache_dir() / f"scale-{name}"
    ref, ck = root / "reference", root / "checkpoint"
    if (ck / "config.json").is_file():
        return ref, ck
    torch.manual_seed(0)
    config = tf.LlamaConfig(**shapes()[name], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tokenizer = tokenizer_folder()
    for folder, move in ((ref, ()), (ck, (0, config.num_hidden_layers - 1))):
        with torch.no_grad():
            for i in move:
                for p in model.model.layers[i].parameters():
                    p.add_(0.02 * torch.randn_like(p))
        with io.atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, max_shard_size="1GB")
            for f in tokenizer.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens")):
                    (tmp / f.name).write_bytes(f.read_bytes())
    return ref, ck


def tokenizer_folder() -> Path:
    """The embedded model's tokenizer (49,152 tokens, the shapes' vocabulary); the tiny one with --tiny."""
    if common.tiny():
        return Path(common.model_spec())
    from cogprobe.models.loading import embedded_dir
    common.n_layers()   # prepares the embedded model if needed
    return embedded_dir()


# ------------------------------------------------------------------ one measurement (a subprocess)

def measure(variant: str) -> dict:
    """`model:engine` swept once; its row (and the rows, for the equality check, as a parquet path)."""
    import torch
    from cogprobe.core.memory import process_peak
    from cogprobe.data.evalset import EvalSet  # noqa: F401  (imported before timing)
    from cogprobe.probe.sweep import sweep
    from cogprobe.tuning.checkpoints import Checkpoints
    model, engine = variant.split(":")
    if model == "embedded":
        import sweep_bench
        run = sweep_bench.training_run()
        ckpts, dtype, steps = Checkpoints.open(run), torch.float32, None
        ckpts = ckpts.to("cpu", dtype)
        steps = [ckpts.steps[0], ckpts.steps[-1]]
        ks = None
    else:
        ref, ck = random_pair(model)
        ckpts, dtype, steps = Checkpoints.open([str(ref), str(ck)]), torch.bfloat16, None
        ckpts = ckpts.to("cpu", dtype)
        n = shapes()[model]["num_hidden_layers"]
        ks = sorted({0, n // 4, n // 2, n})
    tok = ckpts.reference_tokenizer()
    examples = common.heldout_examples(tok, PAIRS, MAX_TOKENS)
    start = time.perf_counter()
    table = sweep(ckpts, examples, mode="revert", ks=ks, engine=engine, steps=steps, batch_size=BATCH)
    wall = time.perf_counter() - start
    rows = common.cache_dir() / f"scale-rows-{model}-{engine}.parquet"
    table.to_parquet(rows)
    peak = process_peak()
    fit = sizes(ckpts)
    return dict(model=model, engine=table.attrs["engine"], dtype=str(dtype).removeprefix("torch."),
                params_b=round(fit["model"] / dtype.itemsize / 1e9, 3), peak_gib=round(peak / GiB, 2),
                need_gib=round(fit["in_memory" if engine == "memory" else "streamed"] / GiB, 2),
                wall_s=round(wall, 1), block_evals=table.attrs["block_evals"], block_loads=table.attrs["block_loads"],
                ks="all" if ks is None else ",".join(map(str, ks)), pairs_per_task=PAIRS, rows=str(rows))


def sizes(ckpts) -> dict:
    """Each engine's need for `ckpts` (one batch in flight), from the weight files' headers alone."""
    from cogprobe.probe.fit import measure as fit_measure, skeleton_of
    skeleton = skeleton_of(ckpts)
    return fit_measure(skeleton, ckpts.reference_weights(skeleton.rename), 0)


def need(model: str) -> dict:
    """The engines' needs for `model` and the memory available, without a sweep: for the rows of an
    engine that would not fit."""
    import torch
    from cogprobe.core.memory import available
    from cogprobe.tuning.checkpoints import Checkpoints
    ref, ck = random_pair(model)
    return dict(sizes(Checkpoints.open([str(ref), str(ck)]).to("cpu", torch.bfloat16)), available=available())


# ------------------------------------------------------------------ the projection

def projection() -> list[dict]:
    """Each engine's need for 8B and 70B Llama shapes, from weightless models: a projection."""
    import torch
    import transformers as tf
    from cogprobe.core.memory import available
    from cogprobe.probe.engine import CACHE_BYTES
    from cogprobe.probe.streamed import Skeleton
    rows = []
    for name, fields in PROJECTED.items():
        skeleton = Skeleton(tf.LlamaConfig(**fields), dtype=torch.bfloat16)
        sizes = {n: p.numel() * 2 for n, p in skeleton.empty.named_parameters()}
        blocks = [sum(sizes[n] for n in skeleton.block_names(i)) for i in range(skeleton.n)]
        model, block = sum(sizes.values()), max(blocks)
        ends = model - sum(blocks)
        states = BATCH * 64 * fields["hidden_size"] * 2 * 2 * 64   # batch 2 x 64 tokens, 64 configurations
        memory, streamed = 2 * model + CACHE_BYTES + states, 2 * ends + 2 * block + states
        for budget, size in BUDGETS.items():
            size = size or available()
            rows.append(dict(model=name, dtype="bfloat16", params_b=round(model / 2 / 1e9, 2),
                             block_gib=round(block / GiB, 2), ends_gib=round(ends / GiB, 2),
                             memory_engine_gib=round(memory / GiB, 1), streamed_engine_gib=round(streamed / GiB, 2),
                             budget=budget, budget_gib=round(size / GiB, 1), memory_fits=memory <= size,
                             streamed_fits=streamed <= size))
    return rows


# ------------------------------------------------------------------ the table

def max_abs_dnll(a: str, b: str) -> float:
    import pandas as pd
    keys = ["checkpoint_step", "task", "direction", "k"]
    merged = pd.read_parquet(a).merge(pd.read_parquet(b), on=keys, suffixes=("_a", "_b"), validate="one_to_one")
    return float((merged["nll_a"] - merged["nll_b"]).abs().max())


def variants() -> list[str]:
    return ["embedded:memory", "embedded:streamed"] + [f"{m}:{e}" for m in shapes() for e in ("memory", "streamed")]


def check_targets(rows: list[dict]) -> list[dict]:
    out = []
    by = {(r["model"], r["engine"]): r for r in rows}
    emb_m, emb_s = by.get(("embedded", "memory")), by.get(("embedded", "streamed"))
    if emb_m and emb_s:
        ratio = emb_s["wall_s"] / emb_m["wall_s"]
        out.append(dict(benchmark="scale", target="embedded model: streamed wall <= 1.3x memory",
                        value=f"{ratio:.2f}x", met=ratio <= 1.3))
        out.append(dict(benchmark="scale", target="embedded model: the same rows (max |dNLL| = 0)",
                        value=f"{emb_s['max_abs_dnll']:.1e}", met=emb_s["max_abs_dnll"] == 0.0))
    big = [r for r in rows if r["engine"] == "streamed" and r["model"] != "embedded"]
    if len(big) >= 2:
        small, large = big[0], big[-1]
        grew = large["peak_gib"] / small["peak_gib"]
        out.append(dict(benchmark="scale", target="streamed peak grows less than the model",
                        value=f"peak x{grew:.2f} for params x{large['params_b'] / small['params_b']:.2f}",
                        met=grew < large["params_b"] / small["params_b"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-json")
    parser.add_argument("--variant")
    known, rest = parser.parse_known_args()
    if known.worker_json:
        sys.argv = [sys.argv[0], *rest]
        common.parse_args(__doc__.splitlines()[0])
        what, _, model = known.variant.partition(":")
        common.write_worker_result(known.worker_json, need(model) if what == "need" else measure(known.variant))
        return
    common.parse_args(__doc__.splitlines()[0])
    info = common.machine_info()
    rows = []
    for variant in variants():
        model, engine = variant.split(":")
        if engine == "memory" and model != "embedded":
            fit = common.run_worker(Path(__file__), ["--variant", f"need:{model}"]) if not common.in_process() \
                else need(model)
            if fit["in_memory"] > 0.8 * fit["available"]:
                rows.append(dict(model=model, engine="memory", dtype="bfloat16",
                                 params_b=round(fit["model"] / 2 / 1e9, 3), peak_gib=None,
                                 need_gib=round(fit["in_memory"] / GiB, 2), wall_s=None, block_evals=None,
                                 block_loads=None, max_abs_dnll=None, ks="", pairs_per_task=PAIRS,
                                 note=f"not run: needs {fit['in_memory'] / GiB:.1f} GiB, "
                                      f"{fit['available'] / GiB:.1f} GiB available"))
                continue
        print(f"scale: {variant} ...", flush=True)
        row = common.measure_in_worker(Path(__file__), measure, "--variant", variant)
        rows.append(dict(row, note=""))
    for row in rows:   # the streamed rows against the in-memory ones, where both ran
        twin = next((r for r in rows if r["model"] == row["model"] and r["engine"] == "memory" and r.get("rows")), None)
        row.setdefault("max_abs_dnll", max_abs_dnll(row["rows"], twin["rows"])
                       if twin and row.get("rows") and row["engine"] == "streamed" else None)
    rows = [{c: row.get(c) for c in COLUMNS} for row in rows]
    common.write_csv("scale", rows, info)
    common.write_csv("scale_projection", projection(), info)
    print(common.show("scale (one checkpoint against its reference, both directions)", rows, COLUMNS))
    print(common.show("scale projection (weightless models; not measured)", projection(), PROJECTION_COLUMNS))
    for t in check_targets(rows):
        print(f"target: {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
