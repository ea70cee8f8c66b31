"""Tuning-cost benchmark: what one training step costs under each strategy.

Each strategy runs `cogprobe.train` itself (the same loop users run: AdamW,
accelerate, packed axolotl text) in a fresh subprocess, at one fixed batch and
sequence length, for 1 warm-up step + a few measured steps:

  full            every parameter
  cogsym layers   strategy layers, layers "cogsym" (the outer round(L/4) blocks:
                  0-3 and 26-29 of 30)
  lora            LoRA r=8 (alpha 16, dropout 0.05) on every linear module of every block
  cogsym lora     the same LoRA on the CogSym blocks only (strategy lora-layers)
  last quarter    strategy layers on the last round(L/4) blocks (22-29 of 30): the same
                  number of blocks as CogSym, so the comparison is where, not how many
                  (a quarter of 30 is 7.5; the CogSym rule's rounding gives 8)

Measured, from the run's own files and one exact peak:
  sec_per_step       median of train_log.parquet `seconds` over the measured steps
                     (step 1, which allocates the optimizer state, is the warm-up)
  tokens_per_s       batch x seq_len / sec_per_step
  peak_rss_mib       the process's peak RSS during the measured steps (kernel
                     high-water mark reset after the warm-up step; see common.PeakMemory)
  trainable_params, optimizer_state_bytes   from the run's cost.json
  train_reported_peak_mib                   cost.json's own peak (RSS sampled after each forward)
The run is stopped from `on_step` after the last measured step, before `train`
writes its final checkpoint: saving is not part of a step's cost.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = dict(full=dict(batch_size=8, seq_len=64, measured=3),
             tiny=dict(batch_size=2, seq_len=16, measured=2))
STRATEGIES = {  # name -> (strategy, layers)
    "full": ("full", None),
    "cogsym layers": ("layers", "cogsym"),
    "lora": ("lora", None),
    "cogsym lora": ("lora-layers", "cogsym"),
    "last quarter": ("layers", "last-quarter"),
}
COLUMNS = ["name", "sec_per_step", "step_time_vs_full", "tokens_per_s", "peak_rss_mib",
           "trainable_params", "optimizer_state_bytes", "optimizer_vs_full", "train_reported_peak_mib",
           "strategy", "layers", "batch_size", "seq_len", "measured_steps", "memory_kind"]


def sizes() -> dict:
    return SIZES["tiny" if common.tiny() else "full"]


def last_quarter(n_layers: int) -> str:
    """The last blocks, as many as the CogSym rule picks (round(L/4), half to even)."""
    from cogprobe.models.layersets import cogsym, to_string
    n = len(cogsym(n_layers))
    return to_string(list(range(n_layers - n, n_layers)))


class _Done(Exception):
    """Raised from on_step after the last measured step: stops train() before its final save."""


def measure(name: str) -> dict:
    from cogprobe.core import io
    from cogprobe.tuning.loop import TrainConfig
    s = sizes()
    strategy, layers = STRATEGIES[name]
    if layers == "last-quarter":
        layers = last_quarter(common.n_layers())
    steps = 1 + s["measured"]
    mem = common.PeakMemory()
    with tempfile.TemporaryDirectory(prefix="cogprobe-tuning-") as tmp:
        cfg = TrainConfig(model=common.model_spec(), corpus=str(common.train_corpus()), out=Path(tmp) / "run",
                          strategy=strategy, layers=layers, steps=steps, batch_size=s["batch_size"],
                          seq_len=s["seq_len"], warmup=0, save_steps=str(steps), progress=False,
                          threads=common.threads())
        log = train_measured(cfg, mem)
        cost = io.read_json(cfg.out / "cost.json")
        manifest = io.read_json(cfg.out / "manifest.json")
    measured = log[log["step"] > 1]["seconds"].tolist()
    return dict(name=name, strategy=strategy, layers=manifest.get("layers_string") or "all",
                seconds=measured, peak=mem.peak, memory_kind=mem.kind,
                trainable_params=cost["trainable_params"], optimizer_state_bytes=cost["optimizer_state_bytes"],
                train_reported_peak=cost["peak_memory_bytes"], batch_size=s["batch_size"], seq_len=s["seq_len"])


def train_measured(cfg, mem, on_first=lambda model: None) -> "pd.DataFrame":
    """Train `cfg` (1 warm-up step, then the measured ones) with `mem` (a common.PeakMemory) measuring the
    measured steps only, stopped after the last before the final save; the run's train log.
    `on_first(model)`: called after the warm-up step (e.g. to read the model's shape)."""
    import pandas as pd
    from cogprobe.tuning.loop import train

    def on_step(step, model, loss):
        if step == 1:
            on_first(model)
            mem.__enter__()   # after the warm-up step: optimizer state exists, peak reset
        if step == cfg.steps:
            mem.__exit__(None, None, None)
            raise _Done

    try:
        train(cfg, on_step=on_step)
    except _Done:
        pass
    return pd.read_parquet(cfg.out / "train_log.parquet")


def rows_from(results: list[dict]) -> list[dict]:
    full = next(r for r in results if r["name"] == "full")
    full_sec = statistics.median(full["seconds"])
    rows = []
    for r in results:
        sec = statistics.median(r["seconds"])
        rows.append(dict(name=r["name"], sec_per_step=sec, step_time_vs_full=sec / full_sec,
                         tokens_per_s=r["batch_size"] * r["seq_len"] / sec, peak_rss_mib=r["peak"] / common.MiB,
                         trainable_params=r["trainable_params"], optimizer_state_bytes=r["optimizer_state_bytes"],
                         optimizer_vs_full=r["optimizer_state_bytes"] / full["optimizer_state_bytes"],
                         train_reported_peak_mib=r["train_reported_peak"] / common.MiB,
                         strategy=r["strategy"], layers=r["layers"], batch_size=r["batch_size"],
                         seq_len=r["seq_len"], measured_steps=len(r["seconds"]), memory_kind=r["memory_kind"]))
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue targets for CogSym layers against full fine-tuning."""
    r = next(r for r in rows if r["name"] == "cogsym layers")
    t, o = float(r["step_time_vs_full"]), float(r["optimizer_vs_full"])
    return [dict(benchmark="tuning", target="cogsym layers step time <= 0.75x full", value=f"{t:.2f}x", met=t <= 0.75),
            dict(benchmark="tuning", target="cogsym layers optimizer state <= 0.25x full", value=f"{o:.3f}x",
                 met=o <= 0.25)]


def main() -> None:
    import argparse
    args = common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS),
        p.add_argument("--name", choices=list(STRATEGIES), help=argparse.SUPPRESS)))
    if args.worker_json:
        common.write_worker_result(args.worker_json, measure(args.name))
        return
    info = common.machine_info()
    common.train_corpus()  # written once, before the workers race for it
    results = []
    for name in STRATEGIES:
        print(f"tuning: {name} ...", flush=True)
        results.append(common.measure_in_worker(Path(__file__), measure, "--name", name))
    rows = rows_from(results)
    path = common.write_csv("tuning", rows, info)
    print(common.show(f"tuning cost (batch {rows[0]['batch_size']} x {rows[0]['seq_len']} tokens)", rows, COLUMNS[:8]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
