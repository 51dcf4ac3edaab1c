"""Rollout backends by name (`rollout.backend`), kept apart from the engine interface.

    from codraft.engines import make_engine
    engine = make_engine(cfg, policy_dir)                            # plain rollouts
    engine = make_engine(cfg, policy_dir, drafter, drafter_dir)      # speculative rollouts

Each backend module registers its engine class (`@ENGINES.register("vllm")`); the registry imports
the modules below on first lookup, so this module imports no backend and a backend imports the
interface (`codraft.engine`) and this registry, never the other way round.
"""
from __future__ import annotations

from pathlib import Path

from codraft.engine import RolloutEngine
from codraft.registry import Registry

ENGINES: Registry[RolloutEngine] = Registry("rollout backend", plugin_modules=("codraft.vllm_engine", "codraft.reference_engine"))


def make_engine(cfg, policy_dir: Path, drafter=None, drafter_dir: Path | None = None, k_schedule=None) -> RolloutEngine:
    """The configured engine (`rollout.backend`) serving `policy_dir`, speculating with `drafter`
    (exported at `drafter_dir`) when given."""
    return ENGINES.get(cfg.rollout.backend).build(cfg, policy_dir, drafter, drafter_dir, k_schedule)
