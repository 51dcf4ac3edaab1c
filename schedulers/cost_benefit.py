"""`cost_benefit`: refresh when the generation time a fresh drafter would save over the next
`horizon` steps exceeds what a refresh costs (distill + swap seconds, as last measured) times a margin.

Saving per step, in order of preference:
1. the cost model's prediction for this step's rollouts: predicted_gen_s_now - predicted_gen_s_fresh;
2. otherwise from acceptance levels: generation time scales with verify steps, i.e. with
   1 / tokens per verify, so saving = gen_s x (1 - E_now / E_fresh), where E is
   tokens_per_verify(alpha_serving, k) (or the measured acceptance length when alpha_serving is not
   measured) and E_fresh is its value right after the last refresh.
The saving is averaged over steps (EMA) so that one noisy step does not trigger a refresh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from codraft.config import ConfigError
from codraft.costmodel import tokens_per_verify
from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy


@dataclass(frozen=True)
class CostBenefitConfig:
    horizon: int = 10
    """Future steps over which restored acceptance is expected to pay back the refresh."""
    margin: float = 1.0
    """Refresh only when the expected saving exceeds the refresh cost times this factor."""
    prior_refresh_s: float = 10.0
    """Assumed distill + swap seconds until a refresh has been measured."""
    ema: float = 0.5
    """Weight of the newest step in the moving average of the per-step saving (1 = no smoothing)."""
    min_interval: int = 2
    """Fewest steps between two refreshes."""


@REFRESH_POLICIES.register("cost_benefit")
class CostBenefit(RefreshPolicy):
    description = "Refresh when generation seconds saved over a horizon by a fresh drafter exceed the measured refresh cost."
    Config = CostBenefitConfig

    def __init__(self, config: CostBenefitConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        c = self.config
        for key, ok, rule in [("horizon", c.horizon >= 1, ">= 1"), ("margin", c.margin > 0, "> 0"), ("prior_refresh_s", c.prior_refresh_s >= 0, ">= 0"), ("ema", 0 < c.ema <= 1, "in (0, 1]"), ("min_interval", c.min_interval >= 1, ">= 1")]:
            if not ok:
                raise ConfigError(f"config key 'controller.args.{key}' must be {rule}, got {getattr(c, key)!r}")
        self.fresh_alpha: float | None = None
        """alpha_serving first measured after the serving drafter was installed."""
        self.fresh_accept_len: float | None = None
        """Measured acceptance length first seen after the serving drafter was installed."""
        self.saving_s: float | None = None
        """Moving average of the generation seconds per step a fresh drafter would save."""
        self.last_refresh: int | None = None
        """Step of the last refresh decision."""

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.steps_since_refresh == 0:
            self.fresh_alpha = self.fresh_accept_len = self.saving_s = None
        if self.fresh_alpha is None and not math.isnan(obs.alpha_serving):
            self.fresh_alpha = obs.alpha_serving
        if self.fresh_accept_len is None and not math.isnan(obs.accept_len):
            self.fresh_accept_len = obs.accept_len
        saving = self._saving_s(obs)
        if not math.isnan(saving):
            self.saving_s = saving if self.saving_s is None else self.saving_s + self.config.ema * (saving - self.saving_s)

    def _saving_s(self, obs: Observation) -> float:
        """Generation seconds this step would have taken less with a fresh drafter (NaN if unknown)."""
        if not math.isnan(obs.predicted_gen_s_now) and not math.isnan(obs.predicted_gen_s_fresh):
            return max(0.0, obs.predicted_gen_s_now - obs.predicted_gen_s_fresh)
        if self.fresh_alpha is not None and not math.isnan(obs.alpha_serving):
            now, fresh = tokens_per_verify(obs.alpha_serving, obs.k), tokens_per_verify(self.fresh_alpha, obs.k)
        elif self.fresh_accept_len is not None and not math.isnan(obs.accept_len):
            now, fresh = obs.accept_len, self.fresh_accept_len
        else:
            return math.nan
        return obs.gen_s * max(0.0, 1.0 - now / fresh)

    def refresh_cost_s(self) -> float:
        """Seconds one refresh costs: the last measured distill + swap, or the prior before any."""
        last = self.history[-1] if self.history else Observation(step=0)
        if math.isnan(last.last_distill_s):
            return self.config.prior_refresh_s
        return last.last_distill_s + (0.0 if math.isnan(last.last_swap_s) else last.last_swap_s)

    def decide(self) -> Decision:
        step = self.history[-1].step
        if self.saving_s is None:
            return Decision(False, "no saving estimate since the last refresh")
        benefit, cost = self.config.horizon * self.saving_s, self.config.margin * self.refresh_cost_s()
        summary = f"saving {self.saving_s:.3f} s/step x {self.config.horizon} = {benefit:.2f} s vs cost {cost:.2f} s"
        if benefit <= cost:
            return Decision(False, summary)
        if self.last_refresh is not None and step - self.last_refresh < self.config.min_interval:
            return Decision(False, f"{summary}, but within min_interval")
        self.last_refresh = step
        return Decision(True, summary)

    def min_interval(self) -> int:
        return self.config.min_interval

    def state_dict(self) -> dict[str, Any]:
        own = {"fresh_alpha": self.fresh_alpha, "fresh_accept_len": self.fresh_accept_len, "saving_s": self.saving_s, "last_refresh": self.last_refresh}
        return {**super().state_dict(), **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fresh_alpha, self.fresh_accept_len = state["fresh_alpha"], state["fresh_accept_len"]
        self.saving_s, self.last_refresh = state["saving_s"], state["last_refresh"]
