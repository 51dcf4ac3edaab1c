"""Drafter distillation against the current policy, and teacher-forced acceptance.

Data: `DistillExample`s, one per rollout sequence, hold what one policy forward pass produced for
it (token ids, completion mask, the hidden features the drafter reads, the policy's next-token
distribution at every position, full or top-k). The RL loop's logprob stage fills them; no second
policy forward pass is run for the drafter.

Losses between the policy's next-token distribution p and the drafter's q, per aligned position:
    fkl  forward KL(p || q)  (soft cross-entropy to the detached policy, as NeMo-RL does)
    rkl  reverse KL(q || p)
    tv   total variation 1/2 sum |p - q|, whose minimum maximises acceptance 1 - TV
    ce   cross-entropy to the sampled token (hard labels)

Teacher-forced acceptance of draft step j at a position: sum_x min(p, q) for probabilistic drafting
and p(argmax q) for greedy drafting (vLLM's default); the expected tokens per verify step follow by
chaining the steps (`expected_accept_len`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from codraft import precision
from codraft.drafter import Drafter, Features, TargetParts

TEACHER_DTYPE = torch.bfloat16


@dataclass
class DistillExample:
    input_ids: torch.Tensor  # [T]
    target_mask: torch.Tensor  # [T] 1 where position t's next token (t+1) is a completion token
    aux: torch.Tensor | None  # [T, n_aux * H] (bf16)
    last: torch.Tensor | None  # [T, H] (bf16)
    teacher: torch.Tensor  # [T, V] log-probs (bf16), or [T, k] top-k log-probs with `teacher_ids`
    teacher_ids: torch.Tensor | None = None  # [T, k] token ids of a top-k teacher
    weight: float = 1.0  # per-sequence loss weight (e.g. from its reward)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.input_ids, self.target_mask, self.aux, self.last, self.teacher, self.teacher_ids) if t is not None)


def teacher_logprobs(logits: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compress the policy's next-token distribution: full log-probs, or the top-k renormalised."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logp.to(TEACHER_DTYPE), None
    values, ids = logp.topk(top_k, dim=-1)
    return torch.log_softmax(values, dim=-1).to(TEACHER_DTYPE), ids


def dense_teacher(teacher: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """[.., V] log-probs (-inf off a top-k support)."""
    if ids is None:
        return teacher.float()
    out = teacher.new_full(teacher.shape[:-1] + (vocab,), float("-inf"), dtype=torch.float32)
    return out.scatter(-1, ids, teacher.float())


def examples_from_forward(feats: Features, target_mask: torch.Tensor, logits: torch.Tensor, top_k: int = 0, weights: list[float] | None = None) -> list[DistillExample]:
    """Split one forward pass over a micro-batch into per-sequence examples (padding dropped)."""
    out = []
    lengths = feats.attention_mask.sum(dim=1).tolist()
    teacher, ids = teacher_logprobs(logits, top_k)  # [B, T, V|k]
    for b, n in enumerate(lengths):
        out.append(
            DistillExample(
                input_ids=feats.input_ids[b, :n].clone(),
                target_mask=target_mask[b, :n].clone(),
                aux=feats.aux[b, :n].to(TEACHER_DTYPE).clone() if feats.aux is not None else None,
                last=feats.last[b, :n].to(TEACHER_DTYPE).clone() if feats.last is not None else None,
                teacher=teacher[b, :n].clone(),
                teacher_ids=ids[b, :n].clone() if ids is not None else None,
                weight=weights[b] if weights else 1.0,
            )
        )
    return out


@dataclass
class DistillBatch:
    feats: Features
    target_mask: torch.Tensor  # [B, T]
    teacher: torch.Tensor  # [B, T, V] log-probs (-inf padding off support)
    weights: torch.Tensor  # [B]


def collate(examples: list[DistillExample], vocab: int, device: torch.device | str = "cpu") -> DistillBatch:
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)

    def pad(get, width=None, fill=0.0, dtype=None):
        first = get(examples[0])
        if first is None:
            return None
        shape = (B, T) + tuple(first.shape[1:])
        out = torch.full(shape, fill, dtype=dtype or first.dtype)
        for i, e in enumerate(examples):
            t = get(e)
            out[i, : len(t)] = t
        return out

    ids = pad(lambda e: e.input_ids, fill=0)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, e in enumerate(examples):
        mask[i, : len(e.input_ids)] = 1
    teacher = torch.full((B, T, vocab), float("-inf"))
    for i, e in enumerate(examples):
        teacher[i, : len(e.input_ids)] = dense_teacher(e.teacher, e.teacher_ids, vocab)
    aux, last = pad(lambda e: e.aux, dtype=torch.float32), pad(lambda e: e.last, dtype=torch.float32)
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return DistillBatch(
        feats=Features(to(ids), to(mask), to(aux), to(last)),
        target_mask=to(pad(lambda e: e.target_mask, fill=0)),
        teacher=to(teacher),
        weights=to(torch.tensor([e.weight for e in examples], dtype=torch.float32)),
    )


def aligned(draft_logits: torch.Tensor, shift: int, batch: DistillBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair draft rows i with policy rows i + shift: (q logits [N, V], p log-probs [N, V], next tokens [N], row weights [N])."""
    B, T, V = draft_logits.shape
    n = T - shift - 1  # position i + shift must predict a real next token
    if n <= 0:
        empty = draft_logits.new_zeros(0, V)
        return empty, empty, torch.zeros(0, dtype=torch.long, device=empty.device), empty.new_zeros(0)
    q = draft_logits[:, :n]  # [B, n, V]
    p = batch.teacher[:, shift : shift + n]  # [B, n, V]
    valid = batch.target_mask[:, shift : shift + n].bool()  # [B, n]
    nxt = batch.feats.input_ids[:, shift + 1 : shift + 1 + n]
    w = batch.weights[:, None].expand(B, n)
    return q[valid], p[valid], nxt[valid], w[valid]


def distill_loss(q_logits: torch.Tensor, p_logp: torch.Tensor, next_tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row loss [N] between the drafter (logits) and the policy (log-probs)."""
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    p = p_logp.exp()
    on_q = torch.isfinite(logq)
    if kind == "fkl":
        term = torch.where(p > 0, p * (p_logp - logq.clamp(min=-1e4)), torch.zeros_like(p))
        return term.sum(-1)
    if kind == "rkl":
        q = logq.exp()
        term = torch.where(on_q & (q > 0), q * (logq - p_logp.clamp(min=-1e4)), torch.zeros_like(q))
        return term.sum(-1)
    if kind == "tv":
        return 0.5 * (p - logq.exp()).abs().sum(-1)
    if kind == "ce":
        return -logq.gather(-1, next_tokens[:, None]).squeeze(-1).clamp(min=-1e4)
    raise ValueError(f"unknown distillation loss {kind!r} (fkl, rkl, tv, ce)")


@dataclass
class Alpha:
    """Teacher-forced acceptance per draft step: probabilistic (sum min(p, q)) and greedy (p(argmax q))."""

    prob: list[float] = field(default_factory=list)
    greedy: list[float] = field(default_factory=list)
    positions: int = 0

    @property
    def accept_len(self) -> float:
        return expected_accept_len(self.greedy)

    @property
    def accept_len_prob(self) -> float:
        return expected_accept_len(self.prob)


def expected_accept_len(alphas: list[float]) -> float:
    """1 + a0 + a0 a1 + a0 a1 a2 + ... (tokens per verify step when step j is accepted w.p. a_j)."""
    total, running = 1.0, 1.0
    for a in alphas:
        running *= a
        total += running
    return total if alphas else float("nan")


@torch.no_grad()
def teacher_forced_alpha(drafter: Drafter, examples: list[DistillExample], target: TargetParts, steps: int, vocab: int, batch_size: int = 32, autocast: bool = False) -> Alpha:
    """Acceptance of `drafter` against the policy distributions recorded in `examples`.

    A drafter that predicts all steps in one teacher-forced pass (a draft model) has the same
    per-position acceptance at every step, so its single figure stands for each of the `steps`.
    """
    was_training = drafter.training
    drafter.eval()
    sums_prob = [0.0] * steps
    sums_greedy = [0.0] * steps
    counts = [0] * steps
    device = next(drafter.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], vocab, device)
        with precision.autocast(device, autocast):
            outs = drafter.unroll(batch.feats, target, steps)
        for j, (logits, shift) in enumerate(outs):
            q_logits, p_logp, _, _ = aligned(logits, shift, batch)
            if len(q_logits) == 0:
                continue
            p, q = p_logp.exp(), torch.softmax(q_logits.float(), -1)
            sums_prob[j] += torch.minimum(p, q).sum(-1).sum().item()
            sums_greedy[j] += p.gather(-1, q_logits.argmax(-1, keepdim=True)).sum().item()
            counts[j] += len(q_logits)
    drafter.train(was_training)
    if len(outs) == 1:  # single-pass drafter: one figure for every step
        sums_prob, sums_greedy, counts = [sums_prob[0]] * steps, [sums_greedy[0]] * steps, [counts[0]] * steps
    return Alpha([s / max(1, c) for s, c in zip(sums_prob, counts)], [s / max(1, c) for s, c in zip(sums_greedy, counts)], counts[0])


@dataclass
class DistillStats:
    steps: int
    loss_first: float
    loss_last: float
    tokens: int
    seconds: float


def distill(
    drafter: Drafter,
    examples: list[DistillExample],
    target: TargetParts,
    *,
    steps: int,
    k: int,
    loss: str,
    lr: float,
    batch_size: int,
    vocab: int,
    seed: int = 0,
    max_tokens: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    autocast: bool = True,
) -> DistillStats:
    """Train `drafter` toward the policy distributions in `examples` for `steps` AdamW steps
    (stopping early once `max_tokens` aligned positions were seen, if set)."""
    import time

    t0 = time.perf_counter()
    if not examples:
        raise ValueError("no distillation examples")
    rng = random.Random(seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    drafter.train()
    device = params[0].device
    losses: list[float] = []
    seen = 0
    for step in range(steps):
        batch = collate(rng.sample(examples, min(batch_size, len(examples))), vocab, device)
        with precision.autocast(device, autocast):
            outs = drafter.unroll(batch.feats, target, k)
        total, count = 0.0, 0
        for logits, shift in outs:
            q, p, nxt, w = aligned(logits, shift, batch)
            if len(q):
                total = total + (distill_loss(q, p, nxt, loss) * w).sum()
                count += len(q)
        if count == 0:
            continue
        value = total / count
        if not torch.isfinite(value):
            raise FloatingPointError(f"drafter distillation loss is {value.item()} at step {step}; the drafter was not changed further")
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(value.item())
        seen += count
        if max_tokens and seen >= max_tokens:
            break
    drafter.eval()
    return DistillStats(len(losses), losses[0] if losses else math.nan, sum(losses[-5:]) / max(1, len(losses[-5:])), seen, time.perf_counter() - t0)
