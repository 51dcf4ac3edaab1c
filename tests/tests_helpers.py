"""Tiny models for tests: a random Qwen3, one taught a counting pattern, and a Hugging Face checkpoint directory."""
from pathlib import Path

import torch


def tiny_policy(hidden=64, layers=4, vocab=40, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg).eval()


def counting_pairs(n: int = 48) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) pairs of a pattern a tiny policy can be taught: the completion counts up from the prompt's last token."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        start = int(torch.randint(3, 20, (1,), generator=g))
        out.append(([1, 2, start], [start + j for j in range(1, 12)]))
    return out


def taught_policy(pairs, steps: int = 60):
    """A tiny policy trained briefly on `pairs` (so that it has something for a drafter to distil)."""
    from codraft.batch import make_batch, token_logprobs

    model = tiny_policy().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = make_batch([p for p, _ in pairs], [c for _, c in pairs], 0)
    for _ in range(steps):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        loss = -(token_logprobs(logits, batch.targets) * batch.target_mask).sum() / batch.target_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_checkpoint(path: Path) -> Path:
    tiny_policy().save_pretrained(path)
    return path


def scratch_registry(monkeypatch, registry) -> None:
    """Let a test register plug-ins into `registry` and have them undone afterwards. The built-in
    plug-ins are discovered first: discovered into the scratch copy, they would go with it, and every
    later test in the process would find the registry empty (its discovery already done)."""
    registry.names()
    monkeypatch.setattr(registry, "_items", dict(registry._items))
