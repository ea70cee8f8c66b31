"""The two tasks, perception and production, scored by negative log-likelihood.

Perception reads the new language and scores the pivot translation; production
reads the pivot and scores the new language. A task is a `Template` (data, so it
can be overridden): a prompt and a continuation, and only the continuation's
tokens are scored, in nats per token.

Tokenization follows lm-evaluation-harness: the prompt is tokenized with the
tokenizer's own special tokens (so a model trained with BOS gets it; an EOS the
tokenizer would append is dropped, since it would say the text ended), the
continuation without them, and the ids are concatenated.

Truncation: before a template is filled, each sentence (pivot and target) is cut
to its first `max_sentence_tokens` tokens, tokenized alone and decoded back (a
character split by the cut is dropped). Both prompt and continuation are thus
bounded, and the scored continuation is never cut away. In context a sentence
can re-tokenize to a token or two more than the bound (e.g. a leading space).
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from cogprobe.corpora import Corpus
from cogprobe.errors import CogprobeError


@dataclass(frozen=True)
class Template:
    prompt: str        # may use {pivot_name} {target_name} {pivot} {target}
    continuation: str


TEMPLATES = {
    "perception": Template("{target_name}: {target}\n{pivot_name}:", " {pivot}"),
    "production": Template("{pivot_name}: {pivot}\n{target_name}:", " {target}"),
}
TASKS = ("perception", "production")
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


def build_examples(tokenizer, corpus: Corpus, task: str, *, max_sentence_tokens: int = 64,
                   templates: dict[str, Template] | None = None,
                   limit: int | None = None) -> list[Example]:
    """One example per pair of `corpus` (the first `limit`), in corpus order."""
    templates = {**TEMPLATES, **(templates or {})}
    if task not in templates:
        raise CogprobeError(f"unknown task {task!r}; the tasks are {', '.join(templates)}")
    template = _check(templates[task], task)
    if max_sentence_tokens < 1:
        raise CogprobeError(f"max_sentence_tokens={max_sentence_tokens}; give at least 1")
    pairs = corpus.pairs if limit is None else corpus.pairs.head(limit)
    # Batched tokenizer calls (the fast tokenizer runs a list in one native call): a few
    # calls per task instead of a few per pair, the same ids.
    pivots = _cut_all(tokenizer, list(pairs["pivot"]), max_sentence_tokens)
    targets = _cut_all(tokenizer, list(pairs["target"]), max_sentence_tokens)
    fields = [dict(pivot_name=corpus.pivot_name, target_name=corpus.target_name, pivot=p, target=t)
              for p, t in zip(pivots, targets)]
    prompts = _prompt_ids_all(tokenizer, [template.prompt.format(**f) for f in fields])
    conts = _ids(tokenizer, [template.continuation.format(**f) for f in fields], special=False)
    examples = []
    for prompt, cont in zip(prompts, conts):
        if not prompt or not cont:
            raise CogprobeError(f"task {task!r}: the template's prompt or continuation gave no "
                                "tokens; give both some text")
        examples.append(Example(tuple(prompt) + tuple(cont), len(prompt)))
    return examples


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


def _cut_all(tokenizer, texts: list[str], n: int) -> list[str]:
    """Each text cut to its first n tokens (tokenized alone, decoded back)."""
    out = []
    for text, ids in zip(texts, _ids(tokenizer, texts, special=False)):
        out.append(text if len(ids) <= n else
                   tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd").strip())
    return out


def _prompt_ids_all(tokenizer, prompts: list[str]) -> list[list[int]]:
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


def nll_at_scored(head_logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed NLL in nats (float64) and token count, from logits [n, vocab] at scored positions."""
    nll = F.cross_entropy(head_logits.float(), targets.to(head_logits.device), reduction="none")
    return float(nll.double().sum()), int(targets.numel())


@torch.no_grad()
def score(model, examples: Sequence[Example], *, batch_size: int = 8) -> Score:
    """Mean NLL per continuation token; padding and batch size don't change it."""
    if not examples:
        raise CogprobeError("no examples to score; check the corpus split and `limit`")
    device = next(model.parameters()).device
    # Longest first: batches of similar lengths waste less on padding; the sum is order-free.
    ordered = sorted(examples, key=lambda e: -len(e.input_ids))
    total, count = 0.0, 0
    for batch in batches(ordered, batch_size, pad_id=0):  # pads are masked and never scored
        pred_mask, targets = scored_positions(batch)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        s, n = nll_at_scored(logits[pred_mask.to(device)], targets)
        total, count = total + s, count + n
    return Score(nll=total / count, n_tokens=count, nll_sum=total)
