import copy

import pytest
import torch

import cogprobe  # noqa: F401  (offline env before transformers)
from cogprobe.models.blocks import SkipBlock, check_indices, find_blocks, swapped
from cogprobe.core.errors import CogprobeError
from tiny import FAMILIES, LAYERS, tiny_model

IDS = torch.tensor([[5, 17, 33, 120, 7, 9, 250, 3]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_find_blocks_maps_every_family(family):
    model = tiny_model(family)
    b = find_blocks(model)
    assert b.n == LAYERS
    assert b.final_norm is not None
    names = dict(model.named_parameters())
    owned = set(b.input_end_names()) | set(b.output_end_names())
    owned |= {n for n in names if b.block_of(n) is not None}
    # every parameter is a block's, an embedding's, the final norm's or the head's
    assert set(names) - owned == set()
    assert {b.block_of(n) for n in names if b.block_of(n) is not None} == set(range(LAYERS))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_of_last_block_equals_model_logits(family):
    model = tiny_model(family)
    b = find_blocks(model)
    seen = {}
    handle = b.modules[-1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    with torch.no_grad():
        logits = model(IDS).logits
        handle.remove()
        assert torch.allclose(b.decode(seen["h"]), logits, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_revert_all_blocks_gives_reference_model(family):
    ref, ckpt = tiny_model(family, seed=0), tiny_model(family, seed=0)
    with torch.no_grad():
        for n, p in ckpt.named_parameters():
            if find_blocks(ckpt).block_of(n) is not None:
                p.add_(0.05 * torch.randn_like(p))
        rb, cb = find_blocks(ref), find_blocks(ckpt)
        before = ckpt(IDS).logits
        with swapped(cb, {i: rb.modules[i] for i in range(LAYERS)}):   # the reference's own blocks, no copy
            assert torch.allclose(ckpt(IDS).logits, ref(IDS).logits, atol=1e-6)
        assert torch.equal(ckpt(IDS).logits, before)  # restored


def test_skip_all_blocks_is_embedding_through_head():
    model = tiny_model("llama")
    b = find_blocks(model)
    with torch.no_grad(), swapped(b, {i: SkipBlock(b.modules[i]) for i in range(LAYERS)}):
        emb = model.get_input_embeddings()(IDS)
        assert torch.allclose(model(IDS).logits, b.decode(emb), atol=1e-5)
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in b.modules)


def test_surgery_restores_on_error():
    model = tiny_model("llama")
    b = find_blocks(model)
    layers = list(b.modules)
    with pytest.raises(RuntimeError):
        with swapped(b, {0: SkipBlock(b.modules[0]), 3: SkipBlock(b.modules[3])}):
            raise RuntimeError("boom")
    assert list(b.modules) == layers


def test_encoder_is_rejected():
    import transformers as tf
    bert = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=32))
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=2,
                                                   num_heads=2, d_kv=8))
    with pytest.raises(CogprobeError, match="encoder-decoder"):
        find_blocks(t5)
    with pytest.raises(CogprobeError):
        find_blocks(bert)  # no causal LM head / not a decoder: must not silently map


def test_check_indices():
    assert check_indices([3, 1, 1], 4) == [1, 3]
    with pytest.raises(CogprobeError, match="out of range"):
        check_indices([0, 4], 4)
