"""Reference speculative sampling in plain PyTorch: exact rejection sampling, batched.

Given, for B sequences, k drafted tokens d_1..d_k with draft distributions q_1..q_k and the
target's distributions p_1..p_{k+1} at the same positions (p_{k+1} after the last draft):

    for i = 1..k:   accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
                    on the first rejection emit a token from norm(max(0, p_i - q_i)) and stop
    if all k were accepted, emit a bonus token from p_{k+1}

Every emitted token is then distributed exactly as the target would have sampled it (Leviathan et
al. 2023, Chen et al. 2023). Greedy drafting is the case q_i = one-hot(argmax): accept with p_i(d_i)
and resample from p_i with d_i removed.

    out = speculative_step(p, q, drafts, generator)       # p [B, k+1, V], q [B, k, V], drafts [B, k]
    out.tokens[b, : out.num_emitted[b]]                    # accepted drafts, then one target token
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpecStep:
    tokens: torch.Tensor  # [B, k+1] emitted tokens (valid up to num_emitted)
    num_emitted: torch.Tensor  # [B] accepted drafts + 1
    num_accepted: torch.Tensor  # [B] accepted drafts


def one_hot_drafts(drafts: torch.Tensor, vocab: int) -> torch.Tensor:
    """q for greedy drafting: the point mass on each drafted token. [B, k] -> [B, k, V]."""
    return torch.nn.functional.one_hot(drafts, vocab).float()


def speculative_step(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None) -> SpecStep:
    B, k1, V = p.shape
    k = k1 - 1
    p, q = p.float(), q.float()
    rows = torch.arange(B)
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k] p_i(d_i)
    q_draft = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k] q_i(d_i)
    u = torch.rand(B, k, generator=generator)
    accept = u * q_draft < p_draft  # u < p/q without dividing by q = 0      [B, k]
    # accepted prefix length: index of the first rejection (k if none)
    rejected = ~accept
    first_reject = torch.where(rejected.any(-1), rejected.float().argmax(-1), torch.full((B,), k))  # [B]
    # the emitted extra token: residual at the first rejection, or the bonus distribution
    residual = (p[:, :k] - q).clamp(min=0)  # [B, k, V]
    bonus = p[:, k]  # [B, V]
    pick = first_reject.clamp(max=k - 1) if k > 0 else first_reject
    extra_dist = torch.where((first_reject < k)[:, None], residual[rows, pick] if k > 0 else bonus, bonus)  # [B, V]
    mass = extra_dist.sum(-1, keepdim=True)
    # residual mass can only vanish when p_i == q_i, where rejection has probability zero
    extra_dist = torch.where(mass > 0, extra_dist / mass.clamp(min=1e-30), bonus)
    extra = torch.multinomial(extra_dist, 1, generator=generator).squeeze(-1)  # [B]
    tokens = torch.zeros(B, k + 1, dtype=torch.long)
    tokens[:, :k] = drafts
    tokens[rows, first_reject] = extra
    return SpecStep(tokens=tokens, num_emitted=first_reject + 1, num_accepted=first_reject)


def sample_from(p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of p [B, V]."""
    return torch.multinomial(p.float(), 1, generator=generator).squeeze(-1)
