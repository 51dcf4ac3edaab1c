"""`adaptive_k`: every step, choose k per running batch size from the cost model and the live
acceptance (the long tail of a rollout batch runs at small batch, where drafting pays; a full batch
is compute-bound, where it does not); refresh the drafter like `threshold`.

Live acceptance is the per-token alpha: alpha_serving when measured, else inverted from the measured
acceptance length and k. Alpha, unlike acceptance length, does not change when k does, so the
refresh trigger (`threshold`'s `DropTrigger`) watches alpha here. The policy keeps its own
`CostModel`, calibrated from each step's completion lengths, generation seconds and the k schedule
it asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from codraft.config import ConfigError
from codraft.costmodel import CostModel, CostModelConfig, alpha_from_accept_len
from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy
from schedulers.threshold import DropTrigger, ThresholdConfig


@dataclass(frozen=True)
class AdaptiveKConfig:
    refresh: ThresholdConfig = field(default_factory=ThresholdConfig)
    """When to refresh: `threshold`'s fields (`controller.args.refresh.<field>`), applied to per-token alpha."""
    ks: tuple[int, ...] = (0, 1, 2, 3)
    """Candidate k values (none above the drafter's `num_speculative_tokens`; 0 = plain decoding)."""
    max_batch: int = 256
    """Largest running batch the schedule covers (the engine's `max_num_seqs`)."""
    keep_measuring: bool = True
    """Draft (smallest k > 0 of `ks`) at running batch 1 even where plain decoding looks cheaper, so
    acceptance stays measured on steps without alpha_serving (otherwise k = 0 everywhere could stick)."""
    calibrate: bool = True
    """Fit the cost model to this run's generation timings (False: keep the priors below)."""
    cost: CostModelConfig = field(default_factory=CostModelConfig)
    """Cost model priors and fit settings (`controller.args.cost.<field>`)."""


@REFRESH_POLICIES.register("adaptive_k")
class AdaptiveK(RefreshPolicy):
    description = "Choose k per running batch size from the cost model each step; refresh like `threshold` on per-token acceptance."
    Config = AdaptiveKConfig

    def __init__(self, config: AdaptiveKConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        c = self.config
        c.refresh.validate(prefix="controller.args.refresh.")
        if not c.ks or min(c.ks) < 0:
            raise ConfigError(f"config key 'controller.args.ks' must be non-empty with every k >= 0, got {c.ks!r}")
        if c.max_batch < 1:
            raise ConfigError(f"config key 'controller.args.max_batch' must be >= 1, got {c.max_batch!r}")
        try:
            self.cost_model = CostModel(c.cost)
        except ValueError as err:
            raise ConfigError(f"config section 'controller.args.cost': {err}") from None
        self.trigger = DropTrigger(c.refresh)
        self.alpha: float | None = None
        """Latest per-token acceptance measured."""
        self.schedule: tuple[tuple[int, int, int], ...] | None = None
        """The k schedule last asked for (None: the engine's own, as reported in Observation.k)."""

    def _alpha(self, obs: Observation) -> float:
        return obs.alpha_serving if not math.isnan(obs.alpha_serving) else alpha_from_accept_len(obs.accept_len, obs.k_effective)

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        alpha = self._alpha(obs)
        self.trigger.update(alpha, fresh=obs.steps_since_refresh == 0, refused=obs.refresh_outcome == "refuse")
        if math.isnan(alpha):
            return
        self.alpha = alpha
        if self.config.calibrate:
            in_force = self.schedule if self.schedule is not None else obs.k
            self.cost_model.observe(obs.completion_lengths, alpha, in_force, obs.gen_s, speculative=obs.drafts > 0)

    def decide(self) -> Decision:
        refresh, reason = self.trigger.fire(self.history[-1].step)
        if self.alpha is None:
            return Decision(refresh, f"alpha {reason}; k schedule unchanged (no acceptance measured)")
        # a refreshed drafter is expected back at the level its predecessor started from
        alpha = self.trigger.level if refresh and self.trigger.level is not None else self.alpha
        self.schedule = self._schedule(alpha)
        ks = ", ".join(f"{lo}-{hi}:{k}" for lo, hi, k in self.schedule)
        return Decision(refresh, f"alpha {reason}; k schedule {ks} for alpha {alpha:.3f}", k_schedule=self.schedule)

    def _schedule(self, alpha: float) -> tuple[tuple[int, int, int], ...]:
        lengths = self.history[-1].completion_lengths or None  # the last batch: is drafting at all worth it?
        schedule = self.cost_model.best_k_schedule(alpha, range(1, self.config.max_batch + 1), self.config.ks, lengths=lengths)
        drafting = [k for k in self.config.ks if k > 0]
        (_, hi, k), rest = schedule[0], schedule[1:]
        if k > 0 or not self.config.keep_measuring or not drafting:
            return schedule
        return ((1, 1, min(drafting)),) + (((2, hi, k),) if hi > 1 else ()) + rest

    def min_interval(self) -> int:
        return self.config.refresh.min_interval

    def state_dict(self) -> dict[str, Any]:
        schedule = None if self.schedule is None else [list(r) for r in self.schedule]
        own = {"trigger": self.trigger.state_dict(), "cost_model": self.cost_model.state_dict(), "alpha": self.alpha, "schedule": schedule}
        return {**super().state_dict(), **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.trigger.load_state_dict(state["trigger"])
        self.cost_model.load_state_dict(state["cost_model"])
        self.alpha = state["alpha"]
        self.schedule = None if state["schedule"] is None else tuple(tuple(r) for r in state["schedule"])
