"""Held-out English prose, scored by NLL: the quantisation control.

Tuning a 4-bit model on any text can lower its loss for reasons that have nothing to do with the
new language: the tuned weights repair some of the rounding, or the model adapts to a text format.
Scoring text the tuning never saw, in a language it was not tuned on, separates the two readings:
English NLL that falls after tuning on Nahuatl or Otomí is repair or format adaptation, English
NLL that rises is forgetting.

The text is Python's own reference prose (`pydoc_data.topics`, bundled with every CPython: no
download, ~65k words), kept to its paragraphs of running text: indented paragraphs (grammar rules,
code examples) and the underlines of headings are left out, topics in the order of their keys. It
is tokenized as one stream and cut into consecutive passages of `tokens` tokens; `n` passages are
taken evenly spaced over the whole text, so they span its topics. Each passage's first token is
context only, the other `tokens - 1` are scored. The set depends on the tokenizer and on the Python
version's topics, so every table names it by `passage_set`, a digest of the passages' token ids.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cogprobe.core import intervals
from cogprobe.core.distributed import default_device
from cogprobe.core.errors import CogprobeError
from cogprobe.data.tasks import BATCH_SIZE, Example, score
from cogprobe.models.loading import load_model

TASK = "prose"         # the task name of its rows in a study's prose table
PASSAGE_TOKENS = 128   # long enough for context to matter, short enough for any model's window
_UNDERLINE = re.compile(r"[*=\-~^]+")


@functools.lru_cache(maxsize=1)
def prose_text() -> str:
    """The running-text paragraphs of `pydoc_data.topics`, one paragraph a line pair apart."""
    from pydoc_data.topics import topics
    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.strip("\n").split("\n")
            if not lines[0].strip() or lines[0][:1].isspace():   # code, grammar, or nothing
                continue
            words = [line.strip() for line in lines if not _UNDERLINE.fullmatch(line.strip())]
            if words:
                paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs)


@dataclass(frozen=True)
class Passages:
    """Fixed-length passages of the prose: their token ids, their place in the text, and the set's name."""
    ids: tuple[tuple[int, ...], ...]
    index: tuple[int, ...]     # each passage's position among the text's consecutive passages
    available: int             # how many passages of this length the text holds
    passage_set: str           # digest of the token ids: two tables agree on the set exactly when equal

    def examples(self) -> list[Example]:
        return [Example(ids, 1) for ids in self.ids]


def cut_passages(tokenizer, n: int | None = None, tokens: int = PASSAGE_TOKENS) -> Passages:
    """`n` passages of `tokens` tokens, evenly spaced over the prose (None: every one)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise CogprobeError(f"tokens={tokens!r}: a passage needs at least 2 tokens (one of context, one scored)")
    stream = token_stream(tokenizer)
    available = len(stream) // tokens
    n = available if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= available:
        raise CogprobeError(f"{n!r} passages: the English prose holds {available} passages of {tokens} tokens "
                            f"for this tokenizer; give 1 to {available}")
    index = tuple(int(i) for i in np.arange(n) * available // n)   # distinct, since n <= available
    ids = tuple(tuple(stream[i * tokens:(i + 1) * tokens]) for i in index)
    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]
    return Passages(ids, index, available, digest)


_STREAMS: dict[str, list[int]] = {}   # the prose's token ids, by a digest of the tokenizer that made them


def token_stream(tokenizer) -> list[int]:
    """The prose's token ids, made once per process and tokenizer: a study scores every arm on the same
    passages, and the text is about 65k words. Keyed by a digest of the tokenizer's whole definition,
    so two tokenizers that could split the text differently never share ids; a tokenizer without one
    (a slow tokenizer) tokenizes every time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(prose_text(), add_special_tokens=False).input_ids
    key = hashlib.sha256(backend.to_str().encode()).hexdigest()
    if key not in _STREAMS:
        _STREAMS[key] = tokenizer(prose_text(), add_special_tokens=False).input_ids
    return _STREAMS[key]


def score_passages(model, tokenizer, n: int | None = None, tokens: int = PASSAGE_TOKENS, *,
                   batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """One row per passage (task, pair_id, nll_sum, n_tokens, passage_set): the per-example schema of a
    study's scores, so the interval helpers read it as they read the translation tasks'."""
    chosen = cut_passages(tokenizer, n, tokens)
    s = score(model, chosen.examples(), batch_size=batch_size)
    return pd.DataFrame(dict(task=TASK, pair_id=list(chosen.index), nll_sum=list(s.example_nll),
                             n_tokens=list(s.example_tokens), passage_set=chosen.passage_set))


def prose_nll(model: str | Path, *, passages: int | None = None, tokens: int = PASSAGE_TOKENS,
              batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """A model's NLL on held-out English prose (nats per token) with its 95% bootstrap interval over the
    passages: one row, and the per-passage scores in `attrs["passages"]` (as records) for paired
    comparisons between models. `model`: the alias, an HF folder or a .gguf file; `passages` None: every
    passage the text holds."""
    lm, tokenizer = load_model(model)
    lm.to(default_device())
    rows = score_passages(lm, tokenizer, passages, tokens, batch_size=batch_size)
    data = {"model": (rows["nll_sum"].to_numpy(float), rows["n_tokens"].to_numpy(float))}
    got = intervals.nll(data, "model")
    table = pd.DataFrame([dict(model=str(model), task=TASK, nll=got.estimate, nll_low=got.low, nll_high=got.high,
                               n_tokens=int(rows["n_tokens"].sum()), n_passages=len(rows), tokens=tokens,
                               passage_set=rows["passage_set"].iloc[0])])
    table.attrs["passages"] = rows.to_dict("records")
    return table
