"""Tiny random models and a tiny tokenizer, built in-process: the tests never download anything.

The tokenizer is a byte-level BPE trained on a few lines, so multi-byte characters split across tokens like in real ones.
"""

from functools import lru_cache

import torch
from tokenizers import ByteLevelBPETokenizer, Tokenizer
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 300
CONTEXT = 512

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Ünïcödé ü ö ä ß — “quotes” 日本語 テキスト 🙂🚀 emoji.",
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    pass\n",
]


@lru_cache
def _trained(vocab_size: int) -> str:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TRAINING_TEXT * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<bos>", "<eos>", "<pad>"], show_progress=False)
    return bpe._tokenizer.to_str()


def train_tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
    )


def tiny_gemma3(seed: int, context: int = CONTEXT) -> Gemma3ForCausalLM:
    # sliding_window 8 is shorter than the test sequences, so rollback across the window edge is exercised.
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=context,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).eval()


def tiny_llama(seed: int, context: int = CONTEXT, head_dim: int | None = None) -> LlamaForCausalLM:
    """head_dim: None for hidden_size / heads (16); vLLM's CPU attention needs at least 32."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        head_dim=head_dim,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
