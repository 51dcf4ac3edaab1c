"""Synchronous GRPO: group-relative advantages and a clipped, token-level policy-gradient loss.

    adv = group_advantages(rewards, group_size=8)                 # [N]
    scored = trainer.score(batch)                                 # logprob stage: old (+ ref) log-probs
    stats = trainer.update(batch, scored, adv)                    # train stage: AdamW steps

Loss per completion token t of sequence i (ratio r = exp(logp - logp_old)):
    -min(r * A_i, clip(r, 1 - clip_low, 1 + clip_high) * A_i) + kl_coef * k3(ref || policy) - entropy_coef * H_t
averaged over all completion tokens of a mini-batch (token-level aggregation, as in DAPO).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from codraft import precision
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


def minibatch_split(n_rows: int, n_minis: int, seed: int, step: int) -> list[list[int]]:
    """The rows of each of a step's mini-batches: a permutation seeded by the run's seed and the step
    (a new split every step; the same on every rank and in a resumed run)."""
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).tolist()
    return [perm[i::n_minis] for i in range(n_minis)]


class LRSchedule:
    """The learning-rate scale per step: constant, or cosine decay to 0 just after the run's last step.

    The decay is anchored: when a resumed run changes its number of steps, the scale continues from
    where it was and decays to 0 at the new last step (recomputing the cosine over the new length
    would make the rate jump)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.horizon: int | None = None
        self.anchor_step, self.anchor_scale = 0, 1.0

    def _cosine(self, step: int) -> float:
        span = max(1, self.horizon - self.anchor_step)
        return self.anchor_scale * 0.5 * (1.0 + math.cos(math.pi * min(max((step - self.anchor_step) / span, 0.0), 1.0)))

    def scale(self, step: int, total_steps: int) -> float:
        if self.kind != "cosine":
            return 1.0
        if self.horizon is None:
            self.horizon = total_steps
        elif total_steps != self.horizon:  # run.steps changed on resume: continue from the current rate
            self.anchor_scale, self.anchor_step, self.horizon = self._cosine(step), step, total_steps
        return self._cosine(step)

    def state_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "anchor_step": self.anchor_step, "anchor_scale": self.anchor_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.horizon, self.anchor_step, self.anchor_scale = state["horizon"], state["anchor_step"], state["anchor_scale"]


@dataclass
class Scored:
    """What the logprob stage produced for a rollout batch."""

    old_logp: torch.Tensor | None  # [B, T-1] behaviour log-probs of the targets (0 off the completion);
    # None when the update itself supplies them exactly (one on-policy mini-batch: ratio = 1)
    ref_logp: torch.Tensor | None  # [B, T-1] reference log-probs, when a KL term is used
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. what drafters distil on


class GRPOTrainer:
    """Holds the policy (fp32 master weights), its optimizer and an optional frozen reference."""

    def __init__(self, policy: torch.nn.Module, cfg: GRPOConfig, temperature: float = 1.0, reference: torch.nn.Module | None = None, seed: int = 0):
        self.policy = policy
        self.cfg = cfg
        self.seed = seed
        self.step = 0
        self.lr_schedule = LRSchedule(cfg.lr_decay)
        self.temperature = temperature if temperature > 0 else 1.0
        self.reference = reference
        params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.device = next(policy.parameters()).device

    def _autocast(self):
        return precision.autocast(self.device, self.cfg.autocast_bf16)

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

    # ---- hooks: what data parallelism changes (codraft.distributed.DistributedTrainer overrides them)
    def _plan(self, batch: TokenBatch, rows: list[int] | None = None) -> list[list[int]]:
        """Micro-batches of `rows` that this process runs ([] = a zero-weight pass to join collectives)."""
        return self._chunks(batch, rows)

    def _idle_pass(self, batch: TokenBatch) -> None:
        """A pass that contributes nothing; only data-parallel ranks without rows of their own run one."""

    def _sync(self, last: bool):
        """Context of one backward; data parallelism reduces gradients in the last one of a mini-batch."""
        return contextlib.nullcontext()

    def _all_ranks(self, flag: bool) -> bool:
        """True only if `flag` holds on every rank."""
        return flag

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks."""
        return tensor

    def _clip(self) -> float:
        """Clip the gradient to `max_grad_norm`; returns its norm before clipping."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))

    # ---- the two stages
    @torch.no_grad()
    def score(self, batch: TokenBatch, on_forward: Callable[[list[int], TokenBatch, Any, torch.Tensor], None] | None = None, force: bool = False) -> Scored:
        """Logprob stage: behaviour and reference log-probs of every completion token.

        `on_forward(rows, micro_batch, model_output, logits)` sees each policy forward pass, so that
        consumers (drafter distillation) reuse it instead of running the policy again. With one
        on-policy mini-batch and nothing else asking, nothing runs: the update's own forward gives
        the same log-probs (ratio 1) and it detaches them itself.
        """
        cfg = self.cfg
        use_ref = self.reference is not None and cfg.kl_coef > 0
        needed = force or use_ref or on_forward is not None or cfg.mini_batches > 1 or cfg.behavior_logprobs != "recompute"
        if self._all_ranks(not needed):  # only the main rank may hold an on_forward: decide together
            return Scored(None, None)
        B, T = batch.input_ids.shape
        old = torch.zeros(B, T - 1)
        ref = torch.zeros(B, T - 1) if use_ref else None
        self.policy.eval()
        for rows in self._plan(batch):
            if not rows:
                self._idle_pass(batch)
                continue
            mb = self._slice(batch, rows)
            t = mb.input_ids.shape[1] - 1
            targets = mb.targets.to(self.device)
            logits, out = self._forward(self.policy, mb, hidden=on_forward is not None)
            old[rows, :t] = token_logprobs(logits, targets).cpu() * mb.target_mask
            if on_forward is not None:
                on_forward(rows, mb, out, logits)
            if ref is not None:
                ref_logits, _ = self._forward(self.reference, mb)
                ref[rows, :t] = token_logprobs(ref_logits, targets).cpu() * mb.target_mask
        # under data parallelism each row was filled on exactly one rank and is zero on the others
        return Scored(self._reduce_sum(old), self._reduce_sum(ref) if ref is not None else None)

    def _micro_step(self, batch: TokenBatch, rows: list[int], scored: Scored, old_all: torch.Tensor | None, adv: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its token sums of loss, clip, kl, entropy [4]."""
        cfg = self.cfg
        mb = self._slice(batch, rows)
        t = mb.input_ids.shape[1] - 1
        mask = mb.target_mask.float().to(self.device)
        logits, _ = self._forward(self.policy, mb)
        logp = token_logprobs(logits, mb.targets.to(self.device))
        ref = scored.ref_logp[rows, :t].to(self.device) if scored.ref_logp is not None else None
        old = logp.detach() if old_all is None else old_all[rows, :t].to(self.device)
        loss_tok, info = grpo_token_loss(logp, old, adv[rows].to(self.device), cfg.clip_low, cfg.clip_high, ref, cfg.kl_coef)
        with torch.set_grad_enabled(cfg.entropy_coef > 0):  # an entropy bonus needs its gradient
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # [b, t]
        if cfg.entropy_coef > 0:
            loss_tok = loss_tok - cfg.entropy_coef * entropy
        loss = (loss_tok * mask).sum() / n_tokens  # n_tokens: the whole mini-batch's, over all ranks
        loss.backward()
        with torch.no_grad():
            entropy = entropy.detach()
            kl = float((info["kl"] * mask).sum()) if "kl" in info else 0.0
            return torch.tensor([loss.item() * n_tokens, float((info["clipped"] * mask).sum()), kl, float((entropy * mask).sum())], dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """Policy weights, optimizer state and the learning-rate schedule (for checkpoints)."""
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def begin_step(self, step: int, total_steps: int) -> None:
        """Set the step (it seeds the mini-batch split) and its learning rate (`lr_decay`)."""
        self.step = step
        scale = self.lr_schedule.scale(step, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * scale

    def update(self, batch: TokenBatch, scored: Scored, adv: torch.Tensor, behaviour_logp: torch.Tensor | None = None) -> dict[str, float]:
        """Train stage: `mini_batches` AdamW steps over the rollout batch. Returns mean diagnostics."""
        cfg = self.cfg
        old_all = behaviour_logp if behaviour_logp is not None else scored.old_logp
        B = batch.input_ids.shape[0]
        minis = minibatch_split(B, cfg.mini_batches, self.seed, self.step)  # the same on every rank
        sums = torch.zeros(4, dtype=torch.float64)  # this rank's token sums of loss, clip_frac, kl, entropy
        grad_norm_sum = 0.0
        tokens_seen = active_tokens = trained = skipped = 0
        self.policy.train()
        for mini in minis:
            n_tokens = int(batch.target_mask[mini].sum())  # global: every rank holds the whole batch
            active = [r for r in mini if cfg.kl_coef > 0 or cfg.entropy_coef > 0 or float(adv[r]) != 0.0]
            if n_tokens == 0 or not active:
                continue  # decided alike on every rank
            self.optimizer.zero_grad(set_to_none=True)
            plan = self._plan(batch, active)
            for i, rows in enumerate(plan):
                with self._sync(last=i == len(plan) - 1):
                    if rows:
                        sums += self._micro_step(batch, rows, scored, old_all, adv, n_tokens)
                    else:
                        self._idle_pass(batch)
            grad_norm = self._clip()
            if not self._all_ranks(math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)  # never step on non-finite gradients
                skipped += 1
            else:
                self.optimizer.step()
                grad_norm_sum += grad_norm * n_tokens
            tokens_seen += n_tokens
            active_tokens += int(batch.target_mask[active].sum())
            trained += len(active)
        self.policy.eval()
        sums = self._reduce_sum(sums)
        # the loss is the objective: a token mean over every completion token (rows without advantage
        # add nothing); the diagnostics are means over the tokens actually trained on
        n, n_active = max(1, tokens_seen), max(1, active_tokens)
        out = {"loss": float(sums[0]) / n, **{k: float(v) / n_active for k, v in zip(("clip_frac", "kl", "entropy"), sums[1:])}}
        out["grad_norm"] = grad_norm_sum / n
        out["skipped_updates"] = skipped
        out["trained_frac"] = trained / max(1, B)
        if not math.isfinite(out["loss"]):
            out["loss"] = float("nan")
        return out
