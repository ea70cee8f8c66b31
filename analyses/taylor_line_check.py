"""Is the taylor engine's slope right on a real probe run, and is the adaptation past first order?

Every block of checkpoint STEP is moved a fraction alpha of the way back to the reference (the
embeddings and head stay at the checkpoint, as in the k = L revert row) and the exact change of
the NLL is printed beside the first-order prediction alpha * sum_i t_i (`taylor.block_terms`).
At small alpha the two must agree (the slope is right); where they part is where a revert leaves
the first-order range. The README's "Do you need a probe run?" quotes this script's output.

    python analyses/taylor_line_check.py RUN STEP [--pairs 64] [--threads 1]   # ~3 min on the embedded model
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from cogprobe.models.blocks import find_blocks
from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.data.evalset import EvalSet
from cogprobe.data.tasks import score
from cogprobe.probe.taylor import block_terms

ALPHAS = (0.02, 0.1, 0.3, 1.0)


def moved_back(model, reference, alpha: float):
    """A copy of `model` with every block's weights moved alpha of the way to the reference's."""
    out, ref = copy.deepcopy(model), dict(reference.named_parameters())
    blocks = find_blocks(out)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if blocks.block_of(name) is not None:
                p.add_(alpha * (ref[name] - p))
    return out


def check(run: Path, step: int, pairs: int) -> list[dict]:
    ckpts = Checkpoints.open(run)
    reference, tok = ckpts.reference()
    model = ckpts.load(step)[0]
    rows = []
    for task, exs in EvalSet.for_run(run, n=pairs, max_sentence_tokens=32).examples(tok).items():
        sums, counts, t = block_terms(model, reference, exs)
        nll_ck, slope = sums.sum() / counts.sum(), t.sum() / counts.sum()
        print(f"{task}: nll_ck {nll_ck:.4f} gain {score(reference, exs).nll - nll_ck:.4f} "
              f"first-order slope (per unit alpha) {slope:.4f}", flush=True)
        for alpha in ALPHAS:
            exact = score(moved_back(model, reference, alpha), exs).nll - nll_ck
            print(f"  alpha {alpha}: exact change {exact:+.4f}  first-order {alpha * slope:+.4f}", flush=True)
            rows.append(dict(task=task, alpha=alpha, exact=exact, first_order=alpha * slope))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a probe run folder (cogprobe train with --save-steps)")
    p.add_argument("step", type=int, help="the checkpoint to move back")
    p.add_argument("--pairs", type=int, default=64, help="dev pairs (both sides <= 32 tokens)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    check(a.run, a.step, a.pairs)


if __name__ == "__main__":
    main()
