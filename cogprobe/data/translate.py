"""Greedy translation in both directions, scored by chrF (sacrebleu).

NLL says how likely the reference is; chrF says how good the model's own output
is. Perception translates the new language into the pivot (the task's prompt,
then the model writes the pivot sentence); production translates the pivot into
the new language. Generation is greedy and batched (left padding), stops at the
end of the line or at EOS, and is cut to `max_new_tokens`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import sacrebleu
import torch
from scipy import stats as scipy_stats

from typing import Sequence

from cogprobe.models.blocks import unwrap
from cogprobe.core.intervals import SeedInterval, by_seed, over_seeds
from cogprobe.data.tasks import Example


@torch.no_grad()
def translate(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 48,
              batch_size: int = 32) -> tuple[list[str], list[str]]:
    """(hypotheses, references): the model's greedy continuation of each example's prompt, and
    the example's own continuation (e.g. `EvalSet.examples(tok)["production"]`).

    Batches of 32: decoding on a CPU reads every weight once per token whatever the batch holds,
    so 32 translates the evidence study's chrF sentences about twice as fast as 8, with the same
    hypotheses (`benchmarks/translate_batch.py`)."""
    model = unwrap(model)
    refs = [tokenizer.decode(e.input_ids[e.n_prompt:], skip_special_tokens=True).strip() for e in examples]
    prompts = [list(e.input_ids[:e.n_prompt]) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hyps: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=_stop_ids(tokenizer))
        for row in out[:, width:]:
            hyps.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    return hyps, refs


def _stop_ids(tokenizer) -> list[int]:
    """EOS and every token whose text holds a newline: generation ends with the line.

    (Cheaper than `stop_strings`, which rebuilds its tables over the vocabulary
    on every call; the text after the newline is cut off when decoding.)
    """
    # keyed by the vocabulary, not id(): every checkpoint load brings a new tokenizer object with
    # the same vocabulary, and an id can be reused by another tokenizer once the first is gone
    key = (tokenizer.eos_token_id, hash(frozenset(tokenizer.get_vocab().items())))
    if key not in _STOP_CACHE:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        newline = {i for i, t in enumerate(vocab) if t is not None and
                   "\n" in tokenizer.convert_tokens_to_string([t])}
        _STOP_CACHE[key] = sorted(newline | {tokenizer.eos_token_id})
    return _STOP_CACHE[key]


_STOP_CACHE: dict[tuple, list[int]] = {}


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus-level chrF (0-100)."""
    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def chrf_intervals(translations: pd.DataFrame, full: str, *, level: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """chrF of each arm and task, and its relative deviation from `full` ((full - arm) / full, the
    paper's yardstick), with paired percentile-bootstrap intervals over sentences.

    `translations`: arm, task, pair_id, hypothesis, reference (the study's translations.parquet).
    Each resample sums sacrebleu's own per-sentence chrF statistics, so a resampled score is exactly
    the corpus chrF of the resampled sentences; every arm is resampled on the same sentences."""
    out = []
    for task, rows in translations.groupby("task", sort=False):
        stats = sentence_stats(rows, sorted(rows["arm"].unique()), task)
        n = len(next(iter(stats.values())))
        score = lambda a, idx: chrf_of(stats[a][idx])  # noqa: E731
        for arm in stats:
            found = {"chrf": lambda idx, arm=arm: score(arm, idx)}
            if full in stats and arm != full and score(full, np.arange(n)) > 0:
                found["chrf_rel_deviation"] = lambda idx, arm=arm: _relative(score(full, idx), score(arm, idx))
            for quantity, f in found.items():
                res = stats_bootstrap(f, n, level, n_resamples, seed)
                out.append(dict(arm=arm, task=task, quantity=quantity, estimate=f(np.arange(n)),
                                low=res[0], high=res[1], n_pairs=n))
    return pd.DataFrame(out)


def sentence_stats(translations: pd.DataFrame, arms: list[str], task: str) -> dict[str, np.ndarray]:
    """{arm: sacrebleu's chrF statistics of each sentence, [n, k]}, aligned on pair_id: only the
    sentences every arm translated (a corpus chrF is `chrf_of` their sum)."""
    rows = translations[(translations["task"] == task) & translations["arm"].isin(arms)]
    wide = rows.pivot_table(index="pair_id", columns="arm", values="hypothesis", aggfunc="first").dropna()
    refs = rows.drop_duplicates("pair_id").set_index("pair_id").loc[wide.index, "reference"].tolist()
    return {a: np.array(_CHRF._extract_corpus_statistics(wide[a].tolist(), [refs])) for a in arms if a in wide}


def chrf_of(stats: np.ndarray) -> float:
    """Corpus chrF of sentences given by their statistics (rows of `sentence_stats`)."""
    return _CHRF._compute_score_from_stats(stats.sum(0).tolist()).score


def chrf_over_seeds(statistic, seeds: list[dict[str, np.ndarray]], *, groups: list[int] | None = None,
                    **kw) -> SeedInterval:
    """Interval of the mean over seeds of `statistic({name: chrF})`, each unit's names mapped to its
    arms' `sentence_stats` on the same sentences (`intervals.over_seeds`: the sentences' bootstrap
    error and a t-interval over the seeds' own estimates); `groups` as in `intervals.hierarchical`."""
    n = len(next(iter(seeds[0].values())))

    def per_unit(e_ix: np.ndarray) -> np.ndarray:   # [B, n] -> [n_units, B]
        return np.array([[statistic({a: chrf_of(unit[a][ix]) for a in unit}) for ix in e_ix] for unit in seeds],
                        float)

    groups = groups or list(range(len(seeds)))
    return over_seeds(by_seed(per_unit, groups), len(set(groups)), n, **kw)


_CHRF = sacrebleu.CHRF()


def _relative(full: float, row: float) -> float:
    """(full - row) / full; NaN where a resample leaves full fine-tuning at chrF 0."""
    return (full - row) / full if full > 0 else float("nan")


def stats_bootstrap(statistic, n: int, level: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of statistic(indices) over resampled sentence indices (scipy)."""
    if n < 2:
        return float("nan"), float("nan")
    res = scipy_stats.bootstrap((np.arange(n),), statistic, vectorized=False, n_resamples=n_resamples,
                                confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
