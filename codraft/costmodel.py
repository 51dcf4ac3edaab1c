"""Cost model of speculative generation: how long a rollout batch takes to generate, given its
completion lengths, the drafter's per-token acceptance alpha and k (or a k schedule by running
batch size). Pure Python.

One engine step of a running batch of b sequences, each drafting k tokens, costs

    step_s(b, k) = t0 + t1 * b * (k + 1)   +   k * (d0 + d1 * b)   +   [k > 0] (s0 + s1 * b)
                   (target verifies k+1 each)   (k drafter steps)      (drafting at all)

a per-step floor t0 plus target compute per verified token t1, k drafter steps, each with its own
floor d0 and per-sequence cost d1, and what drafting adds to a step whatever k: floor s0 and
per-sequence cost s1 (draft sampling, rejection sampling, speculative bookkeeping). k = 0 is plain
decoding, t0 + t1 * b, with one exception: where a schedule drafts at some batch sizes, its k = 0
steps still run the drafter once over the tokens just emitted (vLLM keeps the drafter's KV cache in
step for when k rises again), d0 + d1 * b more. A schedule that is 0 everywhere turns the drafter
off (`VLLMEngine.set_k_schedule`) and costs what plain decoding costs. A sequence of n tokens
needs about n / E verify steps, E = tokens_per_verify(alpha, k) (Leviathan et al. 2023); the
running batch shrinks as sequences finish, so the long tail of a rollout batch runs at small b.

A batch's predicted seconds are linear in (t0, t1, d0, d1), so the model calibrates online from the
run's own timings: every observed batch adds one row to a non-negative least-squares fit, pulled
gently toward priors (DESIGN.md's compiled 25M-target CPU figures) so it is usable from step one.

    model = CostModel()
    model.predict_gen_s([120, 80, 192], alpha=0.6, k_schedule=((1, 8, 3), (9, 256, 0)))
    model.observe([120, 80, 192], 0.6, 3, gen_seconds=2.9, speculative=True)
    model.best_k_schedule(alpha=0.9, batch_sizes=range(1, 257))   # ((1, 5, 5), (6, 21, 3), (22, 256, 0)) with the priors
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import brentq, nnls

KSchedule = int | tuple[tuple[int, int, int], ...]
"""k for every running batch size (an int), or inclusive (lo, hi, k) ranges; uncovered sizes use k = 0."""


def tokens_per_verify(alpha: float, k: int) -> float:
    """Expected tokens emitted per verify step: (1 - alpha^(k+1)) / (1 - alpha); k + 1 at alpha = 1."""
    if k <= 0:
        return 1.0
    alpha = min(max(alpha, 0.0), 1.0)
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def alpha_from_accept_len(accept_len: float, k: int, strict: bool = False) -> float:
    """The alpha with tokens_per_verify(alpha, k) == accept_len (scipy's brentq); NaN if unknown.

    Outside [1, k + 1] the value is clamped to 0 or 1, or, with `strict`, refused (ValueError)."""
    if math.isnan(accept_len) or k <= 0:
        return math.nan
    if strict and not 1.0 <= accept_len <= k + 1:
        raise ValueError(f"acceptance length {accept_len} is outside [1, k+1 = {k + 1}]")
    if accept_len <= 1.0:
        return 0.0
    if accept_len >= k + 1 - 1e-12:
        return 1.0
    return float(brentq(lambda a: tokens_per_verify(a, k) - accept_len, 0.0, 1.0, xtol=1e-15))


def k_at(k_schedule: KSchedule, b: int) -> int:
    """k drafted at running batch size b."""
    if isinstance(k_schedule, int):
        return k_schedule
    return next((k for lo, hi, k in k_schedule if lo <= b <= hi), 0)


def drafts_anywhere(k_schedule: KSchedule | Iterable[Sequence[int]]) -> bool:
    """Whether the schedule drafts at some batch size (otherwise the engine's drafter is off)."""
    if isinstance(k_schedule, int):
        return k_schedule > 0
    return any(k > 0 for _, _, k in k_schedule)


def parse_k_schedule(text: str, k: int, max_batch: int) -> list[tuple[int, int, int]]:
    """`lo-hi:k,...` -> inclusive ranges; empty or `auto` -> k at every running batch size."""
    if not text or text == "auto":
        return [(1, max_batch, k)]
    ranges = []
    for part in text.split(","):
        try:
            span, kk = part.split(":")
            lo, hi = span.split("-")
            ranges.append((int(lo), int(hi), int(kk)))
        except ValueError:
            raise ValueError(f"drafter.k_schedule: cannot read {part!r}; write ranges like '1-8:3,9-1024:0'") from None
    for lo, hi, kk in ranges:
        if not (1 <= lo <= hi) or not (0 <= kk <= k):
            raise ValueError(f"drafter.k_schedule: range {lo}-{hi}:{kk} needs 1 <= lo <= hi and 0 <= k <= drafter.num_speculative_tokens={k}")
    return ranges


def format_k_schedule(schedule: Iterable[Sequence[int]]) -> str:
    """Inclusive ranges as `lo-hi:k,...` (what `parse_k_schedule` reads)."""
    return ",".join(f"{lo}-{hi}:{k}" for lo, hi, k in schedule)


def batch_profile(lengths: Iterable[int], alpha: float, k_schedule: KSchedule) -> tuple[float, ...]:
    """Generating sequences of `lengths` together: (engine steps, verified tokens, drafter steps,
    drafter sequence-steps, drafting steps, drafting sequence-steps), the coefficients of
    (t0, t1, d0, d1, s0, s1) in the batch's seconds."""
    remaining = sorted(float(n) for n in lengths if n > 0)  # tokens still to emit, per running sequence
    steps = verified = draft_steps = draft_seqs = spec_steps = spec_seqs = 0.0
    drafter_on = drafts_anywhere(k_schedule)
    while remaining:
        b = len(remaining)
        k = k_at(k_schedule, b)
        per_step = tokens_per_verify(alpha, k)
        n = max(1, math.ceil(remaining[0] / per_step - 1e-9))  # steps until the shortest one finishes
        forwards = max(k, 1) if drafter_on else 0  # at k = 0 a drafting engine still runs the drafter once
        steps += n
        verified += n * b * (k + 1)
        draft_steps += n * forwards
        draft_seqs += n * forwards * b
        if k > 0:
            spec_steps += n
            spec_seqs += n * b
        remaining = [r - n * per_step for r in remaining if r - n * per_step > 1e-9]
    return steps, verified, draft_steps, draft_seqs, spec_steps, spec_seqs


@dataclass(frozen=True)
class StepCosts:
    """The model's parameters, seconds."""

    t0: float
    """Target: floor of one engine step, whatever the batch."""
    t1: float
    """Target: compute per verified token (b * (k + 1) of them per step)."""
    d0: float
    """Drafter: floor of one drafting step (k of them per speculative engine step)."""
    d1: float
    """Drafter: compute per sequence per drafting step."""
    s0: float = 0.0
    """Drafting at all (k > 0): floor added to a step, whatever k."""
    s1: float = 0.0
    """Drafting at all (k > 0): cost added per sequence per step, whatever k."""

    def step_s(self, b: int, k: int) -> float:
        """Seconds of one engine step of b sequences drafting k tokens each."""
        return self.t0 + self.t1 * b * (k + 1) + k * (self.d0 + self.d1 * b) + (self.s0 + self.s1 * b if k > 0 else 0.0)


@dataclass(frozen=True)
class CostModelConfig:
    t0: float = 5e-3
    """Prior target step floor, seconds (25M target, compiled, CPU: ~5 ms)."""
    t1: float = 2e-4
    """Prior target compute per verified token, seconds (CPU: ~0.18 ms per sequence at batch 64)."""
    d0: float = 2e-3
    """Prior drafter step floor, seconds (~0.4 of the target's)."""
    d1: float = 2e-5
    """Prior drafter compute per sequence per drafting step, seconds."""
    s0: float = 2e-3
    """Prior floor drafting adds to a step whatever k, seconds (testbed, CPU: 2-6 ms)."""
    s1: float = 2e-5
    """Prior cost drafting adds per sequence per step whatever k, seconds."""
    prior_weight: float = 1e-3
    """Seconds of fit error that one parameter off by 100% of its prior weighs as (> 0; small = trust data)."""
    window: int = 64
    """Fit on the most recent this many observed batches (older timings age out)."""


class CostModel:
    """Predicts rollout generation seconds and the best k; calibrates itself from observed batches."""

    def __init__(self, config: CostModelConfig | None = None):
        self.config = config or CostModelConfig()
        c = self.config
        if min(c.t0, c.t1, c.d0, c.d1, c.s0, c.s1, c.prior_weight) <= 0 or c.window < 1:
            raise ValueError(f"cost model priors and prior_weight must be > 0 and window >= 1, got {c}")
        self.prior = StepCosts(c.t0, c.t1, c.d0, c.d1, c.s0, c.s1)
        self.costs = self.prior
        self.records: list[tuple[float, ...]] = []
        """Per observed batch: its profile (see `batch_profile`) and the measured seconds."""

    def step_s(self, b: int, k: int) -> float:
        return self.costs.step_s(b, k)

    def predict_gen_s(self, lengths: Sequence[int], alpha: float, k_schedule: KSchedule) -> float:
        """Seconds to generate sequences of `lengths` at acceptance alpha under `k_schedule`."""
        return sum(p * c for p, c in zip(batch_profile(lengths, alpha, k_schedule), astuple(self.costs)))

    def observe(self, lengths: Sequence[int], alpha: float, k_schedule: KSchedule, gen_seconds: float, speculative: bool) -> None:
        """Record one generated batch (plain decoding when not `speculative`) and refit the parameters."""
        if not any(n > 0 for n in lengths) or not gen_seconds > 0:
            return
        profile = batch_profile(lengths, alpha, k_schedule) if speculative else batch_profile(lengths, 0.0, 0)
        self.records = (self.records + [(*profile, float(gen_seconds))])[-self.config.window :]
        self.costs = self._fit()

    def _fit(self) -> StepCosts:
        """Minimise sum (profile . theta - seconds)^2 + w^2 * sum (theta_j / prior_j - 1)^2 over theta >= 0:
        non-negative least squares (scipy) in units of the priors (u_j = theta_j / prior_j), the prior
        pull as w-weighted rows u_j = 1 under the data rows."""
        prior = np.array(astuple(self.prior))
        w = self.config.prior_weight
        data = np.array([r[: len(prior)] for r in self.records], dtype=float).reshape(-1, len(prior)) * prior  # seconds per unit of u
        seconds = np.array([r[len(prior)] for r in self.records], dtype=float)
        u, _ = nnls(np.vstack([data, w * np.eye(len(prior))]), np.concatenate([seconds, np.full(len(prior), w)]))
        return StepCosts(*(float(x) for x in u * prior))

    def time_per_token(self, alpha: float, k: int, b: int) -> float:
        """Seconds per emitted token at running batch size b."""
        return self.step_s(b, k) / (b * tokens_per_verify(alpha, k))

    def speedup(self, alpha: float, k: int, b: int) -> float:
        """Throughput of drafting k tokens over plain decoding, at running batch size b."""
        return self.time_per_token(alpha, 0, b) / self.time_per_token(alpha, k, b)

    def best_k(self, alpha: float, b: int, ks: Sequence[int] = (0, 1, 2, 3, 5)) -> int:
        """The k of `ks` with the least time per emitted token at batch size b (smaller k on ties)."""
        return min(ks, key=lambda k: (self.time_per_token(alpha, k, b), k))

    def _drafting_engine_time_per_token(self, alpha: float, k: int, b: int) -> float:
        """Seconds per emitted token at batch size b on an engine whose drafter is on."""
        rerun = 0.0 if k else self.costs.d0 + self.costs.d1 * b
        return (self.step_s(b, k) + rerun) / (b * tokens_per_verify(alpha, k))

    def best_k_schedule(
        self, alpha: float, batch_sizes: Iterable[int], ks: Sequence[int] = (0, 1, 2, 3, 5), lengths: Sequence[int] | None = None
    ) -> tuple[tuple[int, int, int], ...]:
        """Inclusive (lo, hi, k) ranges covering 1..max(batch_sizes): each evaluated size b sets k for
        the sizes above the previous one up to b (pass `range(1, max_num_seqs + 1)` to evaluate all).

        Each size gets the k with the least time per token, counting, at k = 0, the drafter pass a
        drafting engine still runs. Given a batch's completion `lengths`, the schedule that drafts
        somewhere is kept only if it predicts that batch faster than never drafting (drafter off)."""
        sizes = sorted(set(batch_sizes))
        ranges: list[tuple[int, int, int]] = []
        lo = 1
        for b in sizes:
            k = min(ks, key=lambda k: (self._drafting_engine_time_per_token(alpha, k, b), k))
            if ranges and ranges[-1][2] == k:
                ranges[-1] = (ranges[-1][0], b, k)
            else:
                ranges.append((lo, b, k))
            lo = b + 1
        schedule, never = tuple(ranges), ((1, sizes[-1], 0),) if sizes else ()
        if lengths and drafts_anywhere(schedule) and self.predict_gen_s(lengths, alpha, schedule) >= self.predict_gen_s(lengths, alpha, never):
            return never
        return schedule

    def state_dict(self) -> dict[str, Any]:
        return {"costs": list(astuple(self.costs)), "records": [list(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["costs"]) == 4:  # saved before the drafting terms s0, s1 existed: keep the
            self.costs = StepCosts(*state["costs"], self.prior.s0, self.prior.s1)  # fit, not its rows
            self.records = []
            return
        self.costs = StepCosts(*state["costs"])
        self.records = [tuple(r) for r in state["records"]]
