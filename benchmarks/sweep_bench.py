"""Sweep benchmark: the fast engine against the naive engine, and against the floor.

The checkpoints are real: `cogprobe.train` fully fine-tunes the model for a few
steps on the first pairs of axolotl and saves 4 checkpoints (cached in
benchmarks/.cache; trained once). Full fine-tuning changes every block and the
embeddings, which is the hard case for the fast engine: no block can be shared
with the reference just because it did not change.

Two scenarios, each the full two-direction revert sweep (every k in 0..L, both
directions, plus the reference and checkpoint scores) of held-out pairs:
  1 checkpoint     the last checkpoint against step 0
  4 checkpoints    all four, one engine call (the fast engine's reference-only
                   prefix cache is shared across them)
Each is run once per engine (a sweep is long; a second timing would not fit the
time budget). Wall time includes loading each checkpoint, the same for both.

The floor: the fewest block evaluations an exact sweep needs. Every configuration
is a path of per-block sources (the embeddings' source first); the hidden state
after a path prefix is one block evaluation, and two configurations that share a
prefix share its state. Blocks a checkpoint did not change are the reference's
(`r`), and a prefix of reference blocks only does not depend on the checkpoint,
so it is shared across checkpoints. Hence floor = (distinct trie nodes over all
configurations of all checkpoints) x (batches). It is computed here from the
configurations and the tensors each checkpoint changed, not from the engine.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = dict(
    full=dict(pairs=3, max_sentence_tokens=16, batch_size=8,
              train=dict(steps=4, batch_size=8, seq_len=64, lr=3e-4, save_steps="1,2,3,4")),
    tiny=dict(pairs=3, max_sentence_tokens=8, batch_size=2,
              train=dict(steps=4, batch_size=2, seq_len=16, lr=1e-2, save_steps="1,2,3,4")),
)
COLUMNS = ["scenario", "engine", "wall_s", "speedup", "block_evals", "floor_block_evals",
           "evals_over_floor", "max_abs_dnll", "checkpoints", "steps", "configs_per_checkpoint",
           "batches", "pairs_per_task", "max_sentence_tokens", "changed", "checkpoint_source"]


def sizes() -> dict:
    return SIZES["tiny" if common.tiny() else "full"]


# ------------------------------------------------------------------ checkpoints

def training_run() -> Path:
    """A finished full fine-tuning run with 4 checkpoints, trained once and cached.

    The folder is named by a hash of the config, so a changed config trains a new run;
    an interrupted one resumes.
    """
    from cogprobe.tuning.loop import TrainConfig, train
    t = sizes()["train"]
    spec = dict(model=common.model_spec(), corpus=str(common.train_corpus()), strategy="full",
                warmup=0, seed=0, **t)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    out = common.cache_dir() / f"sweep-run-full-{digest}"
    return train(TrainConfig(**spec, out=out, resume=True, progress=False, threads=common.threads()))


def changes(ckpts, step: int) -> tuple[set[int], bool]:
    """(blocks the checkpoint changed, whether it changed the input embeddings)."""
    from cogprobe.models.blocks import find_blocks
    blocks = find_blocks(ckpts.reference()[0])
    names = ckpts.changed_tensors(step)
    changed = {i for n in names if (i := blocks.block_of(n)) is not None}
    return changed, any(n in names for n in blocks.input_end_names())


# ------------------------------------------------------------------ the floor

def all_configs(n_layers: int) -> list:
    """What `sweep(mode="revert")` evaluates for one checkpoint."""
    from cogprobe.probe.sweep import checkpoint_config, reference_config, sweep_configs
    return [reference_config(n_layers), checkpoint_config(n_layers)] + sweep_configs(n_layers, mode="revert")


def trie_nodes(configs, changed: set[int], embed_changed: bool, owner) -> set:
    """The block-evaluating trie nodes of one checkpoint's configurations.

    A node is (owner, source prefix); the owner is None for prefixes that run no checkpoint
    weights (shared by every checkpoint), else the checkpoint. Skipped blocks cost nothing.
    """
    nodes = set()
    for c in configs:
        emb = "r" if c.embed == "r" or not embed_changed else "c"
        key = (emb,) + tuple("r" if s == "c" and i not in changed else s for i, s in enumerate(c.sources))
        for depth in range(1, len(key)):
            if key[depth] == "s":
                continue
            prefix = key[:depth + 1]
            nodes.add((None if set(prefix) <= {"r", "s"} else owner, prefix))
    return nodes


def floor_block_evals(configs, changes_by_step: dict, n_batches: int) -> int:
    nodes = set()
    for step, (changed, embed_changed) in changes_by_step.items():
        nodes |= trie_nodes(configs, changed, embed_changed, step)
    return len(nodes) * n_batches


# ------------------------------------------------------------------ measuring

KEYS = ["checkpoint_step", "task", "direction", "mode", "k"]


def max_abs_dnll(a, b) -> float:
    merged = a.merge(b, on=KEYS, suffixes=("_a", "_b"), validate="one_to_one")
    if len(merged) != len(a) or len(a) != len(b):
        raise RuntimeError("fast and naive sweeps returned different rows")
    return float((merged["nll_a"] - merged["nll_b"]).abs().max())


def run_scenario(name: str, ckpts, steps: list[int], examples: dict, source: str) -> list[dict]:
    from cogprobe.models.blocks import find_blocks
    from cogprobe.probe.sweep import sweep
    s = sizes()
    n_layers = find_blocks(ckpts.reference()[0]).n
    tables, walls = {}, {}
    for engine in ("fast", "naive"):
        print(f"sweeps: {name}, {engine} engine ...", flush=True)
        start = time.perf_counter()
        tables[engine] = sweep(ckpts, examples, mode="revert", engine=engine, steps=steps,
                               batch_size=s["batch_size"])
        walls[engine] = time.perf_counter() - start
        print(f"sweeps: {name}, {engine} engine: {walls[engine]:.0f}s", flush=True)
    configs = all_configs(n_layers)
    by_step = {st: changes(ckpts, st) for st in steps}
    n_batches = sum(math.ceil(len(e) / s["batch_size"]) for e in examples.values())
    floor = floor_block_evals(configs, by_step, n_batches)
    dnll = max_abs_dnll(tables["fast"], tables["naive"])
    changed = "; ".join(f"step {st}: {len(c)}/{n_layers} blocks{' + embeddings' if e else ''}"
                        for st, (c, e) in by_step.items())
    rows = []
    for engine in ("fast", "naive"):
        evals = int(tables[engine].attrs["block_evals"])
        rows.append(dict(scenario=name, engine=engine, wall_s=walls[engine],
                         speedup=walls["naive"] / walls[engine], block_evals=evals,
                         floor_block_evals=floor, evals_over_floor=evals / floor, max_abs_dnll=dnll,
                         checkpoints=len(steps), steps=",".join(map(str, steps)),
                         configs_per_checkpoint=len(set(configs)), batches=n_batches,
                         pairs_per_task=s["pairs"], max_sentence_tokens=s["max_sentence_tokens"],
                         changed=changed, checkpoint_source=source))
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue targets: fast >= 1.8x naive on one checkpoint; fast within 1.2x of the floor."""
    out = []
    for r in rows:
        if r["engine"] != "fast":
            continue
        if r["scenario"] == "1 checkpoint":
            out.append(dict(benchmark="sweeps", target="fast >= 1.8x naive (1 checkpoint, wall time)",
                            value=f"{float(r['speedup']):.2f}x", met=float(r["speedup"]) >= 1.8))
        out.append(dict(benchmark="sweeps", target=f"fast within 1.2x of the floor ({r['scenario']})",
                        value=f"{float(r['evals_over_floor']):.3f}x", met=float(r["evals_over_floor"]) <= 1.2))
        out.append(dict(benchmark="sweeps", target=f"fast == naive results ({r['scenario']})",
                        value=f"max |dnll| {float(r['max_abs_dnll']):.1e}", met=float(r["max_abs_dnll"]) <= 1e-4))
    return out


def main() -> None:
    common.parse_args(__doc__.splitlines()[0])
    from cogprobe.tuning.checkpoints import Checkpoints
    info = common.machine_info()
    s = sizes()
    print("sweeps: training the checkpoints (cached after the first run) ...", flush=True)
    start = time.perf_counter()
    run = training_run()
    print(f"sweeps: checkpoints ready in {time.perf_counter() - start:.0f}s: {run}", flush=True)
    ckpts = Checkpoints.open(run)
    base, tok = ckpts.reference()  # read once, outside the timings
    trained = [st for st in ckpts.steps if st != ckpts.reference_step]
    t = s["train"]
    source = (f"cogprobe.train full fine-tuning, {t['steps']} steps of {t['batch_size']}x{t['seq_len']} "
              f"tokens, lr {t['lr']}, checkpoints {','.join(map(str, trained))}")
    examples = common.heldout_examples(tok, s["pairs"], s["max_sentence_tokens"])
    rows = run_scenario("1 checkpoint", ckpts, trained[-1:], examples, source)
    rows += run_scenario("4 checkpoints", ckpts, trained[-4:], examples, source)
    path = common.write_csv("sweeps", rows, info)
    print(common.show("sweeps (full two-direction revert sweep, every k)", rows, COLUMNS[:8]))
    print(f"checkpoints: {source}; changed: {rows[-1]['changed']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
