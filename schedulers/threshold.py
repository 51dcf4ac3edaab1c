"""`threshold`: refresh when the measured acceptance length, smoothed by an exponential moving
average, falls a set fraction below the level it had right after the last refresh.

The level is the first measurement after each refresh (the fresh drafter against the policy it
was distilled on). Hysteresis: once fired, the trigger stays disarmed until the average recovers
above (1 - drop/2) x level or a refresh re-baselines it, so one dip cannot fire twice. A refresh
the controller refused (`Observation.refresh_outcome == "refuse"`: the candidate failed the gate)
re-arms it, so the policy asks again after `min_interval` steps instead of falling silent.

`DropTrigger` holds that logic for any acceptance signal; `adaptive_k` reuses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from codraft.config import ConfigError
from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy


@dataclass(frozen=True)
class ThresholdConfig:
    drop: float = 0.15
    """Refresh when the averaged acceptance is this fraction below its level right after the last refresh."""
    ema: float = 0.5
    """Weight of the newest step in the moving average (1 = no smoothing)."""
    min_interval: int = 2
    """Fewest steps between two refreshes."""

    def validate(self, prefix: str = "controller.args.") -> None:
        """Range checks; errors name the key."""
        for key, ok, rule in [("drop", 0 < self.drop < 1, "in (0, 1)"), ("ema", 0 < self.ema <= 1, "in (0, 1]"), ("min_interval", self.min_interval >= 1, ">= 1")]:
            if not ok:
                raise ConfigError(f"config key '{prefix}{key}' must be {rule}, got {getattr(self, key)!r}")


class DropTrigger:
    """Fires when the moving average of an acceptance signal drops below (1 - drop) x its post-refresh level."""

    def __init__(self, config: ThresholdConfig):
        self.config = config
        self.ema: float | None = None
        """Moving average of the signal since the serving drafter was installed."""
        self.level: float | None = None
        """The signal's first measurement after the serving drafter was installed."""
        self.armed = True
        """False after firing, until the average recovers or a refresh happens."""
        self.last_fire: int | None = None
        """Step of the last firing."""

    def update(self, value: float, fresh: bool, refused: bool = False) -> None:
        """Feed one step's measurement (NaN = not measured); `fresh` = a new drafter serves since this
        step; `refused` = the refresh asked for last step was refused (the stale drafter still serves)."""
        if fresh:
            self.ema, self.level, self.armed = None, None, True
        if refused:
            self.armed = True
        if math.isnan(value):
            return
        if self.ema is None or self.level is None:
            self.ema = self.level = value
            return
        self.ema += self.config.ema * (value - self.ema)
        if not self.armed and self.ema >= (1 - self.config.drop / 2) * self.level:
            self.armed = True

    def fire(self, step: int) -> tuple[bool, str]:
        """Whether to refresh at `step`, and why."""
        if self.ema is None or self.level is None:
            return False, "no acceptance measured since the last refresh"
        floor = (1 - self.config.drop) * self.level
        if self.ema >= floor:
            return False, f"average {self.ema:.3f} >= {floor:.3f} ({1 - self.config.drop:.2f} x level {self.level:.3f})"
        if not self.armed:
            return False, f"average {self.ema:.3f} still low; disarmed until it recovers or a refresh"
        if self.last_fire is not None and step - self.last_fire < self.config.min_interval:
            return False, f"average {self.ema:.3f} < {floor:.3f}, but within min_interval of the last refresh"
        self.armed, self.last_fire = False, step
        return True, f"average {self.ema:.3f} fell below {floor:.3f} ({1 - self.config.drop:.2f} x level {self.level:.3f})"

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "level": self.level, "armed": self.armed, "last_fire": self.last_fire}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema, self.level, self.armed, self.last_fire = state["ema"], state["level"], state["armed"], state["last_fire"]


@REFRESH_POLICIES.register("threshold")
class Threshold(RefreshPolicy):
    description = "Refresh when the averaged measured acceptance length drops a set fraction below its post-refresh level."
    Config = ThresholdConfig

    def __init__(self, config: ThresholdConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        self.config.validate()
        self.trigger = DropTrigger(self.config)

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        self.trigger.update(obs.accept_len, fresh=obs.steps_since_refresh == 0, refused=obs.refresh_outcome == "refuse")

    def decide(self) -> Decision:
        refresh, reason = self.trigger.fire(self.history[-1].step)
        return Decision(refresh, f"accept_len {reason}")

    def min_interval(self) -> int:
        return self.config.min_interval

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "trigger": self.trigger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.trigger.load_state_dict(state["trigger"])
