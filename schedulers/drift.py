"""`drift`: refresh when the serving drafter's teacher-forced acceptance against the *current*
policy (measured on recent rollouts, without generating) has degraded by more than a threshold
relative to its value right after the last refresh (`baseline = "first"`) or to the highest value
measured since then (`baseline = "peak"`); optionally also once `max_interval` steps have passed since
the last refresh it asked for (bounded staleness: a drafter whose warm start left training undone
keeps gaining from refreshes while acceptance holds).

Unlike `threshold`, the signal does not depend on k or on what the engine happened to generate:
it is 1 - TV(policy, drafter) (or the greedy-drafting acceptance), so it tracks policy drift directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from codraft.config import ConfigError
from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy


@dataclass(frozen=True)
class DriftConfig:
    signal: Literal["alpha", "tv"] = "alpha"
    """Teacher-forced acceptance to watch: `alpha` (alpha_serving, greedy drafting) or `tv` (1 - tv_serving, probabilistic)."""
    threshold: float = 0.1
    """Refresh when the acceptance has fallen by more than this fraction of its post-refresh value."""
    min_interval: int = 2
    """Fewest steps between two refreshes."""
    baseline: Literal["first", "peak"] = "first"
    """What the fall is measured from: the first acceptance measured after the last refresh (`first`), or the highest since then (`peak`: RL that raises acceptance before a shift raises the floor with it)."""
    max_interval: int = 0
    """Also refresh once this many steps have been served since the last refresh asked for (or since the
    start), whatever the acceptance; 0 = never on time alone."""


@REFRESH_POLICIES.register("drift")
class Drift(RefreshPolicy):
    description = "Refresh when the serving drafter's teacher-forced acceptance vs the current policy degrades past a threshold."
    Config = DriftConfig

    def __init__(self, config: DriftConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        if not 0 < self.config.threshold < 1:
            raise ConfigError(f"config key 'controller.args.threshold' must be in (0, 1), got {self.config.threshold!r}")
        if self.config.min_interval < 1:
            raise ConfigError(f"config key 'controller.args.min_interval' must be >= 1, got {self.config.min_interval!r}")
        if self.config.max_interval and self.config.max_interval < self.config.min_interval:
            raise ConfigError(f"config key 'controller.args.max_interval' must be 0 or >= min_interval "
                              f"({self.config.min_interval}), got {self.config.max_interval!r}")
        self.baseline: float | None = None
        """Acceptance first (or, with `baseline = "peak"`, at most) measured since the serving drafter was installed."""
        self.current: float | None = None
        """The latest measurement."""
        self.last_refresh: int | None = None
        """Step of the last refresh decision."""

    def _acceptance(self, obs: Observation) -> float:
        return obs.alpha_serving if self.config.signal == "alpha" else 1.0 - obs.tv_serving

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.steps_since_refresh == 0:
            self.baseline = self.current = None
        value = self._acceptance(obs)
        if math.isnan(value):
            return
        self.current = value
        if self.baseline is None or (self.config.baseline == "peak" and value > self.baseline):
            self.baseline = value

    def decide(self) -> Decision:
        step = self.history[-1].step
        served = step - self.last_refresh if self.last_refresh is not None else step + 1
        if self.config.max_interval and served >= self.config.max_interval:
            self.last_refresh = step
            return Decision(True, f"{served} steps since the last refresh (max_interval {self.config.max_interval})")
        if self.baseline is None or self.current is None:
            return Decision(False, f"{self.config.signal} not measured since the last refresh")
        floor = (1 - self.config.threshold) * self.baseline
        if self.current >= floor:
            return Decision(False, f"{self.config.signal} {self.current:.3f} >= {floor:.3f} (baseline {self.baseline:.3f})")
        if self.last_refresh is not None and step - self.last_refresh < self.config.min_interval:
            return Decision(False, f"{self.config.signal} {self.current:.3f} < {floor:.3f}, but within min_interval")
        self.last_refresh = step
        return Decision(True, f"{self.config.signal} {self.current:.3f} drifted below {floor:.3f} (baseline {self.baseline:.3f})")

    def min_interval(self) -> int:
        return self.config.min_interval

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": self.baseline, "current": self.current, "last_refresh": self.last_refresh}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline, self.current, self.last_refresh = state["baseline"], state["current"], state["last_refresh"]
