"""`every_n`: refresh on a fixed schedule, every n steps (n = 1 is NeMo-RL's and slime's
every-step refresh; larger n is TLT/FastRL-style periodic refresh)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from codraft.config import ConfigError
from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy


@dataclass(frozen=True)
class EveryNConfig:
    n: int = 1
    """Refresh every n steps (after steps n, 2n, ...; 1 = every step)."""


@REFRESH_POLICIES.register("every_n")
class EveryN(RefreshPolicy):
    description = "Refresh every n steps whatever the acceptance (n = 1: every step, as NeMo-RL and slime)."
    Config = EveryNConfig

    def __init__(self, config: EveryNConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        if self.config.n < 1:
            raise ConfigError(f"config key 'controller.args.n' must be >= 1, got {self.config.n}")
        self.steps_waited = 0
        """Steps observed since the last refresh decision (or the start)."""

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        self.steps_waited += 1

    def decide(self) -> Decision:
        if self.steps_waited < self.config.n:
            return Decision(False, f"{self.steps_waited} of {self.config.n} steps since the last refresh")
        self.steps_waited = 0
        return Decision(True, f"scheduled refresh (every {self.config.n} steps)")

    def min_interval(self) -> int:
        return self.config.n

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_waited": self.steps_waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_waited = state["steps_waited"]
