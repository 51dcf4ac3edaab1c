"""Padded token batches of (prompt, completion) sequences, and length-bucketed micro-batching.

A `TokenBatch` holds right-padded `input_ids` [B, T] and a `completion_mask` [B, T] that marks the
positions whose token is a completion token (the ones that are scored and trained on). The logit
at position t predicts token t+1, so per-token quantities live on [B, T-1] after a shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, T] right-padded with pad_id
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    completion_mask: torch.Tensor  # [B, T] 1 for completion tokens

    @property
    def target_mask(self) -> torch.Tensor:
        """[B, T-1] 1 where the next-token prediction at t targets a completion token."""
        return self.completion_mask[:, 1:]

    @property
    def targets(self) -> torch.Tensor:
        return self.input_ids[:, 1:]  # [B, T-1]


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lengths)
    B = len(prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p) : n] = 1
    return TokenBatch(input_ids, attention_mask, completion_mask)


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `max_tokens` padded tokens.

    Indices are sorted by length first, so padding waste stays small. A sequence longer than
    `max_tokens` gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in current] + [lengths[i]])
        if current and longest * (len(current) + 1) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position. logits [B, T, V] (any dtype), targets [B, T] -> [B, T] fp32."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
