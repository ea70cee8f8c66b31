"""GPU smoke test: a few training steps and a small sweep on the GPU, with timings and peak memory.

    python benchmarks/gpu_smoke.py            # the embedded SmolLM2-135M, on CUDA
    python benchmarks/gpu_smoke.py --tiny --allow-cpu   # the test suite's check of this script

Run it where a GPU exists (it refuses to run without one unless --allow-cpu):
it exercises the paths that only a GPU takes (models placed on the CUDA device,
bf16 autocast on CUDA, CUDA peak memory in cost.json) and prints one line per
stage: the device, seconds, and peak memory. It writes
benchmarks/results/gpu_smoke.csv (or --out) with the machine columns. It is not
part of `make bench`: CI machines have no GPU.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = dict(full=dict(steps=8, batch_size=8, seq_len=128, pairs=32, ks="0,2,4,8,15,22,26,28,30"),
             tiny=dict(steps=3, batch_size=2, seq_len=16, pairs=2, ks=None))


def flags(parser) -> None:
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (only to test this script)")


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], flags)
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("gpu_smoke: no CUDA device here; run it on a GPU machine (or pass --allow-cpu to test the script)")
    common.set_threads()
    from cogprobe.core import io
    from cogprobe.core.distributed import default_device
    from cogprobe.data.evalset import EvalSet
    from cogprobe.probe.folders import sweep_run
    from cogprobe.tuning.loop import TrainConfig, train
    size = SIZES["tiny" if common.tiny() else "full"]
    device = default_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name})")
    rows = []
    with tempfile.TemporaryDirectory(dir=common.cache_dir()) as tmp:
        run = Path(tmp) / "run"
        cfg = TrainConfig(model=common.model_spec(), corpus=common.train_corpus(), out=run, strategy="full",
                          steps=size["steps"], batch_size=size["batch_size"], seq_len=size["seq_len"],
                          save_steps=f"0,{size['steps']}", bf16=device.type == "cuda", progress=False)
        t0 = time.perf_counter()
        train(cfg)
        cost = io.read_json(run / "cost.json")
        rows.append(dict(stage="train full", device=str(device), device_name=name, seconds=time.perf_counter() - t0,
                         sec_per_step=cost["sec_per_step"], peak_memory_mib=cost["peak_memory_bytes"] / common.MiB,
                         peak_memory_kind=cost["peak_memory_kind"]))
        from cogprobe.models.layersets import parse_range_list
        ks = parse_range_list(size["ks"], 10**6) if size["ks"] else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        table = sweep_run(run, ks=ks, evalset=EvalSet.for_run(run, n=size["pairs"]), log=lambda _: None)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else common.rss_bytes()
        rows.append(dict(stage=f"sweep revert ({len(table)} rows)", device=str(device), device_name=name,
                         seconds=time.perf_counter() - t0, sec_per_step=None, peak_memory_mib=peak / common.MiB,
                         peak_memory_kind="cuda" if device.type == "cuda" else "rss-now"))
    for r in rows:
        print(f"{r['stage']}: {r['seconds']:.1f} s, peak {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})")
    print(f"wrote {common.write_csv('gpu_smoke', rows)}")


if __name__ == "__main__":
    main()
