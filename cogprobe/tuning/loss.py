"""The training loss from the scored positions only, in chunks: logits memory of one chunk.

A causal LM's own loss (`model(**batch).loss`) projects every position of every row onto the whole
vocabulary: batch x seq_len x vocab logits, kept for the backward pass with their fp32 copy for the
cross-entropy. For a model with Llama 3's 128,256-token vocabulary, 8 rows of 2,048 tokens make
8.4 GB of fp32 logits, more than the activations of many of its blocks together; and with
`loss_on = continuation` about half of those positions carry no label at all.

`scored_loss` asks the model for the logits of one position (`logits_to_keep=1`, which HF's causal
LMs accept), takes the final hidden states from the decoder's output with a forward hook, keeps the
positions that predict a label, and computes the cross-entropy over them in chunks of `chunk`
tokens, each chunk's logits recomputed in the backward pass (`torch.utils.checkpoint`). The call
still goes through the model's own forward (so DDP's and PEFT's wrappers see it), and the result is
the model's own loss, the token mean over the labelled positions, up to floating-point order.

Only for heads that are a plain projection: a model that scales or soft-caps its logits after the
head (Gemma 2's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`) is
refused with one line, since this path would skip that step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cogprobe.core.errors import CogprobeError

IGNORE = -100   # HF's ignore_index: a position without a label
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def check_plain_head(model) -> None:
    """One line if the model changes its logits after the head (this path would skip that)."""
    config = getattr(getattr(model, "module", model), "config", None)
    found = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if found:
        raise CogprobeError(f"loss_chunk_tokens: this model transforms its logits after the head ({found[0]} = "
                            f"{getattr(config, found[0])}), which the chunked loss would skip; pass "
                            "--loss-chunk-tokens 0 (the model's own loss)")


def scored_loss(model, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor:
    """The token-mean cross-entropy over the positions with a label (see the module docstring)."""
    captured = {}

    def keep(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    inner = getattr(model, "module", model)   # DDP's wrapped model: its forward stays the one called
    hook = inner.get_decoder().register_forward_hook(keep)
    try:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE
    hidden, targets = captured["hidden"][:, :-1][scored], labels[scored]
    head = inner.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, head, hidden[part], targets[part], use_reentrant=False)
    return total / max(len(targets), 1)


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk, on fp32 logits (as HF's loss upcasts them)."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
