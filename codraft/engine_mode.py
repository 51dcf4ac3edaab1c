"""Eager or compiled vLLM for the run's engine, chosen by measurement (`rollout.engine_mode = "auto"`).

    choice = resolve_engine_mode(cfg, policy_dir, prompts)   # choice.mode: "eager" or "compiled"; choice.reason: why

Compiled mode (torch.compile of the model) makes each decoding step cheaper but costs a compile at
every engine start; which pays depends on the CPU type and on how many rollout batches a run
generates. On a CPU, `auto` times both on this machine, once: a plain engine of the run's model in
each mode is built (start-up seconds) and generates a batch of the run's GRPO shape (prompts per
step x group size, the run's sampling) after an untimed one, twice. A run then compiles when

    run.steps x (eager s/token - compiled s/token) x tokens per batch  >  compiled start s - eager start s,

i.e. when the steps' savings repay the compile (per token: the two modes' numerics differ in the
last bits, so the same seeds sample slightly different lengths). The measurement is cached under
`cache_root(cfg.model)/engine_modes/<key>.json`, the key hashing what decides the timings: the
hardware fingerprint (`codraft.hardware.fingerprint`), the OpenMP runtime, the model config and the
engine settings; the decision itself is taken per run (it depends on `run.steps`). The choice and
its numbers go into RUN_DIR/hardware.json (`engine_mode`, `engine_mode_choice`).

A resumed run keeps the mode it started in (RUN_DIR/hardware.json), whatever the cache now says.
On a GPU `auto` is `compiled` without timing: CUDA graphs are vLLM's default and its fast path.
The timing engines are plain (no drafter); the run's engine drafts with the same mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Sequence

from codraft.hardware import describe, fingerprint

logger = logging.getLogger(__name__)

MODES = ("eager", "compiled")
TIMED_BATCHES = 2
"""Timed GRPO-shape batches per mode after the untimed first one; the fastest counts (other
processes' load only ever adds time)."""


@dataclass(frozen=True)
class ModeTiming:
    """One mode measured: engine start-up and one GRPO-shape batch."""

    mode: str
    start_s: float
    """Seconds to build the engine (a compile, in compiled mode)."""
    batch_s: float
    """Seconds of the fastest timed batch."""
    tokens: int
    """Tokens that batch generated."""


@dataclass(frozen=True)
class EngineModeChoice:
    """What `auto` chose, and from what."""

    mode: str
    reason: str
    timings: tuple[ModeTiming, ...] = ()
    key: str = ""
    cached: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "key": self.key, "cached": self.cached, "timings": [asdict(t) for t in self.timings]}


def decide(timings: Sequence[ModeTiming], steps: int) -> tuple[str, str]:
    """(mode, reason) from both modes' timings: compiled when `steps` batches repay its start-up."""
    by = {t.mode: t for t in timings}
    eager, compiled = by["eager"], by["compiled"]
    tokens = (eager.tokens + compiled.tokens) / 2
    per_batch = {t.mode: t.batch_s / max(t.tokens, 1) * tokens for t in (eager, compiled)}  # at the same tokens
    saving, extra = steps * (per_batch["eager"] - per_batch["compiled"]), compiled.start_s - eager.start_s
    mode = "compiled" if saving > extra else "eager"
    reason = (f"{steps} steps x ({per_batch['eager']:.2f} s eager - {per_batch['compiled']:.2f} s compiled per GRPO batch of {tokens:.0f} tokens) "
              f"= {saving:.0f} s saved {'>' if mode == 'compiled' else '<='} {extra:.0f} s more start-up ({compiled.start_s:.0f} s compiled, "
              f"{eager.start_s:.0f} s eager)")
    return mode, reason


def engine_mode_key(facts: dict[str, Any], cfg) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes) of a measurement: hardware, OpenMP runtime, model and engine settings."""
    rollout = cfg.rollout
    what = {
        "hardware": fingerprint(facts),
        "openmp": facts.get("openmp"),
        "model": {k: v for k, v in asdict(cfg.model).items() if k != "cache_dir"},
        "engine": {"dtype": rollout.dtype, "max_num_seqs": rollout.max_num_seqs, "kv_cache_gib": rollout.kv_cache_gib,
                   "batch": [rollout.prompts_per_step, rollout.group_size], "max_new_tokens": rollout.max_new_tokens,
                   "temperature": rollout.temperature, "top_p": rollout.top_p},
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16], what


def cache_path(cfg, key: str) -> Path:
    from codraft.testbed import cache_root

    return cache_root(cfg.model) / "engine_modes" / f"{key}.json"


def read_timings(path: Path) -> tuple[ModeTiming, ...] | None:
    try:
        timings = tuple(ModeTiming(**t) for t in json.loads(path.read_text())["timings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return timings if {t.mode for t in timings} == set(MODES) else None


def write_timings(path: Path, timings: Sequence[ModeTiming], facts: dict[str, Any], what: dict[str, Any]) -> None:
    from codraft.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"what": what, "hardware": facts, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "timings": [asdict(t) for t in timings]}
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


@contextlib.contextmanager
def preserved_rng():
    """Leave the process RNGs (Python, NumPy, torch) as they were: an engine's start-up reseeds them,
    and a seeded run must draw the same numbers whether or not this run measured."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def measure(cfg, policy_dir: Path, prompts: Sequence[Sequence[int]], build: Callable | None = None, log: Callable = logger.info) -> tuple[ModeTiming, ...]:
    """Build a plain engine in each mode (one at a time) and time GRPO-shape batches of `prompts`.
    `build(cfg, policy_dir)` makes an engine (default: codraft's vLLM engine)."""
    from codraft.engine import Sampling

    if build is None:
        from codraft.vllm_engine import VLLMEngine as build
    rollout = cfg.rollout
    batch = [list(p) for p in prompts[: rollout.prompts_per_step]]
    sampling = Sampling(rollout.temperature, rollout.top_p, rollout.max_new_tokens)
    out = []
    for mode in MODES:
        t0 = perf_counter()
        engine = build(with_mode(cfg, mode), policy_dir)
        start_s = perf_counter() - t0
        try:
            runs = []
            for i in range(TIMED_BATCHES + 1):  # the first batch of a shape is slower: untimed
                t0 = perf_counter()
                gen = engine.generate(batch, n=rollout.group_size, sampling=sampling, seed=10_000 + i)
                runs.append((perf_counter() - t0, gen.num_tokens))
        finally:
            engine.close()
        seconds, tokens = min(runs[1:])
        out.append(ModeTiming(mode, start_s, seconds, tokens))
        log(f"engine mode: {mode} started in {start_s:.1f} s, a GRPO batch in {seconds:.2f} s ({tokens} tokens)")
    return tuple(out)


def started_mode(run_dir: Path) -> str | None:
    """The engine mode `auto` chose when the run in `run_dir` started (None for a new run)."""
    try:
        facts = json.loads((Path(run_dir) / "hardware.json").read_text())
    except (OSError, ValueError):
        return None
    mode = facts.get("engine_mode") if isinstance(facts, dict) and facts.get("engine_mode_choice") else None
    return mode if mode in MODES else None


def resolve_engine_mode(cfg, policy_dir: Path, prompts: Sequence[Sequence[int]], is_main: bool = True, build: Callable | None = None,
                        log: Callable = logger.info, run_dir: Path | None = None) -> EngineModeChoice:
    """The run's engine mode: the configured one, or for `auto` the mode a resumed run in `run_dir`
    started in, or the measured choice (see the module docstring). Under torchrun only the main rank
    measures (the others read its cache: call this on them after a barrier)."""
    mode = cfg.rollout.engine_mode
    if mode != "auto":
        return EngineModeChoice(mode, "configured (rollout.engine_mode)")
    started = started_mode(run_dir) if run_dir is not None else None
    if started:
        return EngineModeChoice(started, "the mode this run started in (RUN_DIR/hardware.json)")
    if cfg.rollout.backend != "vllm":
        return EngineModeChoice("eager", "the reference engine has no compiled mode")
    facts = describe()
    if facts.get("accelerator"):
        return EngineModeChoice("compiled", "GPU: CUDA graphs, vLLM's default")
    key, what = engine_mode_key(facts, cfg)
    path = cache_path(cfg, key)
    timings, cached = read_timings(path), True
    if timings is None:
        if not is_main:
            raise RuntimeError(f"rollout.engine_mode = auto: rank 0 left no measurement at {path}")
        log(f"engine mode: timing eager and compiled vLLM on this machine once (cached as {path})")
        with preserved_rng():
            timings, cached = measure(cfg, policy_dir, prompts, build, log), False
        write_timings(path, timings, facts, what)
    chosen, reason = decide(timings, cfg.run.steps)
    log(f"engine mode: {chosen} ({reason})")
    return EngineModeChoice(chosen, reason, tuple(timings), key, cached)


def with_mode(cfg, mode: str):
    """`cfg` with its engine mode resolved."""
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine_mode=mode))
