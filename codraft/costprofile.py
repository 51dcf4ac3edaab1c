"""A cost model of the machine the run is on: a short profile of the run's own engine at start.

    model = calibrated_cost_model(engine, cfg, drafter, prompts=prompts.warm_start())  # a CostModel
    profile = profile_cost_model(engine, cfg, drafter, prompts)   # the same, with the raw timings

The cost model's priors (codraft/costmodel.py) are one CPU's figures, and speed flips with the CPU
type (bf16 matrix units or not, DESIGN.md). So at engine start the engine generates, with the run's
own policy and drafter, at a few running batch sizes: plainly (the k table 0 everywhere turns the
drafter off, `VLLMEngine.set_k_schedule`) and drafting k tokens for a few k, a few seconds in all.
Each batch is one `CostModel.observe` row; the fit's parameters (t0, t1, d0, d1, s0, s1) become the
priors of the model the run gets, which holds the profile's rows too and keeps refining itself from
the run's own batches as before (the rows age out of its window, the priors stay).

A profile is cached under `cache_root(cfg.model)/costprofiles/<key>.json`, the key hashing what
decides the timings: the hardware fingerprint (`codraft.hardware.fingerprint`), the OpenMP runtime,
the engine (backend, eager or compiled, dtype), the model config, the drafter (kind, exported
config, k) and the profile's own settings. A later run on the same machine with the same model
and drafter reads the fit instead of timing again.

Each timed batch takes fresh prompts (vLLM's CPU backend caches whole 128-token blocks only, so
short prompts are prefilled every batch anyway, as in a GRPO step). Per (batch size, k) the fastest
repeat is fitted: other processes' load only ever adds time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Sequence

from codraft.costmodel import CostModel, CostModelConfig, alpha_from_accept_len, parse_k_schedule
from codraft.hardware import describe, fingerprint

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1
"""Bumped when what a profile measures changes (old cache files then no longer match a key)."""
FLOOR = 0.02
"""A fitted parameter below this share of the default prior becomes the run's prior at this share
(the cost model needs priors > 0; a zero fit means small, not absent)."""


@dataclass(frozen=True)
class ProfileSettings:
    """What the start-up profile times (defaults: about 10 s on a 2-core CPU with the testbed)."""

    batches: tuple[int, ...] = (1, 8, 32)
    """Running batch sizes (capped at `rollout.max_num_seqs`)."""
    ks: tuple[int, ...] = (1, 3)
    """Draft lengths timed besides plain decoding (capped at the engine's k)."""
    tokens: int = 48
    """New tokens per sequence in a timed batch."""
    repeats: int = 2
    """Timed batches per (batch size, k); the fastest is fitted."""
    warmup_tokens: int = 4
    """New tokens of the untimed batch before the first timed one of each (batch size, k): the first
    batch of a new shape compiles (analysis/bench_cells.py saw plain decoding at batch 1 run at 32
    tokens/s cold)."""


@dataclass(frozen=True)
class Timing:
    """One timed batch of the profile."""

    batch: int
    k: int
    """0: plain decoding (drafter off)."""
    lengths: tuple[int, ...]
    """Tokens each sequence generated."""
    seconds: float
    accept_len: float = math.nan
    """Measured tokens per verify step (NaN at k = 0)."""

    @property
    def alpha(self) -> float:
        return alpha_from_accept_len(self.accept_len, self.k) if self.k else math.nan


@dataclass
class CostProfile:
    """A fitted profile: the model a run starts from, its raw timings, and where it is cached."""

    model: CostModel
    timings: list[Timing]
    key: str
    path: Path
    cached: bool
    """Read from the cache (nothing was timed)."""
    seconds: float = 0.0
    """Wall time the profile took when it was measured (warm-ups included)."""


# ---------------------------------------------------------------------------------- the fit


def fastest(timings: Sequence[Timing]) -> list[Timing]:
    """Per (batch size, k), the fastest timed batch per generated token, in first-seen order."""
    best: dict[tuple[int, int], Timing] = {}
    for t in timings:
        rate = t.seconds / max(1, sum(t.lengths))
        kept = best.get((t.batch, t.k))
        if kept is None or rate < kept.seconds / max(1, sum(kept.lengths)):
            best[(t.batch, t.k)] = t
    return list(best.values())


def observe_all(model: CostModel, timings: Sequence[Timing]) -> CostModel:
    """Feed `timings` to `model` as observed batches (k = 0: plain decoding); returns `model`."""
    for t in timings:
        model.observe(list(t.lengths), t.alpha, t.k, t.seconds, t.k > 0)
    return model


def fit(timings: Sequence[Timing], config: CostModelConfig | None = None) -> CostModel:
    """The cost model a run starts from: fitted on the fastest of each (batch size, k), the fit's
    parameters as its priors (floored at `FLOOR` of `config`'s), the profile's rows as its records."""
    config = config or CostModelConfig()
    rows = fastest(timings)
    first = observe_all(CostModel(config), rows)
    floors = {name: FLOOR * getattr(config, name) for name in ("t0", "t1", "d0", "d1", "s0", "s1")}
    priors = {name: max(getattr(first.costs, name), floor) for name, floor in floors.items()}
    return observe_all(CostModel(dataclasses.replace(config, **priors)), rows)


# ---------------------------------------------------------------------------------- the cache key


def drafter_shape(drafter) -> dict[str, Any]:
    """What the drafter's speed depends on: its kind and exported config (shapes, vocabulary)."""
    try:
        config = drafter.hf_config()
    except NotImplementedError:
        config = {}
    return {"kind": getattr(drafter, "name", type(drafter).__name__), "config": config}


def engine_mode(cfg) -> str:
    return "compiled" if cfg.rollout.engine_mode == "compiled" else "eager"


def profile_key(facts: dict[str, Any], cfg, drafter, settings: ProfileSettings) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes): hardware fingerprint and OpenMP runtime (`facts`, from
    `codraft.hardware.describe`), engine, model config, drafter and profile settings."""
    model = {k: v for k, v in asdict(cfg.model).items() if k != "cache_dir"}
    what = {
        "version": PROFILE_VERSION,
        "hardware": fingerprint(facts),
        "openmp": facts.get("openmp"),
        "engine": {"backend": cfg.rollout.backend, "mode": engine_mode(cfg), "dtype": cfg.rollout.dtype, "tensor_parallel_size": cfg.rollout.tensor_parallel_size,
                   "max_num_seqs": cfg.rollout.max_num_seqs, "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization, "kv_cache_gib": cfg.rollout.kv_cache_gib},
        "model": model,
        "drafter": {**drafter_shape(drafter), "k": cfg.drafter.num_speculative_tokens},
        "settings": asdict(settings),
    }
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], what


def profile_path(cfg, key: str) -> Path:
    from codraft.testbed import cache_root

    return cache_root(cfg.model) / "costprofiles" / f"{key}.json"


# ---------------------------------------------------------------------------------- timing


def task_prompts(cfg) -> list[list[int]]:
    """The task's training prompts as token ids (the policy's tokenizer; used when none are given)."""
    from codraft.prompts import load_tokenizer
    from codraft.task import make_task
    from codraft.testbed import policy_source

    tok = load_tokenizer(policy_source(cfg))
    train, _ = make_task(cfg.task, cfg.task.seed).splits()
    return tok(list(train["prompt"]), add_special_tokens=False).input_ids


class _Prompts:
    """Fresh prompts for every batch, cycling through the given ones."""

    def __init__(self, prompts: Sequence[Sequence[int]]):
        if not prompts:
            raise ValueError("the cost profile needs prompts")
        self.prompts, self.next = [list(p) for p in prompts], 0

    def take(self, n: int) -> list[list[int]]:
        out = [self.prompts[(self.next + i) % len(self.prompts)] for i in range(n)]
        self.next += n
        return out


def measure(engine, cfg, prompts: Sequence[Sequence[int]], settings: ProfileSettings, log: Callable = logger.info) -> list[Timing]:
    """Time plain and speculative batches on `engine` (a speculative engine with `set_k_schedule`):
    per repeat, per batch size, each k (0 = plain) in turn, the order of k reversed every other
    repeat. Leaves the engine at the last k timed; the caller restores its schedule."""
    from codraft.engine import Sampling

    k_max, max_seqs = cfg.drafter.num_speculative_tokens, cfg.rollout.max_num_seqs
    ks = [0, *sorted({min(k, k_max) for k in settings.ks if k > 0})]
    batches = sorted({min(b, max_seqs) for b in settings.batches})
    sampling = Sampling(cfg.rollout.temperature, cfg.rollout.top_p, settings.tokens)
    warm = Sampling(cfg.rollout.temperature, cfg.rollout.top_p, settings.warmup_tokens)
    pool, timings, seed = _Prompts(prompts), [], 7_000
    for rep in range(settings.repeats):
        for b in batches:
            for k in ks if rep % 2 == 0 else ks[::-1]:
                engine.set_k_schedule([(1, max_seqs, k)])
                if rep == 0:
                    engine.generate(pool.take(b), n=1, sampling=warm, seed=seed)
                seed += 1
                t0 = perf_counter()
                gen = engine.generate(pool.take(b), n=1, sampling=sampling, seed=seed)
                seconds = perf_counter() - t0
                accept = gen.acceptance.accept_len if k and gen.acceptance is not None else math.nan
                timings.append(Timing(b, k, tuple(len(c.token_ids) for c in gen.completions), seconds, accept))
                log(f"cost profile: batch {b}, k {k}: {seconds * 1e3:.0f} ms, {gen.num_tokens} tokens" + (f", accept len {accept:.2f}" if k else ""))
    return timings


# ---------------------------------------------------------------------------------- entry points


def read_profile(path: Path) -> list[Timing] | None:
    """The timings of a cached profile, or None when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return [Timing(t["batch"], t["k"], tuple(t["lengths"]), t["seconds"], t.get("accept_len", math.nan)) for t in data["timings"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_profile(path: Path, profile: CostProfile, facts: dict[str, Any], what: dict[str, Any]) -> None:
    from codraft.io import atomic_write_text

    data = {"key": profile.key, "what": what, "hardware": facts, "seconds": profile.seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "costs": asdict(profile.model.costs), "timings": [asdict(t) for t in profile.timings]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def profile_cost_model(engine, cfg, drafter, prompts: Sequence[Sequence[int]] | None = None, settings: ProfileSettings | None = None,
                       k_schedule: Sequence[tuple[int, int, int]] | None = None, refresh: bool = False, log: Callable = logger.info) -> CostProfile:
    """The cached profile of this machine, engine, model and drafter, or a new one timed on `engine`
    (`refresh`: time again even if cached). `prompts`: token ids to generate from (default: the
    task's training prompts). After timing, the engine's k table is `k_schedule` (default: what
    `drafter.k_schedule` starts a run with)."""
    settings = settings or ProfileSettings()
    facts = describe(engine_mode=engine_mode(cfg))
    key, what = profile_key(facts, cfg, drafter, settings)
    path = profile_path(cfg, key)
    timings = None if refresh else read_profile(path)
    if timings:
        log(f"cost profile {key}: read from {path}")
        return CostProfile(fit(timings), timings, key, path, cached=True)
    t0 = perf_counter()
    try:
        timings = measure(engine, cfg, prompts if prompts is not None else task_prompts(cfg), settings, log)
    finally:
        k = cfg.drafter.num_speculative_tokens
        engine.set_k_schedule(list(k_schedule) if k_schedule else parse_k_schedule(cfg.drafter.k_schedule, k, cfg.rollout.max_num_seqs))
    profile = CostProfile(fit(timings), timings, key, path, cached=False, seconds=perf_counter() - t0)
    write_profile(path, profile, facts, what)
    log(f"cost profile {key}: {len(timings)} batches in {profile.seconds:.1f} s, written to {path}")
    return profile


def calibrated_cost_model(engine, cfg, drafter, prompts: Sequence[Sequence[int]] | None = None, **kwargs) -> CostModel:
    """The cost model a run's controller starts from: fitted to this machine by `profile_cost_model`
    (cached), or the default priors when there is nothing to profile (no drafter, or an engine
    without a k table). It keeps calibrating from the run's batches (`CostModel.observe`)."""
    if drafter is None or not hasattr(engine, "set_k_schedule"):
        return CostModel()
    return profile_cost_model(engine, cfg, drafter, prompts, **kwargs).model
