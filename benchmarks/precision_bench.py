"""Precision benchmark: how far bfloat16 weights move a sweep's numbers against float32.

The embedded SmolLM2-135M and the sweep benchmark's full fine-tuning run (its last checkpoint
against step 0), both directions, mode revert, every k, on held-out pairs, swept twice by the
in-memory engine: `--dtype float32` and `--dtype bfloat16` (scores summed in float32/float64 in
both). Per task it reports the largest and median change of a per-example NLL (nats per token),
of the mean NLL, and of the share of the gain, and that share change against the float32 row's
own 95% interval half-width (pairs bootstrap): a ratio well under 1 means bf16 moves the curve by
less than the pairs' noise.

    python benchmarks/precision_bench.py        # ~5 min on 2 cores
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PAIRS = dict(full=24, tiny=3)
MAX_TOKENS = dict(full=32, tiny=8)
COLUMNS = ["task", "pairs", "max_abs_example_dnll", "median_abs_example_dnll", "max_abs_dnll", "max_abs_dshare",
           "max_dshare_over_half_width", "k_at_max_dshare", "wall_s_float32", "wall_s_bfloat16"]


def main() -> None:
    import numpy as np
    import torch
    from cogprobe.core.intervals import sweep_intervals
    from cogprobe.probe.sweep import sweep
    from cogprobe.tuning.checkpoints import Checkpoints
    import sweep_bench
    common.parse_args(__doc__.splitlines()[0])
    info = common.machine_info()
    size = "tiny" if common.tiny() else "full"
    ckpts = Checkpoints.open(sweep_bench.training_run())
    steps = [ckpts.steps[0], ckpts.steps[-1]]
    examples = common.heldout_examples(ckpts.reference_tokenizer(), PAIRS[size], MAX_TOKENS[size])
    tables, walls = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        with ckpts.precision(dtype):
            start = time.perf_counter()
            tables[dtype] = sweep(ckpts, examples, engine="memory", steps=steps, batch_size=8)
            walls[dtype] = time.perf_counter() - start
    fp32 = sweep_intervals(tables[torch.float32])
    bf16 = tables[torch.bfloat16]
    fp32 = fp32[fp32["checkpoint_step"] == steps[-1]].reset_index(drop=True)
    bf16 = bf16[bf16["checkpoint_step"] == steps[-1]].reset_index(drop=True)
    assert (fp32[["task", "direction", "k"]].values == bf16[["task", "direction", "k"]].values).all()
    rows = []
    for task in examples:
        at = fp32["task"] == task
        a, b = fp32[at], bf16[at]
        per_example = np.abs(np.stack(a["example_nll"]) / np.stack(a["example_tokens"])
                             - np.stack(b["example_nll"]) / np.stack(b["example_tokens"]))
        dshare = (a["share"] - b["share"]).abs()
        half = (a["share_high"] - a["share_low"]) / 2
        ratio = dshare / half
        worst = int(ratio.idxmax()) if ratio.notna().any() else None
        rows.append(dict(task=task, pairs=len(examples[task]), max_abs_example_dnll=float(per_example.max()),
                         median_abs_example_dnll=float(np.median(per_example)),
                         max_abs_dnll=float((a["nll"] - b["nll"]).abs().max()), max_abs_dshare=float(dshare.max()),
                         max_dshare_over_half_width=float(ratio.max()),
                         k_at_max_dshare=None if worst is None else f"{a.loc[worst, 'direction']} {a.loc[worst, 'k']}",
                         wall_s_float32=round(walls[torch.float32], 1), wall_s_bfloat16=round(walls[torch.bfloat16], 1)))
    common.write_csv("precision", rows, info)
    print(common.show("precision (bf16 weights against fp32, the last checkpoint)", rows, COLUMNS))


def check_targets(rows: list[dict]) -> list[dict]:
    worst = max(r["max_dshare_over_half_width"] for r in rows)
    return [dict(benchmark="precision", target="bf16 moves the share by less than half its fp32 interval",
                 value=f"{worst:.2f} of the half-width", met=worst < 0.5)]


if __name__ == "__main__":
    main()
