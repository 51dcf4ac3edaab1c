"""Rollouts across a torchrun job: one engine, or one per group of ranks (`rollout.engines`).

    group = RolloutGroup(dist, engines=cfg.rollout.engines, engine=engine_or_None)
    group.sync_commands()                                    # each step, first, on every rank
    group.load_policy_weights(weights)                       # every engine, in place
    gen = group.generate(prompt_ids, n, sampling, seed)     # every rank; rank 0 gets the whole batch

With E engines in a job of W ranks, ranks 0, W/E, 2W/E, ... each own one (one per node when E is the
number of nodes: its local rank 0, whose engine spans the node's GPUs with vLLM's own
tensor-parallel executor). A step's prompts are split into E contiguous slices; each owner generates
its slice with the per-request seeds one engine would have used for those requests
(`request_seeds` of the whole batch, sliced), so the rollouts do not depend on E beyond the
engine's own numerics. Rank 0 gathers the completions (prompt-major, as one engine returns them),
sums the acceptance counts of every engine (the controller observes the sums), and keeps each
owner's generation seconds and completion lengths (`Generation.extra`): the controller's cost model
observes rank 0's engine, the batch one engine runs.

Every weight sync reaches every engine: each owner loads the full policy weights into its own
engine in the prepare stage. Drafter changes are made by the controller on rank 0, whose engine is
wrapped in a `CommandLog`: each change applies at once and is recorded, and `sync_commands` (a
broadcast at the start of the next step) replays them on the other engines, so every engine serves
the same drafter, k table and proposer state when the step generates. Each engine's k table then
follows its own running batch, as vLLM applies it per engine step. Evaluation (held-out and test
accuracy) runs on rank 0's engine alone.

Why not vLLM's `external_launcher` executor (every rank of a tensor-parallel group runs one
in-process engine in lockstep): it makes the engine's TP group the trainer's ranks, so each rank
holds an engine shard and must call `generate` with the same prompts at the same time; here a
rank owns a whole engine (vLLM's own executor spreads it over the node's GPUs), which keeps one code
path for CPU and GPU and for every backend, the reference engine included.
"""
from __future__ import annotations

import time
from typing import Any

from codraft.acceptance import AcceptanceStats
from codraft.config import ConfigError
from codraft.distributed import DistState, broadcast_object, gather_object
from codraft.engine import Completion, Generation, RolloutEngine, Sampling, request_seeds

# engine methods that change what the engine serves: recorded on rank 0, replayed on the other owners
REPLAYED = ("load_drafter_weights", "set_k_schedule", "update_proposer")


def owners(world_size: int, engines: int) -> list[int]:
    """The ranks that own an engine: every (world_size / engines)-th, from rank 0."""
    if engines > world_size or world_size % engines:
        raise ConfigError(f"config key 'rollout.engines' is {engines}, which does not divide the job's {world_size} ranks (one engine per group of ranks)")
    return list(range(0, world_size, world_size // engines))


def slices(n_prompts: int, n_engines: int) -> list[range]:
    """Contiguous prompt slices, one per engine, as even as possible (the first ones one longer)."""
    base, extra = divmod(n_prompts, n_engines)
    out, start = [], 0
    for i in range(n_engines):
        size = base + (i < extra)
        out.append(range(start, start + size))
        start += size
    return out


class CommandLog:
    """Rank 0's engine: every method call goes through; the ones that change what it serves are also recorded."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self.commands: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.engine, name)
        if name not in REPLAYED or not callable(attr):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            self.commands.append((name, _on_host(args), _on_host(kwargs)))  # applied here: replayed there
            return out

        return call

    def take(self) -> list[tuple[str, tuple, dict]]:
        out, self.commands = self.commands, []
        return out


def _on_host(value: Any) -> Any:
    """`value` with every tensor in it copied into host memory (a replay is pickled to every rank, and
    a CUDA tensor would come back on rank 0's device)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(v) for v in value)
    return value


class RolloutGroup:
    def __init__(self, dist: DistState, engines: int, engine: RolloutEngine | None):
        self.dist = dist
        self.owners = owners(dist.world_size, engines) if dist.distributed else owners(1, engines)
        self.engine = engine
        """This rank's engine (a `CommandLog` on rank 0 when there are other engines), or None."""
        if dist.is_main and engine is not None and len(self.owners) > 1:
            self.engine = CommandLog(engine)

    @property
    def local_engine(self) -> RolloutEngine | None:
        """This rank's engine itself (not the `CommandLog` around rank 0's)."""
        return self.engine.engine if isinstance(self.engine, CommandLog) else self.engine

    @property
    def owns_engine(self) -> bool:
        return self.dist.rank in self.owners

    def load_policy_weights(self, weights: dict) -> None:
        """New policy weights into this rank's engine, if it owns one (`weights`: the full policy there)."""
        if self.owns_engine and self.engine is not None:
            self.engine.load_policy_weights(weights.items())

    def generate(self, prompts: list[list[int]] | None, n: int, sampling: Sampling, seed: int) -> Generation | None:
        """Every rank calls this (a collective with several engines); rank 0 gets the whole generation."""
        if len(self.owners) == 1:
            return self.engine.generate(prompts, n=n, sampling=sampling, seed=seed) if self.dist.is_main else None
        prompts = broadcast_object(prompts, self.dist)
        seeds = request_seeds(seed, len(prompts) * n)
        part = None
        mine = slices(len(prompts), len(self.owners))[self.owners.index(self.dist.rank)] if self.owns_engine else range(0)
        if len(mine):
            t0 = time.perf_counter()
            gen = self.engine.generate([prompts[i] for i in mine], n=n, sampling=sampling, seed=seed, seeds=seeds[mine.start * n : mine.stop * n])
            part = (mine.start, gen, time.perf_counter() - t0)
        parts = gather_object(part, self.dist)
        return merge([p for p in parts if p is not None]) if self.dist.is_main else None

    def sync_commands(self) -> None:
        """Replay rank 0's drafter changes since the last call on the other engines (every rank calls it)."""
        if len(self.owners) == 1:
            return
        commands = broadcast_object(self.engine.take() if self.dist.is_main else None, self.dist)
        if self.owns_engine and not self.dist.is_main:
            for name, args, kwargs in commands:
                getattr(self.engine, name)(*args, **kwargs)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def merge(parts: list[tuple[int, Generation, float]]) -> Generation:
    """One generation from the owners' slices: completions in prompt order, counts summed; each
    engine's seconds and completion lengths in `extra` (what one engine ran, for the cost model)."""
    completions: list[Completion] = []
    acceptance: AcceptanceStats | None = None
    for start, gen, _ in sorted(parts, key=lambda p: p[0]):
        completions += [Completion(c.prompt_index + start, c.token_ids, c.logprobs, c.finished) for c in gen.completions]
        if gen.acceptance is not None:
            acceptance = gen.acceptance if acceptance is None else acceptance + gen.acceptance
    parts = sorted(parts, key=lambda p: p[0])
    lengths = [tuple(len(c.token_ids) for c in gen.completions) for _, gen, _ in parts]
    return Generation(completions, acceptance, extra={"engine_seconds": [p[2] for p in parts], "engine_lengths": lengths})
