"""Training-loss memory benchmark: the model's own loss against the chunked loss on scored positions.

`TrainConfig.loss_chunk_tokens` (cogprobe/tuning/loss.py) computes the cross-entropy from the
positions with a label only, `chunk` tokens of logits at a time, recomputed in the backward pass.
What that saves grows with the vocabulary and the tokens of a step, so two models train here, each
with the model's own loss (chunk 0) and with chunks of 1,024 tokens, full fine-tuning at one fixed
batch of long rows, in a fresh subprocess each:

  embedded    SmolLM2-135M (49,152-token vocabulary, tied head)
  vocab-128k  a random-initialised Llama with SmolLM2's blocks cut to 4 and Llama 3's 128,256-token
              untied head: the case of the models researchers adapt (Llama 3, Qwen 2.5 at 152k),
              whose logits outweigh a few blocks' activations (the tokenizer is SmolLM2's, so only
              its first 49,152 rows are ever read: the head's cost is its size, not the ids)

Measured per case, from the run's own files and one exact peak (`tuning_bench.train_measured`):
  peak_rss_mib     the process's peak RSS over the measured steps (high-water mark reset after
                   the warm-up step, which allocates the optimizer state)
  sec_per_step     median of train_log.parquet `seconds` over the measured steps
  loss_step_1      the first step's loss: the two losses of a model agree to float order
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tuning_bench  # noqa: E402

SIZES = dict(full=dict(batch_size=4, seq_len=512, measured=2, chunk=1024),
             tiny=dict(batch_size=2, seq_len=32, measured=1, chunk=8))
CASES = ("embedded, own loss", "embedded, chunked", "vocab-128k, own loss", "vocab-128k, chunked")
VOCAB_128K = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=128256, tie_word_embeddings=False)
TINY_128K = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False)
COLUMNS = ["name", "peak_rss_mib", "peak_vs_own", "sec_per_step", "loss_step_1", "chunk", "batch_size", "seq_len",
           "vocab", "measured_steps", "memory_kind"]


def sizes() -> dict:
    return SIZES["tiny" if common.tiny() else "full"]


def model_folder(name: str) -> str:
    """The embedded model, or the 128k-vocabulary Llama saved once in the benchmark cache."""
    if name == "embedded":
        return common.model_spec()
    import torch
    import transformers as tf
    from cogprobe.core import io
    folder = common.cache_dir() / "loss-vocab-128k"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        shape = TINY_128K if common.tiny() else VOCAB_128K
        model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**shape, max_position_embeddings=2048,
                                                                   bos_token_id=1, eos_token_id=2))
        tokenizer = Path(common.model_spec()) if common.tiny() else _embedded_dir()
        with io.atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            for f in tokenizer.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens")):
                    (tmp / f.name).write_bytes(f.read_bytes())
    return str(folder)


def _embedded_dir() -> Path:
    from cogprobe.models.loading import embedded_dir
    common.n_layers()   # prepares the embedded model if needed
    return embedded_dir()


def measure(case: str) -> dict:
    from cogprobe.tuning.loop import TrainConfig
    s = sizes()
    model, loss = case.split(", ")
    chunk = s["chunk"] if loss == "chunked" else 0
    steps = 1 + s["measured"]
    mem = common.PeakMemory()
    with tempfile.TemporaryDirectory(prefix="cogprobe-loss-") as tmp:
        cfg = TrainConfig(model=model_folder(model), corpus=str(common.train_corpus()), out=Path(tmp) / "run",
                          strategy="full", steps=steps, batch_size=s["batch_size"], seq_len=s["seq_len"], warmup=0,
                          save_steps=str(steps), progress=False, threads=common.threads(), loss_chunk_tokens=chunk)
        seen = {}
        log = tuning_bench.train_measured(cfg, mem, on_first=lambda m: seen.update(
            vocab=m.get_output_embeddings().weight.shape[0]))
    return dict(name=case, model=model, chunk=chunk, seconds=log[log["step"] > 1]["seconds"].tolist(),
                loss_step_1=float(log["loss"].iloc[0]), peak=mem.peak, memory_kind=mem.kind, vocab=seen["vocab"],
                batch_size=s["batch_size"], seq_len=s["seq_len"])


def rows_from(results: list[dict]) -> list[dict]:
    own = {r["model"]: r["peak"] for r in results if r["chunk"] == 0}
    return [dict(name=r["name"], peak_rss_mib=r["peak"] / common.MiB, peak_vs_own=r["peak"] / own[r["model"]],
                 sec_per_step=statistics.median(r["seconds"]), loss_step_1=r["loss_step_1"], chunk=r["chunk"],
                 batch_size=r["batch_size"], seq_len=r["seq_len"], vocab=r["vocab"], measured_steps=len(r["seconds"]),
                 memory_kind=r["memory_kind"]) for r in results]


def check_targets(rows: list[dict]) -> list[dict]:
    """The chunked loss must not cost memory, and must save some where the vocabulary is large."""
    by = {r["name"]: r for r in rows}
    big = float(by["vocab-128k, chunked"]["peak_vs_own"])
    same = abs(by["embedded, chunked"]["loss_step_1"] - by["embedded, own loss"]["loss_step_1"])
    return [dict(benchmark="loss", target="chunked loss peak <= 0.9x the own loss's at a 128k vocabulary",
                 value=f"{big:.2f}x", met=big <= 0.9),
            dict(benchmark="loss", target="the two losses agree (first step, embedded) to 1e-3",
                 value=f"{same:.1e}", met=same <= 1e-3)]


def main() -> None:
    import argparse
    args = common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS),
        p.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)))
    if args.worker_json:
        common.write_worker_result(args.worker_json, measure(args.case))
        return
    info = common.machine_info()
    common.train_corpus()
    for name in ("embedded", "vocab-128k"):
        model_folder(name)   # built once, before the workers
    results = []
    for case in CASES:
        print(f"loss: {case} ...", flush=True)
        results.append(common.measure_in_worker(Path(__file__), measure, "--case", case))
    rows = rows_from(results)
    path = common.write_csv("loss", rows, info)
    print(common.show(f"training-loss memory (batch {rows[0]['batch_size']} x {rows[0]['seq_len']} tokens)", rows,
                      COLUMNS[:8]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
