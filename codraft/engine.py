"""The rollout engine interface: sample completions, take new policy weights in place.

    from codraft.engines import make_engine                     # backends are chosen by name there
    engine = make_engine(cfg, policy_dir)                       # built once per run
    engine.load_policy_weights(model.state_dict().items())       # each step, no restart
    gen = engine.generate(prompt_ids, n=8, sampling=Sampling(temperature=1.0, max_new_tokens=128), seed=step)
    gen.completions[i * 8 + j]                                   # sample j of prompt i
    gen.acceptance                                               # AcceptanceStats, when speculating
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from codraft.acceptance import AcceptanceStats


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]  # the engine's log-prob of each sampled token (after temperature / top-p)
    finished: bool  # stopped by itself (eos), not cut at max_new_tokens


@dataclass
class Generation:
    completions: list[Completion]  # prompt-major: prompt i's j-th sample sits at i * n + j
    acceptance: AcceptanceStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


def request_seeds(seed: int, count: int) -> list[int]:
    """Distinct per-request sampling seeds derived from one seed (reproducible across runs)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31 - 1, (count,), generator=gen).tolist()


class RolloutEngine(abc.ABC):
    """Generates rollouts for a policy whose weights change every step. A backend registers itself
    in `codraft.engines.ENGINES` under the name `rollout.backend` gives."""

    @classmethod
    def build(cls, cfg, policy_dir: Path, drafter=None, drafter_dir: Path | None = None, k_schedule=None) -> RolloutEngine:
        """The engine serving `policy_dir` for a run configured by `cfg`, speculating with `drafter`
        (exported at `drafter_dir`) when given, with k by running batch size from `k_schedule`
        (inclusive (lo, hi, k) ranges) where the backend supports it."""
        raise NotImplementedError

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling, seed: int, seeds: list[int] | None = None) -> Generation:
        """Sample `n` completions for each prompt (token ids), request i (prompt-major) with sampling
        seed `seeds[i]`, by default `request_seeds(seed, len(prompts) * n)` (a slice of a larger
        batch's seeds gives each request the sample it has in that batch; codraft/rollouts.py)."""

    @abc.abstractmethod
    def load_policy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the served policy's weights in place (Hugging Face names), dropping cached KV."""

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """The served policy's log p(token_t | tokens_<t) for t >= 1 (for checks of weight sync)."""
        raise NotImplementedError

    def update_proposer(self, update: dict) -> dict | None:
        """Hand `update` (plain data) to a proposer that lives inside the engine (a model-free drafter's
        index, drafters/suffix.py); its reply, or None where the engine has no such proposer."""
        return None

    def close(self) -> None:
        """Release the engine's resources."""
