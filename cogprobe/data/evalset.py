"""`EvalSet`: which held-out pairs a score is measured on, the same object for every scoring path.

`cogprobe eval`, sweeps, capture, layer selection and the study's baseline, probe
and comparison rows all score an `EvalSet`, and every table they write records
its `to_dict()`, so numbers from two tables are comparable exactly when their
sets are equal (a table refuses rows of another set).

How the pairs are chosen, in order:
  1. the corpus is split leak-free into train/dev/test (`corpora.split_corpus`, by
     `split_seed`; dev for decisions, test for final rows);
  2. pairs with a side longer than `max_sentence_tokens` (tokenized alone) are
     dropped, so no scored sentence or its source is ever cut and the two tasks
     read whole sentences (`dropped_long` says how many went: the set leans to
     shorter sentences, which the number makes visible);
  3. `n` pairs are sampled at random, stratified by document (each document gets
     its proportional share, largest remainders first), seeded by `sample_seed`,
     and kept in corpus order. Two sets of different `n` are independent samples,
     not prefixes of each other;
  4. with `window = (a, b)`, only pairs a..b-1 of that sample in a seeded random order
     (the sample shuffled by `sample_seed`): the windows (0, m), (m, 2m), ... are disjoint
     chunks of one sample, and the first m pairs a random subsample of it, so a probe
     can score pairs in chunks until its intervals are narrow enough (`study.probe_pairs`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cogprobe.core import io
from cogprobe.data.corpora import SPLIT_FRACTION, Corpus, load_corpus, split_corpus, split_overlap
from cogprobe.core.errors import CogprobeError
from cogprobe.core.knob import knob
from cogprobe.data.tasks import TASKS, Template, build_examples, sentence_lengths

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class EvalSet:
    """A seeded, stratified sample of one split's whole pairs, and how they are scored."""
    corpus: str = "axolotl"
    split: str = "dev"
    n: int | None = 64              # pairs sampled (None or 0: every pair that fits)
    sample_seed: int = 0
    max_sentence_tokens: int = 32   # pairs with a longer side are left out, never cut
    split_seed: int = 0
    split_dev: float = SPLIT_FRACTION
    split_test: float = SPLIT_FRACTION
    split_by_document: bool = False
    pivot_col: str | None = None
    target_col: str | None = None
    document_col: str | None = None
    templates: dict | None = field(default=None, hash=False)  # {"perception": {"prompt": .., "continuation": ..}}
    window: tuple[int, int] | None = None   # pairs a..b-1 of the sample in its seeded random order (step 4)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise CogprobeError(f"split {self.split!r}: use one of {', '.join(SPLITS)}")
        if self.n == 0:
            object.__setattr__(self, "n", None)
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise CogprobeError(f"evaluation set size n={self.n!r}: give a number of pairs >= 1 (or None for all)")
        if not isinstance(self.max_sentence_tokens, int) or self.max_sentence_tokens < 1:
            raise CogprobeError(f"max_sentence_tokens={self.max_sentence_tokens!r}: give a whole number >= 1")
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))   # a list from JSON: hashable again
            a, b = self.window
            if not 0 <= a < b or (self.n is not None and b > self.n):
                raise CogprobeError(f"window={self.window}: give pairs (a, b) with 0 <= a < b <= n ({self.n})")

    @classmethod
    def for_run(cls, source, **overrides) -> "EvalSet":
        """The run's own corpus and split settings (from manifest.json), with `overrides` on top."""
        manifest = Path(source) / "manifest.json" if isinstance(source, (str, Path)) else None
        base = {}
        if manifest is not None and manifest.is_file():
            cfg = io.read_json(manifest)["config"]
            base = dict(corpus=str(cfg["corpus"]), split_seed=cfg.get("split_seed", 0),
                        split_dev=cfg.get("dev", SPLIT_FRACTION), split_test=cfg.get("test", SPLIT_FRACTION),
                        split_by_document=cfg.get("split_by_document", False),
                        pivot_col=cfg.get("pivot_col"), target_col=cfg.get("target_col"),
                        document_col=cfg.get("document_col"))
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        """What a table records about its evaluation set (JSON-safe; no window, no key: the record of
        every table written before windows existed)."""
        d = dataclasses.asdict(self)
        if d["window"] is None:
            del d["window"]
        return io.jsonable(d)

    def splits(self):
        return self._split_with_overlap()[0]

    def _split_with_overlap(self):
        return _splits(self.corpus, self.pivot_col, self.target_col, self.document_col, self.split_seed,
                       self.split_dev, self.split_test, self.split_by_document)

    def pairs(self, tokenizer) -> Corpus:
        """The sampled pairs (columns pair_id, pivot, target, document), in corpus order."""
        return self._drawn(tokenizer)[0]

    def report(self, tokenizer) -> dict:
        """Sizes behind the sample: the split, pairs dropped as too long, and split overlap (must be 0)."""
        return self._drawn(tokenizer)[1]

    def examples(self, tokenizer, tasks: Sequence[str] = TASKS) -> dict:
        """{task: [Example]} of the sampled pairs, tasks and controls alike."""
        pairs = self.pairs(tokenizer)
        templates = {k: Template(**v) for k, v in (self.templates or {}).items()}
        return {t: build_examples(tokenizer, pairs, t, templates=templates) for t in tasks}

    def _drawn(self, tokenizer) -> tuple[Corpus, dict]:
        return _draw(self, tokenizer)


@dataclass(frozen=True)
class Sample:
    """Which pairs a probe verb scores, as the command line gives them: an `EvalSet` without its
    corpus-split details, which come from the run (`EvalSet.for_run`). Defaults of the probe verbs
    (sweep, capture, select, rank): a small dev sample, since what they find drives decisions."""
    corpus: str | None = knob(None, "elotl name (axolotl, tsunkua) or a CSV/TSV/JSONL path (default: the run's)")
    pivot_col: str | None = knob(None, "column of the pivot language (files only)")
    target_col: str | None = knob(None, "column of the new language (files only)")
    split: str = knob(EvalSet.split, "split scored (dev for decisions, test for final numbers)", choices=SPLITS)
    pairs: int = knob(32, "pairs sampled (stratified by document; 0 = every pair that fits)", flags=("--limit",))
    sample_seed: int = knob(0, "seed of the sample")
    max_sentence_tokens: int = knob(EvalSet.max_sentence_tokens, "pairs with a longer side are left out (never cut)")
    split_seed: int | None = knob(None, "seed of the train/dev/test split (default: the run's, else 0)")
    by_document: bool | None = knob(None, "split keeping each document inside one split (default: the run's)")

    def evalset(self, run=None) -> EvalSet:
        """The `EvalSet` these flags describe, on `run`'s corpus and split settings where not given."""
        return EvalSet.for_run(run, corpus=self.corpus, pivot_col=self.pivot_col, target_col=self.target_col,
                               split=self.split, n=self.pairs, sample_seed=self.sample_seed,
                               max_sentence_tokens=self.max_sentence_tokens, split_seed=self.split_seed,
                               split_by_document=self.by_document)


@functools.lru_cache(maxsize=4)
def _splits(corpus, pivot_col, target_col, document_col, seed, dev, test, by_document):
    """The split and its overlap count, once per process: every set of one corpus shares them, whatever
    tokenizer (each checkpoint load brings a new tokenizer object, which the sample cache keys on)."""
    loaded = load_corpus(corpus, pivot_col=pivot_col, target_col=target_col, document_col=document_col)
    splits = split_corpus(loaded, seed=seed, dev=dev, test=test, by_document=by_document)
    return splits, split_overlap(splits)


@functools.lru_cache(maxsize=16)
def _draw(evalset: EvalSet, tokenizer) -> tuple[Corpus, dict]:
    """Split, filter and sample once per (set, tokenizer) in a process: every stage of a study
    that scores the same set reuses it."""
    splits, overlap = evalset._split_with_overlap()
    part = getattr(splits, evalset.split)
    fits = _fits(tokenizer, part.pairs, evalset.max_sentence_tokens)
    eligible = part.pairs[fits]
    if eligible.empty:
        raise CogprobeError(f"no {evalset.split} pair of {part.name} has both sides within "
                            f"max_sentence_tokens={evalset.max_sentence_tokens}; raise it")
    if evalset.n is not None and evalset.n > len(eligible):
        raise CogprobeError(f"the {evalset.split} split has {len(eligible)} pairs with both sides within "
                            f"{evalset.max_sentence_tokens} tokens, fewer than n={evalset.n}; ask for fewer "
                            "pairs or raise max_sentence_tokens")
    chosen = eligible if evalset.n is None else stratified_sample(eligible, evalset.n, evalset.sample_seed)
    if evalset.window is not None:
        a, b = evalset.window
        if b > len(chosen):
            raise CogprobeError(f"window {evalset.window} reaches past the {len(chosen)} pairs of the sample; "
                                "give a window within it")
        chosen = chosen.iloc[np.random.default_rng((evalset.sample_seed, 1)).permutation(len(chosen))[a:b]]
    sample = Corpus(f"{part.name}:{len(chosen)}", chosen.reset_index(drop=True), part.pivot_name,
                    part.target_name)
    report = dict(split_pairs=len(part), dropped_long=int((~fits).sum()), sampled=len(chosen),
                  documents=int(chosen["document"].nunique()), overlap=overlap)
    return sample, report


def _fits(tokenizer, pairs: pd.DataFrame, cap: int) -> np.ndarray:
    pivot = np.array(sentence_lengths(tokenizer, list(pairs["pivot"])))
    target = np.array(sentence_lengths(tokenizer, list(pairs["target"])))
    return (pivot <= cap) & (target <= cap)


def stratified_sample(pairs: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` rows at random, each document getting its proportional share (largest remainder),
    returned in their original order."""
    rng = np.random.default_rng(seed)
    sizes = pairs.groupby("document", sort=True).size()
    exact = sizes / sizes.sum() * n
    quota = np.floor(exact).astype(int)
    # Largest remainders get the rest; ties broken at random, so no document is favoured by name.
    rest = n - int(quota.sum())
    order = np.lexsort((rng.random(len(sizes)), -(exact - quota).to_numpy()))
    quota.iloc[order[:rest]] += 1
    picked = [rng.choice(np.flatnonzero((pairs["document"] == doc).to_numpy()), size=int(k), replace=False)
              for doc, k in quota.items() if k]
    return pairs.iloc[np.sort(np.concatenate(picked))]
