"""`never`: the warm-started drafter serves the whole run (the frozen-drafter baseline)."""
from __future__ import annotations

from dataclasses import dataclass

from codraft.refresh import REFRESH_POLICIES, Decision, RefreshPolicy


@dataclass(frozen=True)
class NeverConfig:
    """No settings: the drafter is never refreshed."""


@REFRESH_POLICIES.register("never")
class Never(RefreshPolicy):
    description = "Never refresh: the warm-started drafter serves the whole run (frozen-drafter baseline)."
    Config = NeverConfig

    def decide(self) -> Decision:
        return Decision(False, "never refreshes")
