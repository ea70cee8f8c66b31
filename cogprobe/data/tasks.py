"""The two tasks, perception and production, scored by negative log-likelihood.

Perception reads the new language and scores the pivot translation; production
reads the pivot and scores the new language. A task is a `Template` (data, so it
can be overridden): a prompt and a continuation, and only the continuation's
tokens are scored, in nats per token.

Tokenization follows lm-evaluation-harness: the prompt is tokenized with the
tokenizer's own special tokens (so a model trained with BOS gets it; an EOS the
tokenizer would append is dropped, since it would say the text ended), the
continuation without them, and the ids are concatenated.

Truncation cuts a pair as a whole: when `max_sentence_tokens` is given and a
side is longer (counted tokenized alone), both sides keep the same fraction of
their tokens, so the longer one gets exactly the bound and the source still
covers what the continuation says (a source cut alone would leave scored words
with nothing to translate them from). A cut side is decoded back to text (a
character split by the cut is dropped); in context it can re-tokenize to a token
or two more. Evaluation sets don't cut at all: they keep only pairs whose both
sides fit (see `evalset`); training cuts (see `data`).

Controls: `perception-shuffled` and `production-shuffled` score the same
continuations as their task, with the source sentences permuted across the
examples by a fixed derangement (no example keeps its own source).
`NLL(shuffled) - NLL(true)` is the *conditional gain*: how much the model uses
the source, as against guessing the continuation from the language alone.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cogprobe.data.corpora import Corpus
from cogprobe.core.errors import CogprobeError


@dataclass(frozen=True)
class Template:
    prompt: str        # may use {pivot_name} {target_name} {pivot} {target}
    continuation: str


TEMPLATES = {
    "perception": Template("{target_name}: {target}\n{pivot_name}:", " {pivot}"),
    "production": Template("{pivot_name}: {pivot}\n{target_name}:", " {target}"),
}
TASKS = ("perception", "production")
BATCH_SIZE = 8   # pairs per forward pass of every scoring path: small enough for a CPU, any model
CONTROLS = {"perception-shuffled": "perception", "production-shuffled": "production"}
SOURCE_SIDE = {"perception": "target", "production": "pivot"}  # the sentence a task reads
CONTROL_SEED = 0  # the derangement is part of the measurement: fixed, not an option
FIELDS = frozenset({"pivot_name", "target_name", "pivot", "target"})


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    n_prompt: int  # positions >= n_prompt are the scored continuation tokens


@dataclass(frozen=True)
class Score:
    nll: float       # mean nats per scored token
    n_tokens: int
    nll_sum: float
    example_nll: tuple[float, ...] = ()     # summed nats of each example, in the order given
    example_tokens: tuple[int, ...] = ()    # scored tokens of each example


def build_examples(tokenizer, corpus: Corpus, task: str, *, max_sentence_tokens: int | None = None,
                   templates: dict[str, Template] | None = None,
                   limit: int | None = None) -> list[Example]:
    """One example per pair of `corpus` (the first `limit`), in corpus order.

    `task` is a task or a control (its task with the sources deranged); pairs are cut as
    wholes to `max_sentence_tokens` when it is given (see the module docstring)."""
    templates = {**TEMPLATES, **(templates or {})}
    base = CONTROLS.get(task, task)
    if base not in templates:
        raise CogprobeError(f"unknown task {task!r}; the tasks are {', '.join([*templates, *CONTROLS])}")
    template = _check(templates[base], base)
    pairs = corpus.pairs if limit is None else corpus.pairs.head(limit)
    pivots, targets = list(pairs["pivot"]), list(pairs["target"])
    if max_sentence_tokens is not None:
        pivots, targets = cut_pairs(tokenizer, pivots, targets, max_sentence_tokens)
    if task in CONTROLS:
        side = {"pivot": pivots, "target": targets}[SOURCE_SIDE[base]]
        side[:] = [side[j] for j in derangement(len(side), CONTROL_SEED)]
    fields = [dict(pivot_name=corpus.pivot_name, target_name=corpus.target_name, pivot=p, target=t)
              for p, t in zip(pivots, targets)]
    prompts = prompt_ids_all(tokenizer, [template.prompt.format(**f) for f in fields])
    conts = _ids(tokenizer, [template.continuation.format(**f) for f in fields], special=False)
    examples = []
    for prompt, cont in zip(prompts, conts):
        if not prompt or not cont:
            raise CogprobeError(f"task {task!r}: the template's prompt or continuation gave no "
                                "tokens; give both some text")
        examples.append(Example(tuple(prompt) + tuple(cont), len(prompt)))
    return examples


def derangement(n: int, seed: int) -> list[int]:
    """Source index of each position: one seeded n-cycle, so no position keeps its own."""
    if n < 2:
        raise CogprobeError(f"a shuffled-source control needs at least 2 pairs, got {n}; score more pairs")
    order = np.random.default_rng(seed).permutation(n)
    source = np.empty(n, dtype=int)
    source[order] = np.roll(order, -1)
    return source.tolist()


def sentence_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text tokenized alone (no special tokens)."""
    return [len(ids) for ids in _ids(tokenizer, texts, special=False)]


def whole_pair_caps(n_pivot: int, n_target: int, cap: int) -> tuple[int, int]:
    """Token budgets of a pair cut as a whole: both sides keep the same fraction, the longer gets `cap`."""
    if cap < 1:
        raise CogprobeError(f"max_sentence_tokens={cap}; give at least 1")
    longest = max(n_pivot, n_target)
    if longest <= cap:
        return n_pivot, n_target
    return max(1, n_pivot * cap // longest), max(1, n_target * cap // longest)


def cut_pairs(tokenizer, pivots: list[str], targets: list[str], cap) -> tuple[list[str], list[str]]:
    """Each pair cut as a whole to `cap` tokens (an int, or one per pair)."""
    caps = [cap] * len(pivots) if isinstance(cap, int) else list(cap)
    budgets = [whole_pair_caps(p, t, c) for p, t, c in
               zip(sentence_lengths(tokenizer, pivots), sentence_lengths(tokenizer, targets), caps)]
    return (cut_texts(tokenizer, pivots, [b[0] for b in budgets]),
            cut_texts(tokenizer, targets, [b[1] for b in budgets]))


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=special).input_ids if texts else []


def _check(template: Template, task: str) -> Template:
    for part in (template.prompt, template.continuation):
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(part) if f is not None}
        except ValueError as e:
            raise CogprobeError(f"task {task!r}: template {part!r} is malformed ({e}); "
                                "write braces as {{ }}") from None
        if names - FIELDS:
            raise CogprobeError(f"task {task!r}: unknown template field(s) "
                                f"{', '.join(sorted(names - FIELDS))}; use {', '.join(sorted(FIELDS))}")
    return template


def cut_texts(tokenizer, texts: list[str], caps: list[int]) -> list[str]:
    """Each text cut to its first caps[i] tokens (tokenized alone, decoded back)."""
    out = []
    for text, ids, n in zip(texts, _ids(tokenizer, texts, special=False), caps):
        out.append(text if len(ids) <= n else
                   tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd").strip())
    return out


def prompt_ids_all(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt with the specials the tokenizer puts before it, none after."""
    out = []
    for ids, plain in zip(_ids(tokenizer, prompts, special=True), _ids(tokenizer, prompts, special=False)):
        for start in range(len(ids) - len(plain) + 1):
            if ids[start:start + len(plain)] == plain:
                ids = ids[:start + len(plain)]
                break
        out.append(ids)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad; `score_mask` is True at the positions of scored (continuation) tokens."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    score_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        input_ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, :len(e.input_ids)] = 1
        score_mask[i, e.n_prompt:len(e.input_ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "score_mask": score_mask}


def batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict]:
    """Collated batches in the given order (no shuffling)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id)


def scored_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred_mask, targets): the token at t is predicted from position t-1.

    `hidden[pred_mask]` lines up row for row with `targets`.
    """
    mask = batch["score_mask"]
    pred_mask = torch.zeros_like(mask)
    pred_mask[:, :-1] = mask[:, 1:]
    return pred_mask, batch["input_ids"][mask]


def nll_per_example(head_logits: torch.Tensor, targets: torch.Tensor, pred_mask: torch.Tensor) -> tuple[list, list]:
    """(summed nats, scored tokens) of each row of a batch, from logits [n, vocab] at its scored positions."""
    nll = F.cross_entropy(head_logits.float(), targets.to(head_logits.device), reduction="none")
    rows = torch.split(nll.double().cpu(), pred_mask.sum(1).tolist())
    return [float(r.sum()) for r in rows], [len(r) for r in rows]


def nll_at_scored(head_logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed NLL in nats (float64) and token count, from logits [n, vocab] at scored positions."""
    nll = F.cross_entropy(head_logits.float(), targets.to(head_logits.device), reduction="none")
    return float(nll.double().sum()), int(targets.numel())


@torch.no_grad()
def score(model, examples: Sequence[Example], *, batch_size: int = BATCH_SIZE) -> Score:
    """Mean NLL per continuation token, and each example's sum; padding and batch size don't change it."""
    if not examples:
        raise CogprobeError("no examples to score; check the corpus split and `limit`")
    device = next(model.parameters()).device
    # Longest first: batches of similar lengths waste less on padding; the sum is order-free.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=int)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id=0)  # pads are masked and never scored
        pred_mask, targets = scored_positions(batch)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        sums[idx], counts[idx] = nll_per_example(logits[pred_mask.to(device)], targets, pred_mask)
    total, count = float(sums.sum()), int(counts.sum())
    return Score(nll=total / count, n_tokens=count, nll_sum=total, example_nll=tuple(sums.tolist()),
                 example_tokens=tuple(counts.tolist()))


def with_conditional_gain(table: pd.DataFrame, keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """Add `conditional_gain = NLL(shuffled source) - NLL(true source)` to each task's rows,
    matched on `keys` (e.g. checkpoint_step, direction, k); control rows get NaN."""
    table = table.copy()
    table["conditional_gain"] = float("nan")
    for control, task in CONTROLS.items():
        shuffled = table.loc[table["task"] == control, [*keys, "nll"]].rename(columns={"nll": "shuffled"})
        rows = table["task"] == task
        if shuffled.empty or not rows.any():
            continue
        mine = table.loc[rows, [*keys, "nll"]]
        both = mine.merge(shuffled, on=list(keys), how="left") if keys else mine.merge(shuffled, how="cross")
        table.loc[rows, "conditional_gain"] = (both["shuffled"] - both["nll"]).to_numpy()
    return table
