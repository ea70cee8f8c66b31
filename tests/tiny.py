"""Tiny random causal LMs and a tokenizer, built in code (no downloads).

Every family that cogprobe promises to support has a constructor here; tests
save them with `save_tiny` so they also exercise the folder-loading path.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

VOCAB = 384
HIDDEN = 32
LAYERS = 6

TEXT = [
    "Auh in ye yuhqui in on tlenamacac niman ye ic teixpan on motlalia ce tlacatl.",
    "Y así, cuando hizo su ofrenda de fuego, se sienta delante de los demás.",
    "Nahuatl: in tlacatl quichiua in tlaxcalli\nSpanish: el hombre hace las tortillas",
    "Spanish: la casa es grande y el agua está fría\nNahuatl: in calli huei auh in atl itztic",
    "Otomí: da zot'i ri ndäte ne ri ngo̱k'ei yabu̱ xa ñ'u̱.",
    "0123456789 ¿¡ áéíóúñü ÁÉÍÓÚÑ .,;:!?'\"()-",
]


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines; no BOS, EOS doubles as padding (like SmolLM2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TEXT * 4, trainer=trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    return fast


def _common(**kw):
    return dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**_common(hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=256)),
    "qwen2": lambda: tf.Qwen2Config(**_common(hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256)),
    "mistral": lambda: tf.MistralConfig(**_common(hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, sliding_window=None)),
    "gemma2": lambda: tf.Gemma2Config(**_common(hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=256, sliding_window=16)),
    "gpt2": lambda: tf.GPT2Config(**_common(n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
        n_positions=256)),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_common(hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=256)),
    "phi": lambda: tf.PhiConfig(**_common(hidden_size=HIDDEN, intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=256)),
}


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of `family`, fp32, eval mode, eager attention."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a normal HF folder (safetensors)."""
    path = Path(path)
    tiny_model(family, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
