"""Synchronous GRPO: group-relative advantages and a clipped, token-level policy-gradient loss.

    adv = group_advantages(rewards, group_size=8)                 # [N]
    scored = trainer.score(batch)                                 # logprob stage: old (+ ref) log-probs
    stats = trainer.update(batch, scored, adv)                    # train stage: AdamW steps

Loss per completion token t of sequence i (ratio r = exp(logp - logp_old)):
    -min(r * A_i, clip(r, 1 - clip_low, 1 + clip_high) * A_i) + kl_coef * k3(ref || policy)
averaged over all completion tokens of a mini-batch (token-level aggregation, as in DAPO).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from codraft.batch import TokenBatch, micro_batches, token_logprobs
from codraft.config import GRPOConfig


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) [/ std of its group]. rewards [N] with N = groups * group_size."""
    grouped = rewards.float().view(-1, group_size)  # [P, G]
    std = grouped.std(dim=1, keepdim=True)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (std + eps)
    # a group whose rewards are all equal carries no signal (and exactly none, despite rounding)
    return torch.where(std > eps, centred, torch.zeros_like(centred)).view(-1)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, T] and per-token diagnostics. adv [B] is broadcast over tokens."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    a = adv.unsqueeze(-1)  # [B, 1]
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    loss = -torch.minimum(unclipped, clipped)
    info = {"clipped": (clipped < unclipped).float(), "ratio": ratio.detach()}
    if ref_logp is not None and kl_coef > 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(policy || ref), >= 0
        loss = loss + kl_coef * kl
        info["kl"] = kl.detach()
    return loss, info


@dataclass
class Scored:
    """What the logprob stage produced for a rollout batch."""

    old_logp: torch.Tensor | None  # [B, T-1] behaviour log-probs of the targets (0 off the completion);
    # None when the update itself supplies them exactly (one on-policy mini-batch: ratio = 1)
    ref_logp: torch.Tensor | None  # [B, T-1] reference log-probs, when a KL term is used
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. what drafters distil on


class GRPOTrainer:
    """Holds the policy (fp32 master weights), its optimizer and an optional frozen reference."""

    def __init__(self, policy: torch.nn.Module, cfg: GRPOConfig, temperature: float = 1.0, reference: torch.nn.Module | None = None):
        self.policy = policy
        self.cfg = cfg
        self.temperature = temperature if temperature > 0 else 1.0
        self.reference = reference
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.device = next(policy.parameters()).device

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16)

    def _forward(self, model: torch.nn.Module, batch: TokenBatch, hidden: bool = False):
        with self._autocast():
            out = model(
                input_ids=batch.input_ids.to(self.device),
                attention_mask=batch.attention_mask.to(self.device),
                output_hidden_states=hidden,
            )
        logits = out.logits[:, :-1].float() / self.temperature  # [B, T-1, V]
        return logits, out

    def _slice(self, batch: TokenBatch, idx: list[int]) -> TokenBatch:
        rows = torch.tensor(idx)
        length = int(batch.attention_mask[rows].sum(dim=1).max())
        return TokenBatch(batch.input_ids[rows, :length], batch.attention_mask[rows, :length], batch.completion_mask[rows, :length])

    def _chunks(self, batch: TokenBatch, rows: list[int] | None = None) -> list[list[int]]:
        rows = list(range(batch.input_ids.shape[0])) if rows is None else rows
        lengths = batch.attention_mask.sum(dim=1).tolist()
        groups = micro_batches([lengths[r] for r in rows], self.cfg.micro_batch_tokens)
        return [[rows[i] for i in g] for g in groups]

    @torch.no_grad()
    def score(self, batch: TokenBatch, on_forward: Callable[[list[int], TokenBatch, Any, torch.Tensor], None] | None = None, force: bool = False) -> Scored:
        """Logprob stage: behaviour and reference log-probs of every completion token.

        `on_forward(rows, micro_batch, model_output, logits)` sees each policy forward pass, so that
        consumers (drafter distillation) reuse it instead of running the policy again.
        """
        B, T = batch.input_ids.shape
        ref = torch.zeros(B, T - 1) if self.reference is not None and self.cfg.kl_coef > 0 else None
        if self.cfg.mini_batches == 1 and ref is None and on_forward is None and self.cfg.behavior_logprobs == "recompute" and not force:
            # With a single on-policy update the recomputed log-probs equal the update's own forward
            # (ratio 1); the update detaches them itself instead of running the policy twice.
            return Scored(None, None)
        old = torch.zeros(B, T - 1)
        self.policy.eval()
        for rows in self._chunks(batch):
            mb = self._slice(batch, rows)
            t = mb.input_ids.shape[1] - 1
            logits, out = self._forward(self.policy, mb, hidden=on_forward is not None)
            old[rows, :t] = token_logprobs(logits, mb.targets.to(self.device)).cpu() * mb.target_mask
            if on_forward is not None:
                on_forward(rows, mb, out, logits)
            if ref is not None:
                ref_logits, _ = self._forward(self.reference, mb)
                ref[rows, :t] = token_logprobs(ref_logits, mb.targets.to(self.device)).cpu() * mb.target_mask
        return Scored(old, ref)

    def update(self, batch: TokenBatch, scored: Scored, adv: torch.Tensor, behaviour_logp: torch.Tensor | None = None) -> dict[str, float]:
        """Train stage: `mini_batches` AdamW steps over the rollout batch. Returns mean diagnostics."""
        cfg = self.cfg
        old_all = behaviour_logp if behaviour_logp is not None else scored.old_logp
        B = batch.input_ids.shape[0]
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(B)).tolist()
        minis = [perm[i :: cfg.mini_batches] for i in range(cfg.mini_batches)]
        totals: dict[str, float] = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "skipped": 0}
        tokens_seen = trained = 0
        self.policy.train()
        for mini in minis:
            n_tokens = int(batch.target_mask[mini].sum())  # token-level mean over the whole mini-batch
            # sequences with zero advantage add nothing to the loss or its gradient without a KL term
            active = [r for r in mini if cfg.kl_coef > 0 or float(adv[r]) != 0.0]
            if n_tokens == 0 or not active:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            for rows in self._chunks(batch, active):
                mb = self._slice(batch, rows)
                t = mb.input_ids.shape[1] - 1
                mask = mb.target_mask.float().to(self.device)
                logits, _ = self._forward(self.policy, mb)
                logp = token_logprobs(logits, mb.targets.to(self.device))
                ref = scored.ref_logp[rows, :t].to(self.device) if scored.ref_logp is not None else None
                old = logp.detach() if old_all is None else old_all[rows, :t].to(self.device)
                loss_tok, info = grpo_token_loss(logp, old, adv[rows].to(self.device), cfg.clip_low, cfg.clip_high, ref, cfg.kl_coef)
                loss = (loss_tok * mask).sum() / n_tokens
                loss.backward()
                with torch.no_grad():
                    probs = logits.softmax(-1)
                    entropy = -(probs * logits.log_softmax(-1)).sum(-1)
                    totals["loss"] += loss.item() * n_tokens
                    totals["clip_frac"] += float((info["clipped"] * mask).sum())
                    totals["entropy"] += float((entropy * mask).sum())
                    if "kl" in info:
                        totals["kl"] += float((info["kl"] * mask).sum())
            params = [p for p in self.policy.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)  # never step on non-finite gradients
                totals["skipped"] += 1
            else:
                self.optimizer.step()
                totals["grad_norm"] += float(grad_norm) * n_tokens
            tokens_seen += n_tokens
            trained += len(active)
        self.policy.eval()
        n = max(1, tokens_seen)
        out = {k: v / n for k, v in totals.items() if k != "skipped"}
        out["skipped_updates"] = totals["skipped"]
        out["trained_frac"] = trained / max(1, B)
        if not math.isfinite(out["loss"]):
            out["loss"] = float("nan")
        return out
