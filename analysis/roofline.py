"""A roofline model of one synchronous GRPO step with speculative rollouts: devices, models, stages.

Generation is simulated engine step by engine step over a shrinking running batch. Each step costs
the larger of its HBM traffic (weights + KV cache) over bandwidth and its FLOPs over peak compute,
plus a fixed per-step overhead. With speculation, an engine step is one verify of k+1 tokens per
sequence plus k steps of the drafter. It advances every sequence by the mean acceptance length
(1 - alpha^(k+1)) / (1 - alpha). Logprob and train are compute-bound (FLOPs over peak x MFU).

`analysis/projection.py` calibrates this model on published figures and projects with it.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr
from scipy.stats import lognorm

from codraft.costmodel import alpha_from_accept_len, tokens_per_verify

from analysis.catalog import DEVICES, DRAFT_VOCAB, MODELS, Device, ModelSpec  # noqa: F401  (re-exported: the catalog used to live here)

# ----------------------------------------------------------------------------------------------
# Speculation: the closed form for tokens per verify
# ----------------------------------------------------------------------------------------------


def alpha_for_accept_len(accept_len: float, k: int) -> float:
    """Per-token acceptance that gives mean acceptance length `accept_len` at `k` (refuses lengths outside [1, k + 1])."""
    return alpha_from_accept_len(accept_len, k, strict=True)


@dataclass(frozen=True)
class Speculation:
    k: int = 3
    """Drafted tokens per verify step."""
    alpha: float = 0.5602
    """Per-token acceptance probability (0.5602 gives acceptance length 2.05 at k = 3)."""

    @property
    def accept_len(self) -> float:
        return tokens_per_verify(self.alpha, self.k)


# ----------------------------------------------------------------------------------------------
# Roofline cost of one forward step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Efficiency:
    hbm: float = 0.8
    """Fraction of peak HBM bandwidth decode/verify/draft steps achieve (prior, not fitted)."""
    decode_compute: float = 0.6
    """Fraction of peak FLOPs the decode/verify GEMMs achieve when compute-bound (prior, not fitted)."""
    mfu: float = 0.4
    """Model FLOPs utilisation of prefill, logprob and train (fitted on the 8B no-speculation step time)."""
    step_overhead_s: float = 1.5e-3
    """Fixed cost per target engine step: scheduling, sampling, launches (prior, not fitted)."""
    draft_overhead_s: float = 0.3e-3
    """Fixed cost per drafter step (prior, not fitted)."""
    tp_comm: float = 0.1
    """Slowdown of a forward sharded over tp > 1 GPUs (all-reduce / all-to-all), as a fraction."""


@dataclass(frozen=True)
class StepCost:
    mem_s: np.ndarray
    """Seconds to stream the step's bytes from HBM."""
    compute_s: np.ndarray
    """Seconds for the step's FLOPs."""
    seconds: np.ndarray
    """max(mem_s, compute_s), with the tensor-parallel communication factor (no fixed overhead)."""


def forward_step(model: ModelSpec, device: Device, eff: Efficiency, batch, context, tokens_per_seq: int = 1,
                 tp: int = 1) -> StepCost:
    """One forward of `model` over `batch` sequences, each adding `tokens_per_seq` tokens, that
    together hold `context` cached tokens. Weights are read once; the KV cache is read once
    however many query tokens attend to it; FLOPs scale with batch x tokens_per_seq."""
    batch, context = np.asarray(batch, dtype=float), np.asarray(context, dtype=float)
    tokens = batch * tokens_per_seq
    hbm_bytes = model.weight_bytes_read(tokens) + context * model.kv_bytes_per_token
    attn_flops = 4.0 * model.layers * model.q_heads * model.head_dim * context * tokens_per_seq
    flops = 2.0 * model.active_params_b * 1e9 * tokens + attn_flops
    mem_s = hbm_bytes / (tp * device.hbm_tb_s * 1e12 * eff.hbm)
    compute_s = flops / (tp * device.bf16_tflops * 1e12 * eff.decode_compute)
    comm = 1.0 + (eff.tp_comm if tp > 1 else 0.0)
    return StepCost(mem_s, compute_s, np.maximum(mem_s, compute_s) * comm)


# ----------------------------------------------------------------------------------------------
# Rollout: completion lengths and the running batch of one engine
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutShape:
    prompts: int = 512
    """Prompts per GRPO step."""
    group_size: int = 16
    """Completions sampled per prompt."""
    prompt_len: int = 200
    """Prompt tokens (same for every prompt)."""
    mean_response: float = 3000.0
    """Mean completion tokens, after truncation at max_response."""
    max_response: int = 16384
    """Completion cap; the lognormal tail above it is truncated there."""
    sigma: float = 1.0
    """Lognormal shape of completion lengths (larger = longer tail)."""

    @property
    def completions(self) -> int:
        return self.prompts * self.group_size


@dataclass(frozen=True)
class Deployment:
    device: str = "gb200"
    """Key into DEVICES."""
    gpus: int = 32
    """GPUs of the job; synchronous and colocated: all of them generate, then all of them train."""
    tp: int = 1
    """GPUs per rollout engine (tensor / expert parallel); gpus // tp engines run data-parallel."""
    max_num_seqs: int = 1024
    """vLLM's cap on an engine's running batch."""
    kv_memory_fraction: float = 0.8
    """Fraction of HBM the engine may use for weights + KV cache (vLLM's gpu_memory_utilization)."""

    @property
    def engines(self) -> int:
        return max(1, self.gpus // self.tp)


def _clipped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma)."""
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * ndtr(z - sigma) + cap * (1.0 - ndtr(z))


def completion_lengths(shape: RolloutShape) -> np.ndarray:
    """Every completion's length, sorted: evenly spaced quantiles of a lognormal whose mean after
    truncation at max_response is mean_response (deterministic, so projections are reproducible)."""
    if not 0 < shape.mean_response < shape.max_response:
        raise ValueError("mean_response must lie in (0, max_response)")
    mu = brentq(lambda m: _clipped_lognormal_mean(m, shape.sigma, shape.max_response) - shape.mean_response,
                -20.0, math.log(shape.max_response) + 10.0)
    q = (np.arange(shape.completions) + 0.5) / shape.completions
    lengths = lognorm.ppf(q, s=shape.sigma, scale=math.exp(mu))
    return np.clip(np.round(lengths), 1, shape.max_response)


def running_profile(lengths: np.ndarray, prompt_len: int, tokens_per_step: float, max_running: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Running batch and total cached context of one engine at each of its steps.

    Every running sequence gains `tokens_per_step` tokens per step (1 without speculation, the
    mean acceptance length with it). At most `max_running` run at once; the rest queue in a fixed
    random order and start when a slot frees (continuous batching).
    Returns (batch [S], context [S]).
    """
    steps = np.ceil(lengths / tokens_per_step).astype(np.int64)           # [n] steps each sequence runs
    order = np.random.default_rng(seed).permutation(len(steps)) if len(steps) > max_running else np.arange(len(steps))
    start = np.zeros(len(steps), dtype=np.int64)
    free = [0] * min(max_running, len(steps))                             # step at which each slot frees
    for i in order:
        start[i] = heapq.heappop(free)
        heapq.heappush(free, start[i] + steps[i])
    end = start + steps
    total = int(end.max())
    batch_diff = np.zeros(total + 1)
    base_diff = np.zeros(total + 1)                                       # prompt - start * tokens_per_step
    np.add.at(batch_diff, start, 1.0)
    np.add.at(batch_diff, end, -1.0)
    base = prompt_len - start * tokens_per_step
    np.add.at(base_diff, start, base)
    np.add.at(base_diff, end, -base)
    batch = np.cumsum(batch_diff)[:total]                                 # [S]
    context = np.cumsum(base_diff)[:total] + tokens_per_step * np.arange(total) * batch  # [S]
    return batch, context


# ----------------------------------------------------------------------------------------------
# Stage times of one synchronous GRPO step
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    model: str = "qwen3-8b"
    """Key into MODELS."""
    shape: RolloutShape = RolloutShape()
    """Prompts, group size and completion lengths of a step."""
    deploy: Deployment = Deployment()
    """Device, GPU count and engine layout."""
    prefix_caching: bool = True
    """A prompt is prefilled once for its whole group."""
    reference_logprob: bool = False
    """Also compute reference-policy logprobs (a KL penalty); RL-Zero/DAPO-style runs have none."""
    drafter_train_fraction: float = 0.0
    """Drafter distillation per step, as a fraction of the step's tokens (0 = frozen drafter,
    1 = distilled on every rollout every step, as NeMo-RL's online mode)."""
    optimizer_bytes_per_param: float = 32.0
    """HBM bytes an Adam step moves per parameter (bf16 weights and grads, fp32 master and moments)."""


@dataclass(frozen=True)
class StageTimes:
    gen_s: float
    """Rollout generation: prefill plus decode (or verify + draft) steps of the slowest engine."""
    logprob_s: float
    """Policy (and reference) log-probs over prompt + completion tokens."""
    train_s: float
    """Forward + backward (3 forwards) and the optimizer step, drafter distillation if any."""
    other_s: float
    """Everything else (data loading, weight refit, reward): a fixed prior."""

    @property
    def step_s(self) -> float:
        return self.gen_s + self.logprob_s + self.train_s + self.other_s

    def share(self, stage: str) -> float:
        return getattr(self, f"{stage}_s") / self.step_s


def kv_capacity_seqs(work: Workload, model: ModelSpec, drafter: ModelSpec | None) -> int:
    """Sequences an engine can hold in its KV cache at the mean context (prompt + mean response)."""
    d, dev = work.deploy, DEVICES[work.deploy.device]
    weights = (model.params_b + (drafter.params_b if drafter else 0.0)) * 1e9 * model.bytes_per_param
    free = d.tp * dev.memory_gb * 1e9 * d.kv_memory_fraction - weights
    per_seq = (work.shape.prompt_len + work.shape.mean_response) * (
        model.kv_bytes_per_token + (drafter.kv_bytes_per_token if drafter else 0.0))
    if free <= 0:
        raise ValueError(f"{model.name} does not fit in {d.tp} x {dev.name}: raise --tp")
    return int(free // per_seq)


def generation_seconds(work: Workload, eff: Efficiency, spec: Speculation | None) -> float:
    """Wall-clock of the gen stage: prefill plus the decode steps of the slowest engine.

    Completions are dealt to the E engines in sorted order, so every engine sees the same mix;
    the engine dealt the longest completion, then the E-th longest, and so on, finishes last and
    sets the stage time.
    """
    model, dev, d = MODELS[work.model], DEVICES[work.deploy.device], work.deploy
    drafter = model.drafter() if spec else None
    lengths = completion_lengths(work.shape)
    slowest = lengths[::-1][:: d.engines]
    max_running = max(1, min(d.max_num_seqs, kv_capacity_seqs(work, model, drafter)))
    tokens_per_step = spec.accept_len if spec else 1.0
    batch, context = running_profile(slowest, work.shape.prompt_len, tokens_per_step, max_running)
    live = batch > 0
    batch, context = batch[live], context[live]
    k = spec.k if spec else 0
    step = forward_step(model, dev, eff, batch, context, k + 1, d.tp).seconds + eff.step_overhead_s
    if spec:
        # k chained drafter steps, one token per sequence each; the head keeps a one-layer KV cache
        draft = forward_step(drafter, dev, eff, batch, context, 1, d.tp).seconds + eff.draft_overhead_s
        step = step + spec.k * draft
    return float(step.sum()) + prefill_seconds(work, eff)


def _forward_flops(model: ModelSpec, seq_lens: np.ndarray) -> float:
    """FLOPs of one forward over full sequences: 2 x active params per token + causal attention."""
    dense = 2.0 * model.active_params_b * 1e9 * seq_lens.sum()
    attn = 2.0 * model.layers * model.q_heads * model.head_dim * (seq_lens.astype(float) ** 2).sum()
    return float(dense + attn)


def _compute_seconds(flops: float, work: Workload, eff: Efficiency) -> float:
    return flops / (work.deploy.gpus * DEVICES[work.deploy.device].bf16_tflops * 1e12 * eff.mfu)


def prefill_seconds(work: Workload, eff: Efficiency) -> float:
    n = work.shape.prompts if work.prefix_caching else work.shape.completions
    return _compute_seconds(_forward_flops(MODELS[work.model], np.full(n, work.shape.prompt_len)), work, eff)


def training_stage_flops(work: Workload, with_drafter: bool) -> tuple[float, float]:
    """(logprob FLOPs, train FLOPs) of a step; train = forward + backward = 3 forwards."""
    model = MODELS[work.model]
    seqs = completion_lengths(work.shape) + work.shape.prompt_len
    forward = _forward_flops(model, seqs)
    logprob = forward * (2 if work.reference_logprob else 1)
    train = 3.0 * forward
    if with_drafter and work.drafter_train_fraction > 0:
        train += 3.0 * _forward_flops(model.drafter(), seqs) * work.drafter_train_fraction
    return logprob, train


def optimizer_seconds(work: Workload, eff: Efficiency) -> float:
    dev = DEVICES[work.deploy.device]
    moved = MODELS[work.model].params_b * 1e9 * work.optimizer_bytes_per_param
    return moved / (work.deploy.gpus * dev.hbm_tb_s * 1e12 * eff.hbm)


def stage_times(work: Workload, eff: Efficiency, spec: Speculation | None, other_s: float) -> StageTimes:
    """One synchronous step: gen, then logprob, then train (+ optimizer), then fixed `other_s`."""
    logprob, train = training_stage_flops(work, with_drafter=spec is not None)
    return StageTimes(
        gen_s=generation_seconds(work, eff, spec),
        logprob_s=_compute_seconds(logprob, work, eff),
        train_s=_compute_seconds(train, work, eff) + optimizer_seconds(work, eff),
        other_s=other_s,
    )
