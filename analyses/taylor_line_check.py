"""(issue 19) Is the taylor slope right on the real model, and is the adaptation past first order? NLL of the
Nahuatl probe's step 30 with every block moved a fraction alpha of the way back to the reference
(embeddings and head stay at the checkpoint, like the k = L revert row), against alpha * sum_i t_i."""
import sys, time, copy, torch, numpy as np
torch.set_num_threads(1)
from pathlib import Path
from cogprobe.checkpoints import Checkpoints
from cogprobe.evalset import EvalSet
from cogprobe.blocks import find_blocks
from cogprobe.tasks import score
from cogprobe.taylor import block_terms
# usage: python analyses/taylor_line_check.py RUN STEP   (prints; ~3 min on 1 CPU thread)
run = Path(sys.argv[1]); step = int(sys.argv[2])
ck = Checkpoints.open(run)
ref, tok = ck.load(0); model = ck.load(step)[0]
ex = EvalSet.for_run(run, n=64, max_sentence_tokens=32).examples(tok)
b = find_blocks(model); refp = dict(ref.named_parameters())
for task, exs in ex.items():
    sums, counts, t = block_terms(model, ref, exs)
    base = sums.sum() / counts.sum(); slope = t.sum() / counts.sum()
    gain = score(ref, exs).nll - base
    print(task, f"nll_ck {base:.4f} gain {gain:.4f} first-order slope (per unit alpha) {slope:.4f}", flush=True)
    for alpha in (0.02, 0.1, 0.3, 1.0):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if b.block_of(n) is not None:
                    p.add_(alpha * (refp[n] - p))
        got = score(m, exs).nll - base
        print(f"  alpha {alpha}: exact change {got:+.4f}  first-order {alpha * slope:+.4f}", flush=True)
