"""Drafter distillation against the current policy, and teacher-forced acceptance.

`DistillExample`s, one per rollout sequence, hold what the logprob stage's policy forward produced
for it (token ids, completion mask, the drafter's input features, the policy's next-token
distributions), in host memory; `collate` moves one batch at a time to the drafter's device.
Teachers are dense ([T, V] log-probs) or sparse: top-k log-probs [T, k] (not renormalised), their
ids and the tail mass [T] left out. `controller.teacher_top_k = -1` (`resolve_top_k`) stays dense
up to `DENSE_VOCAB_MAX` tokens (the testbed) and keeps the top `AUTO_TOP_K` above (Qwen3: 297 KiB
per position dense, 772 B sparse). Sparse teachers are never densified: losses run over k + 1 bins
(kept ids + tail), from the drafter's logits gathered at the ids and two logsumexps.

Losses between the policy's next-token distribution p and the drafter's q, per aligned position:
    fkl  forward KL(p || q)  (soft cross-entropy to the detached policy, as NeMo-RL does)
    rkl  reverse KL(q || p)
    tv   total variation 1/2 sum |p - q|, whose minimum maximises acceptance 1 - TV
    ce   cross-entropy to the sampled token (hard labels)
On a sparse teacher they are exact when the tail is empty; otherwise fkl_dense - fkl_sparse =
m KL(p_tail/m || q_tail/q_m) >= 0 and |tv_dense - tv_sparse| <= min(m, q_m) <= m (m, q_m: tail masses).

A drafter with a reduced vocabulary (EAGLE-3 `draft_vocab_size`) is measured against the teacher
restricted to its support S and renormalised, p / p(S); each row weighs p(S) in training (the
gradient of the unrestricted soft cross-entropy) and in the reported loss (a p(S)-weighted mean,
0 when q = p / p(S)). The mass off S is reported apart (`drafter/teacher_off_vocab`).

Teacher-forced acceptance of draft step j at a position: sum_x min(p, q) for probabilistic drafting
and p(argmax q) for greedy drafting (vLLM's default); `expected_accept_len` chains the steps. On a
sparse teacher both sum over the kept ids: lower bounds, within the tail mass m of the dense ones.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from codraft import precision
from codraft.drafter import Drafter, Features, TargetParts

TEACHER_DTYPE = torch.bfloat16
AUTO_TOP_K = 128  # k of automatic sparse teachers (`controller.teacher_top_k = -1` on a large vocabulary)
DENSE_VOCAB_MAX = 4096  # automatic teachers stay dense up to this vocabulary size (the testbed's 384 among them)
ALPHA_BATCH_ELEMENTS = 2**28  # most padded positions x V per teacher-forced acceptance batch (1 GiB per fp32 [.., V])
_MASKED = -1e30  # a finite "minus infinity": logsumexp's gradient stays finite on rows with nothing left


def resolve_top_k(setting: int, vocab: int) -> int:
    """The k a `controller.teacher_top_k` setting means for a vocabulary (0 = dense, -1 = automatic)."""
    return (0 if vocab <= DENSE_VOCAB_MAX else AUTO_TOP_K) if setting < 0 else (0 if setting >= vocab else setting)


@dataclass
class Teacher:
    """Next-token distributions: dense log-probs [.., V], or top-k log-probs [.., k] + ids [.., k] + tail mass [..]."""

    logp: torch.Tensor
    ids: torch.Tensor | None = None
    tail: torch.Tensor | None = None

    @property
    def sparse(self) -> bool:
        return self.ids is not None


@dataclass
class DistillExample:
    input_ids: torch.Tensor  # [T]
    target_mask: torch.Tensor  # [T] 1 where position t's next token (t+1) is a completion token
    aux: torch.Tensor | None  # [T, n_aux * H] (bf16)
    last: torch.Tensor | None  # [T, H] (bf16)
    teacher: torch.Tensor  # [T, V] log-probs (bf16), or [T, k] top-k log-probs with `teacher_ids`
    teacher_ids: torch.Tensor | None = None  # [T, k] token ids of a top-k teacher (int32)
    weight: float = 1.0  # per-sequence loss weight (e.g. from its reward)
    teacher_tail: torch.Tensor | None = None  # [T] probability mass outside `teacher_ids` (fp32)

    def nbytes(self) -> int:
        parts = (self.input_ids, self.target_mask, self.aux, self.last, self.teacher, self.teacher_ids, self.teacher_tail)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def teacher_logprobs(logits: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Compress the policy's next-token distribution: full log-probs, or the top-k log-probs (not
    renormalised) with their ids and the tail mass. top_k: 0 dense, -1 automatic (`resolve_top_k`)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = resolve_top_k(top_k, logits.shape[-1])
    if k == 0:
        return logp.to(TEACHER_DTYPE), None, None
    values, ids = logp.topk(k, dim=-1)
    tail = (-torch.expm1(torch.logsumexp(values, dim=-1))).clamp(min=0.0)  # 1 - kept mass
    return values.to(TEACHER_DTYPE), ids.to(torch.int32), tail


def dense_teacher(teacher: torch.Tensor, ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """[.., V] log-probs (-inf off a top-k support; a sparse teacher's tail mass is dropped)."""
    if ids is None:
        return teacher.float()
    return teacher.new_full(teacher.shape[:-1] + (vocab,), float("-inf"), dtype=torch.float32).scatter(-1, ids.long(), teacher.float())


def examples_from_forward(feats: Features, target_mask: torch.Tensor, logits: torch.Tensor, top_k: int = 0, weights: list[float] | None = None) -> list[DistillExample]:
    """Split one forward pass over a micro-batch into per-sequence examples in host memory
    (padding dropped). top_k: 0 dense teachers, -1 automatic, k > 0 the top k."""
    out = []
    lengths = feats.attention_mask.sum(dim=1).tolist()
    teacher, ids, tail = teacher_logprobs(logits, top_k)  # [B, T, V|k], [B, T, k], [B, T]
    host = lambda t, n, dtype=None: t[:n].detach().to("cpu", dtype or t.dtype, copy=True)  # noqa: E731
    for b, n in enumerate(lengths):
        aux = host(feats.aux[b], n, TEACHER_DTYPE) if feats.aux is not None else None
        last = host(feats.last[b], n, TEACHER_DTYPE) if feats.last is not None else None
        sparse = dict(teacher_ids=host(ids[b], n), teacher_tail=host(tail[b], n)) if ids is not None else {}
        out.append(DistillExample(host(feats.input_ids[b], n), host(target_mask[b], n), aux, last, host(teacher[b], n), weight=weights[b] if weights else 1.0, **sparse))
    return out


@dataclass
class DistillBatch:
    feats: Features
    target_mask: torch.Tensor  # [B, T]
    teacher: Teacher  # [B, T, V] log-probs (-inf padding off support), or sparse [B, T, k] + ids + tail [B, T]
    weights: torch.Tensor  # [B]


def _padded(tensors: list[torch.Tensor], T: int, fill) -> torch.Tensor:
    """[len(tensors), T, ...] in the tensors' dtype, `fill` past each one's length (in host memory)."""
    out = torch.full((len(tensors), T) + tuple(tensors[0].shape[1:]), fill, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : len(t)] = t
    return out


def _batch_teacher(examples: list[DistillExample], T: int, vocab: int) -> Teacher:
    """Sparse when every example holds a top-k teacher of the same k; dense (densified) otherwise."""
    widths = {e.teacher.shape[-1] if e.teacher_ids is not None else None for e in examples}
    if None not in widths and len(widths) == 1:
        tails = [e.teacher_tail if e.teacher_tail is not None else torch.zeros(len(e.input_ids)) for e in examples]
        return Teacher(_padded([e.teacher for e in examples], T, float("-inf")), _padded([e.teacher_ids for e in examples], T, 0), _padded(tails, T, 0.0))
    teacher = torch.full((len(examples), T, vocab), float("-inf"))
    for i, e in enumerate(examples):
        teacher[i, : len(e.input_ids)] = dense_teacher(e.teacher, e.teacher_ids, vocab)
    return Teacher(teacher)


def collate(examples: list[DistillExample], vocab: int, device: torch.device | str = "cpu") -> DistillBatch:
    """Pad `examples` into one batch on `device` (features and teacher log-probs in fp32)."""
    T = max(len(e.input_ids) for e in examples)
    mask = _padded([torch.ones(len(e.input_ids), dtype=torch.long) for e in examples], T, 0)  # [B, T]

    def move(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
        return t.to(device, non_blocking=True).to(dtype or t.dtype) if t is not None else None

    def feature(get) -> torch.Tensor | None:
        return move(_padded([get(e) for e in examples], T, 0.0), torch.float32) if get(examples[0]) is not None else None

    teacher = _batch_teacher(examples, T, vocab)  # host memory; moved below
    return DistillBatch(
        feats=Features(move(_padded([e.input_ids for e in examples], T, 0)), move(mask), feature(lambda e: e.aux), feature(lambda e: e.last)),
        target_mask=move(_padded([e.target_mask for e in examples], T, 0)),
        teacher=Teacher(move(teacher.logp, torch.float32), move(teacher.ids, torch.long), move(teacher.tail, torch.float32)),
        weights=move(torch.tensor([e.weight for e in examples], dtype=torch.float32)),
    )


def aligned(draft_logits: torch.Tensor, shift: int, batch: DistillBatch) -> tuple[torch.Tensor, Teacher, torch.Tensor, torch.Tensor]:
    """Pair draft rows i with policy rows i + shift: (q logits [N, V], the teacher's rows [N, ..], next tokens [N], row weights [N])."""
    B, T, V = draft_logits.shape
    n = T - shift - 1  # position i + shift must predict a real next token
    if n <= 0:
        return draft_logits.new_zeros(0, V), Teacher(draft_logits.new_zeros(0, V)), torch.zeros(0, dtype=torch.long, device=draft_logits.device), draft_logits.new_zeros(0)
    valid = batch.target_mask[:, shift : shift + n].bool()  # [B, n]
    nxt = batch.feats.input_ids[:, shift + 1 : shift + 1 + n]
    w = batch.weights[:, None].expand(B, n)
    window = lambda t: t[:, shift : shift + n][valid] if t is not None else None  # noqa: E731
    teacher = Teacher(window(batch.teacher.logp), window(batch.teacher.ids), window(batch.teacher.tail))
    return draft_logits[:, :n][valid], teacher, nxt[valid], w[valid]


class _TailLogSumExp(torch.autograd.Function):
    """logsumexp of z [N, V] over the entries not in ids [N, k] -> [N, 1], saving no [N, V] copy for
    backward (only z, which the caller holds anyway). Rows with nothing left give about _MASKED."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.logsumexp(z.scatter(-1, ids, _MASKED), dim=-1, keepdim=True)
        ctx.save_for_backward(z, ids, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, ids, out = ctx.saved_tensors
        return (z - out).exp_().scatter_(-1, ids, 0.0).mul_(grad), None


def sparse_bins(q_logits: torch.Tensor, teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's and the teacher's log-probs over k + 1 bins (the kept ids, then the tail) [N, k + 1] each."""
    z = q_logits.float()  # [N, V]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
    logq_kept = z.gather(-1, teacher.ids) - lse  # [N, k]
    tail_lse = _TailLogSumExp.apply(z, teacher.ids)  # [N, 1] log of q's mass outside the ids (times e^lse)
    logq_tail = torch.where(tail_lse > _MASKED / 2, tail_lse - lse, float("-inf"))  # -inf: nothing left
    tail = teacher.tail if teacher.tail is not None else torch.zeros_like(lse[:, 0])
    return torch.cat([logq_kept, logq_tail], -1), torch.cat([teacher.logp.float(), tail.log()[:, None]], -1)


def restricted(logq: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher restricted to q's support (q > 0) and renormalised, with its mass there p(S) [N];
    as it is (and None) when q covers everything p gives mass to."""
    p, on = logp.exp(), logq != float("-inf")  # NaN stays "on": it must surface as a non-finite loss
    if not (~on & (p > 0)).any():
        return logp, None
    mass = (p * on).sum(-1)  # [N]
    return torch.where(on, logp - mass.clamp(min=1e-30).log()[:, None], float("-inf")), mass


def divergence(logq: torch.Tensor, logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row fkl / rkl / tv [N] between log-probs over the same bins [N, M]."""
    p = logp.exp()
    if kind == "fkl":
        return torch.where(p > 0, p * (logp - logq.clamp(min=-1e4)), torch.zeros_like(p)).sum(-1)
    if kind == "rkl":
        q, on = logq.exp(), torch.isfinite(logq)  # where(on, logq, 0): no 0 * inf in backward
        return torch.where(on & (q > 0), q * (torch.where(on, logq, 0.0) - logp.clamp(min=-1e4)), torch.zeros_like(q)).sum(-1)
    if kind == "tv":
        return 0.5 * (p - logq.exp()).abs().sum(-1)
    raise ValueError(f"unknown distillation loss {kind!r} (fkl, rkl, tv, ce)")


def distill_terms(q_logits: torch.Tensor, teacher: Teacher, next_tokens: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss [N] against the teacher restricted to the drafter's support, and each row's
    teacher mass on that support [N] (None when the drafter covers the teacher's whole support)."""
    if kind == "ce":
        z = q_logits.float()
        logq = z.gather(-1, next_tokens[:, None]).squeeze(-1) - torch.logsumexp(z, -1) if teacher.sparse else torch.log_softmax(z, dim=-1).gather(-1, next_tokens[:, None]).squeeze(-1)
        on = logq != float("-inf")
        if on.all():
            return -logq.clamp(min=-1e4), None
        return torch.where(on, -logq, torch.zeros_like(logq)), on.float()  # off-vocabulary tokens weigh 0
    logq, logp = sparse_bins(q_logits, teacher) if teacher.sparse else (torch.log_softmax(q_logits.float(), dim=-1), teacher.logp)
    logp, mass = restricted(logq, logp)
    return divergence(logq, logp, kind), mass


def distill_loss(q_logits: torch.Tensor, p_logp: torch.Tensor, next_tokens: torch.Tensor, kind: str, ids: torch.Tensor | None = None, tail: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row loss [N] between the drafter (logits [N, V]) and the policy (log-probs [N, V], or
    top-k log-probs [N, k] with their `ids` and `tail` mass), restricted to the drafter's support."""
    return distill_terms(q_logits, Teacher(p_logp, ids, tail), next_tokens, kind)[0]


def acceptance_terms(q_logits: torch.Tensor, teacher: Teacher) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row [N]: sum_x min(p, q), p(argmax q), and the teacher's mass off the drafter's support
    (sparse teachers: over the kept ids only, lower bounds within the tail mass)."""
    off_support = q_logits == float("-inf")  # [N, V]
    if not teacher.sparse:
        p, q = teacher.logp.exp(), torch.softmax(q_logits.float(), -1)
        return torch.minimum(p, q).sum(-1), p.gather(-1, q_logits.argmax(-1, keepdim=True)).squeeze(-1), (p * off_support).sum(-1)
    p, q = teacher.logp.exp(), torch.softmax(q_logits.float(), -1).gather(-1, teacher.ids)  # [N, k] each
    hit = teacher.ids == q_logits.argmax(-1, keepdim=True)  # [N, k]
    return torch.minimum(p, q).sum(-1), (p * hit).sum(-1), (p * off_support.gather(-1, teacher.ids)).sum(-1)


@dataclass
class Alpha:
    """Teacher-forced acceptance per draft step: probabilistic (sum min(p, q)) and greedy (p(argmax q))."""

    prob: list[float] = field(default_factory=list)
    greedy: list[float] = field(default_factory=list)
    positions: int = 0
    off_support: float = math.nan  # mean teacher mass outside the drafter's vocabulary (NaN: it covers it all)

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


def _chunks(examples: list[DistillExample], batch_size: int, vocab: int) -> list[list[DistillExample]]:
    """Consecutive batches of at most `batch_size` examples and ALPHA_BATCH_ELEMENTS padded positions x V."""
    out: list[list[DistillExample]] = []
    for e in examples:
        grown = out[-1] + [e] if out else None
        fits = grown is not None and len(grown) <= batch_size and len(grown) * max(len(x.input_ids) for x in grown) * vocab <= ALPHA_BATCH_ELEMENTS
        out[-1:] = [grown] if fits else out[-1:] + [[e]]
    return out


@torch.no_grad()
def teacher_forced_alpha(drafter: Drafter, examples: list[DistillExample], target: TargetParts, steps: int, vocab: int, batch_size: int = 32, autocast: bool = False) -> Alpha:
    """Acceptance of `drafter` against the policy distributions recorded in `examples`. A drafter that
    predicts all steps in one teacher-forced pass (a draft model) has one figure for every step."""
    was_training = drafter.training
    drafter.eval()
    sums_prob, sums_greedy, counts = [0.0] * steps, [0.0] * steps, [0] * steps
    off, off_rows, restricted_seen = 0.0, 0, False
    device = next(drafter.parameters()).device
    target = TargetParts(target.embed.to(device), target.lm_head.to(device))  # as they are when already there
    for chunk in _chunks(examples, batch_size, vocab):
        batch = collate(chunk, vocab, device)
        with precision.autocast(device, autocast):
            outs = drafter.unroll(batch.feats, target, steps)
        n_outs = len(outs)
        for j in range(n_outs):
            q_logits, teacher, _, _ = aligned(*outs.pop(0), batch)
            if len(q_logits) == 0:
                continue
            prob, greedy, off_mass = acceptance_terms(q_logits, teacher)
            sums_prob[j] += prob.sum().item()
            sums_greedy[j] += greedy.sum().item()
            counts[j] += len(q_logits)
            if j == 0:
                restricted_seen = restricted_seen or bool((q_logits == float("-inf")).any())
                off, off_rows = off + off_mass.sum().item(), off_rows + len(q_logits)
    drafter.train(was_training)
    if n_outs == 1:  # single-pass drafter: one figure for every step
        sums_prob, sums_greedy, counts = [sums_prob[0]] * steps, [sums_greedy[0]] * steps, [counts[0]] * steps
    prob, greedy = [s / max(1, c) for s, c in zip(sums_prob, counts)], [s / max(1, c) for s, c in zip(sums_greedy, counts)]
    return Alpha(prob, greedy, counts[0], off / max(1, off_rows) if restricted_seen else math.nan)


def teacher_record(examples: list[DistillExample], alpha: Alpha | None = None) -> dict[str, float]:
    """`drafter/teacher_mass`: mean mass sparse teachers keep over completion positions; `drafter/teacher_off_vocab`:
    mean mass outside a reduced draft vocabulary (from `alpha`). Empty for dense teachers and full-vocabulary drafters."""
    out: dict[str, float] = {}
    kept = torch.cat([(1 - e.teacher_tail.float())[e.target_mask.bool()] for e in examples if e.teacher_tail is not None] or [torch.zeros(0)])
    if len(kept):
        out["drafter/teacher_mass"] = kept.mean().item()
    if alpha is not None and not math.isnan(alpha.off_support):
        out["drafter/teacher_off_vocab"] = alpha.off_support
    return out


@dataclass
class DistillStats:
    steps: int
    loss_first: float
    loss_last: float
    tokens: int  # aligned positions seen
    seconds: float


def _batch_loss(drafter: Drafter, batch: DistillBatch, target: TargetParts, k: int, loss: str, autocast: bool) -> tuple[torch.Tensor | None, int]:
    """The batch's loss (a weighted mean over aligned positions, each weighing its teacher's mass on
    the drafter's support) and its number of aligned positions."""
    with precision.autocast(batch.weights.device, autocast):
        outs = drafter.unroll(batch.feats, target, k)
    total, count, norm = 0.0, 0, 0.0
    while outs:  # each step's full-vocabulary logits are let go once its rows are taken
        q, teacher, nxt, w = aligned(*outs.pop(0), batch)
        if len(q):
            rows, mass = distill_terms(q, teacher, nxt, loss)
            total = total + (rows * w if mass is None else rows * w * mass).sum()
            norm = norm + (len(q) if mass is None else mass.sum())
            count += len(q)
    return (total / norm if count and not float(norm) <= 0 else None), count  # norm 0: no teacher mass the drafter can reach


@torch.enable_grad()  # a training step whatever the caller's mode (a warm start called under no_grad)
def distill(
    drafter: Drafter, examples: list[DistillExample], target: TargetParts, *, steps: int, k: int, loss: str, lr: float, batch_size: int, vocab: int,
    seed: int = 0, max_tokens: int = 0, optimizer: torch.optim.Optimizer | None = None, autocast: bool = True,
) -> DistillStats:
    """Train `drafter` toward `examples`' policy distributions for `steps` AdamW steps (fewer once `max_tokens` positions were seen, if set)."""
    t0 = time.perf_counter()
    if not examples:
        raise ValueError("no distillation examples")
    rng = random.Random(seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    drafter.train()
    device = params[0].device
    target = TargetParts(target.embed.to(device), target.lm_head.to(device))  # the drafter's device
    losses, seen = [], 0
    for step in range(steps):
        batch = collate(rng.sample(examples, min(batch_size, len(examples))), vocab, device)
        value, count = _batch_loss(drafter, batch, target, k, loss, autocast)
        if value is None:
            continue
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
