"""Tiny models for tests: a random Qwen3 (no training) and a Hugging Face checkpoint directory of it."""
from pathlib import Path

import torch


def tiny_policy(hidden=64, layers=4, vocab=40, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_checkpoint(path: Path) -> Path:
    tiny_policy().save_pretrained(path)
    return path
