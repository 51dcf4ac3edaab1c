"""`suffix_first`: for the hybrid drafter, lean on suffix drafts while the learned drafter is stale,
and refresh the learned drafter only when the mix can no longer cover for it.

Two signals, each a moving average since the serving drafter was installed: what the learned part
alone would have given (`Observation.learned_alone_accept_len`, scored on every verified row by
the hybrid's mixer) and what the mix gave (`accept_len`). The level is the learned part's first
measurement after a refresh. Refresh when the learned part has fallen `drop` below its level AND
the mix has too (the suffix index does not make up the difference). For a drafter kind without a
learned-alone signal both signals are the measured acceptance length, and the policy is `threshold`
without hysteresis. A refused refresh (`refresh_outcome == "refuse"`) lets it ask again after
`min_interval` steps.
"""
from __future__ import annotations

import math
from typing import Any

from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy
from schedulers.threshold import ThresholdConfig


@REFRESH_POLICIES.register("suffix_first")
class SuffixFirst(RefreshPolicy):
    description = "Hybrid drafter: refresh the learned part only when it is stale AND the suffix index no longer makes up the difference."
    Config = ThresholdConfig  # drop, ema, min_interval: as `threshold`, `drop` applied to both signals

    def __init__(self, config: ThresholdConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        self.config.validate()
        self.level: float | None = None
        self.learned: float | None = None
        self.mixed: float | None = None
        self.last_refresh: int | None = None

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.steps_since_refresh == 0:
            self.level = self.learned = self.mixed = None
        alone = obs.learned_alone_accept_len if not math.isnan(obs.learned_alone_accept_len) else obs.accept_len
        if math.isnan(alone) or math.isnan(obs.accept_len):
            return
        if self.level is None:
            self.level, self.learned, self.mixed = alone, alone, obs.accept_len
            return
        w = self.config.ema
        self.learned += w * (alone - self.learned)
        self.mixed += w * (obs.accept_len - self.mixed)

    def decide(self) -> Decision:
        step = self.history[-1].step
        if self.level is None:
            return Decision(False, "no acceptance measured since the last refresh")
        floor = (1 - self.config.drop) * self.level
        if self.learned >= floor:
            return Decision(False, f"learned part alone {self.learned:.3f} >= {floor:.3f} ({1 - self.config.drop:.2f} x level {self.level:.3f})")
        if self.mixed >= floor:
            return Decision(False, f"learned part alone {self.learned:.3f} < {floor:.3f}, but the mix covers: {self.mixed:.3f} >= {floor:.3f}")
        if self.last_refresh is not None and step - self.last_refresh < self.config.min_interval:
            return Decision(False, f"learned part and mix below {floor:.3f}, but within min_interval of the last refresh")
        self.last_refresh = step
        return Decision(True, f"learned part alone {self.learned:.3f} and the mix {self.mixed:.3f} both below {floor:.3f} ({1 - self.config.drop:.2f} x level {self.level:.3f})")

    def min_interval(self) -> int:
        return self.config.min_interval

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "level": self.level, "learned": self.learned, "mixed": self.mixed, "last_refresh": self.last_refresh}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.level, self.learned, self.mixed, self.last_refresh = state["level"], state["learned"], state["mixed"], state["last_refresh"]
