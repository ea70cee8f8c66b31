"""Issue 13's before/after numbers: split leakage and whole-example training, old code against new.

The old code (commit 9c3275b) is read with `git show` into a temporary folder, so
this script needs the repository's history. Run: python analyses/measurement_before_after.py
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import cogprobe  # noqa: F401  (offline environment first)
from cogprobe.data.corpora import load_corpus, normalise, split_corpus, split_overlap
from cogprobe.tuning.text import IGNORE, PackedStream, tokenize
from cogprobe.models.loading import embedded_dir

OLD = "9c3275b"
ROOT = Path(__file__).resolve().parents[1]


def old_modules(tmp: Path):
    for name in ("corpora", "tasks"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD}:cogprobe/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        (tmp / f"old_{name}.py").write_text(text.replace("from cogprobe.corpora import", "from old_corpora import"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("old_corpora"), importlib.import_module("old_tasks")


def old_overlap(oc, name: str) -> dict:
    s = oc.split_corpus(oc.load_corpus(name), seed=0)
    train = {side: set(s.train.pairs[side].map(normalise)) for side in ("pivot", "target")}
    return {side: len(set(s.test.pairs[side].map(normalise)) & train[side]) for side in train}


def old_whole_source_fraction(oc, ot, tok, rows=16 * 8, seq=64) -> float:
    """The old stream (examples concatenated, cut every `seq` tokens), the quick preset's first rows."""
    train = oc.split_corpus(oc.load_corpus("axolotl"), seed=0).train
    ex = {k: ot.build_examples(tok, train, k, max_sentence_tokens=64) for k in ("perception", "production")}
    plain = [min(len(x), 64) + 1 for x in tok(list(train.pairs["target"]), add_special_tokens=False).input_ids]
    rng = np.random.default_rng([0, 0])
    order, kinds = rng.permutation(len(train)), rng.choice(3, size=len(train), p=[1 / 3] * 3)
    pos, seen, total, end = 0, 0, 0, rows * seq
    for i, k in zip(order, kinds):
        if pos >= end:
            break
        if k == 2:
            pos += plain[i]
            continue
        e = ex[("perception", "production")[k]][i]
        for t in range(e.n_prompt, len(e.input_ids)):
            if pos + t < end:
                total += 1
                seen += (pos + t) // seq == pos // seq
        pos += len(e.input_ids) + 1
    return seen / total


def new_whole_source_fraction(tok, rows=16 * 4, seq=128) -> float:
    """The new stream at the quick preset's shape: loss tokens of translation examples whose example
    starts in the same row (position 0) and is there whole."""
    texts = tokenize(tok, split_corpus(load_corpus("axolotl")).train, seq_len=seq, max_sentence_tokens=64)
    stream = PackedStream(texts, dict(perception=1, production=1, plain=1), seq, seed=0, pad_id=tok.eos_token_id)
    r, kinds = stream.rows(0, rows), stream.epoch_examples(0)
    seen = total = 0
    for i in range(rows):
        for j in np.unique(r.example[i][r.example[i] >= 0]):
            kind, pair = kinds[j]
            at = r.example[i] == j
            n = int((r.labels[i][at] != IGNORE).sum())
            if kind != "plain":
                whole = r.position_ids[i][at][0] == 0 and (r.input_ids[i][at] == texts.get([(kind, pair)])[0][0]).all()
                seen, total = seen + whole * n, total + n
    return seen / total


def main() -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    with tempfile.TemporaryDirectory() as tmp:
        oc, ot = old_modules(Path(tmp))
        for name in ("axolotl", "tsunkua"):
            new = split_overlap(split_corpus(load_corpus(name)))
            print(f"{name}: normalised test sentences also in train, before {old_overlap(oc, name)}, "
                  f"after {{'pivot': {new['train-test pivot']}, 'target': {new['train-test target']}}}")
        print(f"continuation tokens sharing a row with their whole source: before "
              f"{old_whole_source_fraction(oc, ot, tok):.1%} (8 x 64-token rows, 16 steps), after "
              f"{new_whole_source_fraction(tok):.1%} (4 x 128-token rows, 16 steps)")


if __name__ == "__main__":
    main()
