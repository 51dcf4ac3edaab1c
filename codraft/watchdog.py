"""A watchdog for silent drafter collapse.

Users of several RL frameworks report acceptance falling to about 1.0 after a weight sync because
the engine kept stale or unloaded drafter weights. The controller knows what the serving drafter
should accept: its teacher-forced per-token acceptance against the current policy on the step's
held-out rollouts (greedy drafting, as vLLM's default draft sampling). Each step the watchdog
compares the live per-token acceptance (from the engine's counts) with that prediction:

    ok            live >= ratio x predicted, or nothing to compare
    low           below, for fewer than `patience` steps in a row
    republished   below for `patience` steps: the controller loads the serving drafter's weights
                  into the engine again (and drops the prefix cache)
    drafting_off  still below `patience` steps after republishing: the controller turns drafting
                  off (k = 0 at every batch size) and says so; a later swap turns it back on

`controller.watchdog` is the ratio (0 turns the watchdog off).
"""
from __future__ import annotations

import math
from typing import Any


class Watchdog:
    def __init__(self, ratio: float, patience: int = 2):
        self.ratio, self.patience = ratio, patience
        self.low_steps = 0
        self.republished = False
        self.off = False

    def check(self, live_alpha: float, predicted_alpha: float) -> str:
        """This step's verdict (see the module docstring); the controller acts on "republished" and "drafting_off"."""
        if self.ratio <= 0 or self.off or math.isnan(live_alpha) or math.isnan(predicted_alpha):
            return "off" if self.off else "ok"
        if live_alpha >= self.ratio * predicted_alpha:
            self.low_steps, self.republished = 0, False
            return "ok"
        self.low_steps += 1
        if self.low_steps < self.patience:
            return "low"
        self.low_steps = 0
        if not self.republished:
            self.republished = True
            return "republished"
        self.off = True
        return "drafting_off"

    def reset(self) -> None:
        """A new drafter serves: start afresh (and drafting may resume)."""
        self.low_steps, self.republished, self.off = 0, False, False

    def state_dict(self) -> dict[str, Any]:
        return {"low_steps": self.low_steps, "republished": self.republished, "off": self.off}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.low_steps, self.republished, self.off = state["low_steps"], state["republished"], state["off"]
