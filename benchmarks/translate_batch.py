"""What batching greedy translation saves: chrF's translations of one run at several batch sizes.

    python benchmarks/translate_batch.py analyses/evidence/axolotl/runs/cogsym-s0 --corpus axolotl

Greedy decoding on a CPU reads every weight once per generated token, whatever the batch holds, so
a wider batch serves more sentences per pass over the weights until the arithmetic, not the
memory, is the limit. Prints, per batch size, the seconds to translate the study's chrF sentences
in both directions from the run's last checkpoint, and how many hypotheses are identical to those
of the first batch size (left padding with an attention mask must not change a greedy output).
Also prints the machine, the load average at the start (a busy machine makes every time longer)
and the date. Not in `run_all.py`: it needs a trained run folder, which the other benchmarks
train themselves.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from cogprobe.tuning.checkpoints import Checkpoints
from cogprobe.data.evalset import EvalSet
from cogprobe.data.tasks import TASKS
from cogprobe.data.translate import translate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder (`cogprobe train` or a study's runs/<row>-s<seed>)")
    p.add_argument("--corpus", required=True, help="the corpus the run was scored on (alias or file)")
    p.add_argument("--pairs", type=int, default=100, help="test pairs per direction (the study's chrf_pairs)")
    p.add_argument("--batch-sizes", default="8,32", help="comma-separated; the first is the reference")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({a.threads} threads), load average {os.getloadavg()[0]:.2f} at the start, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    checkpoints = Checkpoints.open(a.run)
    model, tok = checkpoints.load(checkpoints.steps[-1])
    sentences = EvalSet(corpus=a.corpus, split="test", n=a.pairs, max_sentence_tokens=64)
    examples = sentences.examples(tok, TASKS)
    reference = None
    for size in map(int, a.batch_sizes.split(",")):
        start, hypotheses = time.perf_counter(), []
        for task in TASKS:
            hypotheses += translate(model, tok, examples[task], max_new_tokens=a.max_new_tokens, batch_size=size)[0]
        took = time.perf_counter() - start
        reference = reference or hypotheses
        same = sum(x == y for x, y in zip(hypotheses, reference))
        print(f"batch {size}: {took:.1f} s for {len(hypotheses)} sentences; {same} of {len(reference)} "
              f"identical to batch {a.batch_sizes.split(',')[0]}", flush=True)


if __name__ == "__main__":
    main()
