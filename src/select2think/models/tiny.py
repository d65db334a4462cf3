"""Tiny random-initialised Llama models on the real SmolLM2 tokenizer, for fast tests.

Deterministic from a seed, built in well under a second. The embedding has 64 padding rows
beyond the tokenizer (49,152 -> 49,216), like real checkpoints, so reserved ids come from padding.
"""

from __future__ import annotations

import torch

from .registry import ModelSource

TINY_PADDING_ROWS = 64


def build_tiny(source: ModelSource):
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizers import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer) + TINY_PADDING_ROWS,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=source.tiny_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.3,  # peaked enough that top-1/top-2 gaps dwarf float noise
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(source.tiny_seed)
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")  # LlamaConfig's typed signature takes no attn_implementation
    model.name_or_path = source.name
    return model, tokenizer
