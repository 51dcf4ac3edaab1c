"""The refresh-policy interface: after every GRPO step the controller hands the policy an
`Observation`; the policy answers with a `Decision` (keep the drafter, or distil and swap it, and
optionally a new k schedule). Policies are plain Python (no torch, no vLLM), one file each under
`schedulers/`, registered by name:

    @REFRESH_POLICIES.register("every_n")
    class EveryN(RefreshPolicy):
        @dataclass(frozen=True)
        class Config:
            n: int = 1
            '''Refresh every n steps.'''

        def decide(self) -> Decision: ...

    policy = make_refresh_policy("every_n", {"n": 2})
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from codraft.plugins import describe_plugins, plugin_settings
from codraft.registry import Registry


@dataclass(frozen=True)
class Observation:
    """What one GRPO step tells the refresh policy. Counts are raw; rates are derived here."""

    step: int
    drafts: int = 0
    """Verify steps that carried drafted tokens during this step's generation."""
    draft_tokens: int = 0
    """Drafted tokens proposed."""
    accepted: int = 0
    """Drafted tokens accepted."""
    k: int = 0
    """Tokens drafted per verify step (the largest k of the schedule in force)."""
    alpha_serving: float = math.nan
    """Teacher-forced per-token acceptance (greedy drafting, averaged over draft steps) of the serving
    drafter against the *current* policy on recent rollouts; NaN when not measured this step."""
    accept_len_serving: float = math.nan
    """The same measurement expressed as expected tokens per verify step."""
    tv_serving: float = math.nan
    """Mean total-variation distance between the serving drafter's and the policy's next-token
    distributions on recent rollouts (1 - probabilistic acceptance); NaN when not measured."""
    gen_s: float = 0.0
    """Seconds spent generating rollouts this step."""
    gen_tokens: int = 0
    """Tokens generated this step."""
    step_s: float = 0.0
    """Seconds of the whole step."""
    last_distill_s: float = math.nan
    """Seconds the most recent refresh spent distilling (NaN before the first refresh)."""
    last_swap_s: float = math.nan
    """Seconds the most recent refresh spent swapping the drafter into the engine."""
    steps_since_refresh: int = 0
    """Steps since the serving drafter was installed (0 = installed at the end of the last step)."""
    predicted_gen_s_fresh: float = math.nan
    """Cost model: generation seconds of this step's rollouts with a freshly distilled drafter."""
    predicted_gen_s_now: float = math.nan
    """Cost model: generation seconds of this step's rollouts with the serving drafter."""
    completion_lengths: tuple[int, ...] = ()
    """Length of every completion generated this step (the running-batch profile follows from it)."""
    learned_alone_accept_len: float = math.nan
    """Hybrid drafter: tokens per verify step its learned part alone would have given, scored on every
    verified row (drafters/hybrid.py); NaN for other kinds."""
    suffix_alone_accept_len: float = math.nan
    """Hybrid drafter: the same for its suffix index alone; NaN for other kinds."""
    suffix_share: float = math.nan
    """Hybrid drafter: share of the drafted rows the suffix index drafted; NaN for other kinds."""
    refresh_outcome: str = ""
    """What became of the refresh this policy asked for at the previous step: "swap" (the new
    drafter serves), "refuse" (the candidate failed the gate or its distillation failed; the old
    drafter still serves), or "" (no refresh was asked for)."""

    @property
    def accept_len(self) -> float:
        """Measured mean tokens per verify step (1 + accepted / drafts); NaN without drafts."""
        return 1.0 + self.accepted / self.drafts if self.drafts else math.nan

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.draft_tokens if self.draft_tokens else math.nan

    @property
    def k_effective(self) -> float:
        """Mean drafted tokens per verify step (under a k schedule, drafts differ in k); NaN without drafts."""
        return self.draft_tokens / self.drafts if self.drafts else math.nan


@dataclass(frozen=True)
class Decision:
    refresh: bool
    reason: str
    budget_steps: int | None = None
    """Distillation steps for this refresh (None = the controller's default budget)."""
    k_schedule: tuple[tuple[int, int, int], ...] | None = None
    """New k per running batch size as inclusive (lo, hi, k) ranges; None keeps the current one."""


class RefreshPolicy:
    """Decides when to refresh the drafter. Subclasses define `Config` (a frozen dataclass) and `decide`."""

    name: ClassVar[str] = "policy"
    description: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None, seed: int = 0):
        self.config = config if config is not None else self.Config()
        self.seed = seed
        self.history: list[Observation] = []

    def observe(self, obs: Observation) -> None:
        """Record one step's observation (called once per step, before `decide`)."""
        self.history.append(obs)

    def decide(self) -> Decision:
        raise NotImplementedError

    def min_interval(self) -> int:
        """The fewest steps between two refreshes this policy's config allows (1 = every step)."""
        return 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the policy exactly (plain JSON types)."""
        return {"history": [dataclasses.asdict(o) for o in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [Observation(**{**o, "completion_lengths": tuple(o.get("completion_lengths", ()))}) for o in state.get("history", [])]


REFRESH_POLICIES: Registry[RefreshPolicy] = Registry("refresh policy", plugin_package="schedulers")


def make_refresh_policy(name: str, args: dict[str, Any] | None = None, seed: int = 0) -> RefreshPolicy:
    """Build a registered policy, validating `args` against its Config (errors name the key)."""
    cls, config = plugin_settings(REFRESH_POLICIES, name, args, "controller.args.")
    return cls(config, seed=seed)


@dataclass
class RefreshLog:
    """Refreshes and swaps carried out, for summaries."""

    refreshes: int = 0
    refused: int = 0
    distill_s: float = 0.0
    swap_s: float = 0.0
    decisions: list[str] = field(default_factory=list)


def describe_policies() -> str:
    """Every registered refresh policy: name, one-line description, config fields with type, default and help."""
    return describe_plugins(REFRESH_POLICIES, "codraft run --set controller.policy=<name> --set controller.args.<field>=<value>")
