"""Tiny random checkpoints on disk (model + tokenizer), loadable like any local model directory.

`build_tiny_checkpoint(path)` writes a ~0.5 MB model with a real byte-level BPE tokenizer that adds <bos>, so every
path that loads a directory (engine.loading, the server, the CLI) can be exercised in seconds, offline. The weights are
random: generations are gibberish, which is all plumbing tests need. Variants: a chat template, fill-in-the-middle
special tokens, Gemma 3 or Llama architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tiny_models import VOCAB, tiny_gemma3, tiny_llama, train_tiny_tokenizer
from tokenizers.processors import TemplateProcessing

# Gemma's turn markup, so templated prompts start with <bos> and the tokenizer must not add a second one.
GEMMA_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHAT_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
# The Qwen2.5-Coder / CodeGemma spelling; <|file_separator|> is CodeGemma's end-of-infill marker.
FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_separator|>"]


def build_tiny_checkpoint(
    path: str | Path,
    *,
    arch: Literal["gemma3", "llama"] = "gemma3",
    chat_template: str | None = None,
    fim: bool = False,
    vocab_size: int = VOCAB,
    context_length: int = 512,
    seed: int = 0,
    eos: Literal["reachable", "not_by_greedy", "never"] = "reachable",
    head_dim: int | None = None,
) -> Path:
    """Saves a tiny random model and its tokenizer to `path` (created if needed) and returns the path.

    vocab_size is the BPE vocabulary (bytes, merges and <bos>/<eos>/<pad>); the chat and FIM special tokens come on
    top, and the model's embedding matches the final tokenizer length. context_length is max_position_embeddings.
    eos="not_by_greedy" zeroes the <eos> row of the output layer: its logit is then 0 while the largest of the others
    is positive, so greedy decoding runs to max_new_tokens; sampling still draws <eos> about once in a vocabulary's
    worth of tokens (the random logits are nearly equal). eos="never" (llama) makes sampling run to max_new_tokens
    too: every token's input embedding gets 1.0 in dimension 0, far above the other dimensions (std 0.02) and above
    what the two layers' small random writes can flip, so the final normed hidden state is about +8 there; the <eos>
    output row is -4 there and 0 elsewhere, so its logit sits about 32 below the others (probability ~e^-32).
    """
    path = Path(path)
    tokenizer = train_tiny_tokenizer(vocab_size)
    special = (CHAT_TOKENS if chat_template else []) + (FIM_TOKENS if fim else [])
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
    if chat_template:
        tokenizer.chat_template = chat_template
    bos = tokenizer.bos_token_id
    # Real tokenizers (Gemma, Llama) put <bos> in front when add_special_tokens=True; the trained one does not.
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )

    builders = {"gemma3": tiny_gemma3, "llama": tiny_llama}
    if arch not in builders:
        raise ValueError(f"arch is {arch!r}; it must be one of {', '.join(builders)}")
    if head_dim is not None and arch != "llama":
        raise ValueError("head_dim is only for the llama architecture")
    model = tiny_llama(seed, context_length, head_dim) if head_dim else builders[arch](seed, context_length)
    # The added chat/FIM tokens need rows in the embedding (and the tied output layer).
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if eos not in ("reachable", "not_by_greedy", "never"):
        raise ValueError(f"eos is {eos!r}; it must be 'reachable', 'not_by_greedy' or 'never'")
    if eos == "never" and arch != "llama":
        raise ValueError("eos='never' is for the llama architecture (Gemma's per-layer post-norms write O(1) values)")
    if eos != "reachable":
        with torch.no_grad():
            if eos == "never":
                model.get_input_embeddings().weight[:, 0] = 1.0
            output = model.get_output_embeddings().weight  # if tied, <eos>'s input row too: it is never an input
            output[tokenizer.eos_token_id] = 0
            if eos == "never":
                output[tokenizer.eos_token_id, 0] = -4.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
