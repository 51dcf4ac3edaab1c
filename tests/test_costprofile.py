"""The engine-start cost profile (codraft/costprofile.py): the fit recovers a known cost model from
synthetic timings, the cache key follows the hardware and the model, and a profile is timed once
per key (a fake engine stands in for vLLM)."""
import dataclasses
import json
import math

import pytest

from codraft.costmodel import CostModel, CostModelConfig, StepCosts, tokens_per_verify
from codraft.costprofile import (
    FLOOR,
    ProfileSettings,
    Timing,
    calibrated_cost_model,
    fastest,
    fit,
    profile_cost_model,
    profile_key,
    profile_path,
)
from codraft.engine import Completion, Generation
from codraft.acceptance import AcceptanceStats

TRUE = StepCosts(t0=4e-3, t1=3e-4, d0=2e-3, d1=5e-5, s0=3e-3, s1=1e-4)
ALPHA = 0.6
FACTS = {"cpu": "AMD EPYC", "cores": 2, "isa": ["avx2"], "accelerator": None, "torch": "2.13.0+cpu", "vllm": "0.32.0",
         "engine_mode": "compiled", "openmp": "gnu (libgomp)"}


def true_model() -> CostModel:
    model = CostModel()
    model.costs = TRUE
    return model


def synthetic_timings(settings: ProfileSettings, tokens: int = 48, noise: float = 0.0, costs: StepCosts = TRUE) -> list[Timing]:
    """What the profile would time on a machine whose costs are `costs` (per repeat, `noise` slower)."""
    model, out = CostModel(), []
    model.costs = costs
    for rep in range(settings.repeats):
        for b in settings.batches:
            for k in (0, *settings.ks):
                lengths = (tokens,) * b
                seconds = model.predict_gen_s(lengths, ALPHA if k else math.nan, k) * (1 + noise * rep)
                out.append(Timing(b, k, lengths, seconds, tokens_per_verify(ALPHA, k) if k else math.nan))
    return out


def test_fit_recovers_known_parameters_from_synthetic_timings():
    settings = ProfileSettings(batches=(1, 8, 32), ks=(1, 3))
    model = fit(synthetic_timings(settings))
    for name in ("t0", "t1", "d0", "d1", "s0", "s1"):
        assert getattr(model.costs, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
    assert model.config.t0 == pytest.approx(TRUE.t0, rel=0.05)  # the fit is the run's prior, not the default one
    truth = true_model()
    for b in (2, 16, 64):  # between and beyond the profiled sizes
        for k in (0, 2, 5):
            lengths = [100] * b
            assert model.predict_gen_s(lengths, 0.7, k) == pytest.approx(truth.predict_gen_s(lengths, 0.7, k), rel=0.03), (b, k)


def test_fit_keeps_the_fastest_repeat_and_floors_zero_parameters():
    settings = ProfileSettings(batches=(1, 8, 32), ks=(1, 3), repeats=3)
    slow = synthetic_timings(settings, noise=0.5)  # repeats 1 and 2: other processes' load, 50% and 100% slower
    assert len(fastest(slow)) == 9 and all(t in slow[:9] for t in fastest(slow))
    assert fit(slow).costs.t0 == pytest.approx(TRUE.t0, rel=0.05)
    free = fit(synthetic_timings(settings, costs=dataclasses.replace(TRUE, s1=0.0)))  # drafting costs nothing per sequence
    assert FLOOR * CostModelConfig().s1 <= free.config.s1 < 0.01 * TRUE.s1  # a valid prior (CostModel refuses zeros), small
    assert free.costs.s1 < 0.01 * TRUE.s1 and len(free.records) == 9


def test_profiled_model_keeps_refining_online():
    settings = ProfileSettings()
    model = fit(synthetic_timings(settings))
    n = len(model.records)
    slower = dataclasses.replace(TRUE, t0=2 * TRUE.t0)  # the machine got busier after the profile
    truth = CostModel()
    truth.costs = slower
    batch = [120, 80, 160, 40]
    before = model.predict_gen_s(batch, ALPHA, 3)
    for _ in range(30):
        model.observe(batch, ALPHA, 3, truth.predict_gen_s(batch, ALPHA, 3), True)
    assert len(model.records) == n + 30
    assert before < 0.85 * truth.predict_gen_s(batch, ALPHA, 3)
    assert model.predict_gen_s(batch, ALPHA, 3) == pytest.approx(truth.predict_gen_s(batch, ALPHA, 3), rel=0.03)


def test_cache_key_follows_hardware_model_drafter_and_engine(tiny_cfg):
    class Head:
        name = "eagle3"

        def __init__(self, width):
            self.width = width

        def hf_config(self):
            return {"hidden_size": self.width}

    settings = ProfileSettings()
    key, what = profile_key(FACTS, tiny_cfg, Head(128), settings)
    assert key == profile_key(dict(FACTS), tiny_cfg, Head(128), settings)[0] and len(key) == 16
    assert what["hardware"].startswith("avx2|AMD EPYC|2|")
    other_cpu = {**FACTS, "cpu": "Intel Xeon", "isa": ["amx_bf16", "avx2", "avx512f"]}
    bigger = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, hidden_size=256))
    eager = dataclasses.replace(tiny_cfg, rollout=dataclasses.replace(tiny_cfg.rollout, engine_mode="compiled"))  # smoke: eager
    moved = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, cache_dir="/elsewhere"))
    keys = {profile_key(other_cpu, tiny_cfg, Head(128), settings)[0], profile_key(FACTS, bigger, Head(128), settings)[0],
            profile_key(FACTS, tiny_cfg, Head(256), settings)[0], profile_key(FACTS, eager, Head(128), settings)[0],
            profile_key({**FACTS, "openmp": "intel (libiomp5)"}, tiny_cfg, Head(128), settings)[0]}
    assert key not in keys and len(keys) == 5
    assert profile_key(FACTS, moved, Head(128), settings)[0] == key  # where the cache lives is not what is profiled
    assert profile_path(moved, key).as_posix() == f"/elsewhere/costprofiles/{key}.json"


class FakeEngine:
    """Generates `max_new_tokens` per sequence; `seconds_for` says how long a batch would take (not slept)."""

    def __init__(self, clock):
        self.clock, self.schedules, self.calls = clock, [], 0

    def set_k_schedule(self, schedule):
        self.schedules.append([tuple(r) for r in schedule])

    def generate(self, prompts, n, sampling, seed):
        self.calls += 1
        k = self.schedules[-1][0][2]
        lengths = [sampling.max_new_tokens] * (len(prompts) * n)
        self.clock.advance(true_model().predict_gen_s(lengths, ALPHA if k else math.nan, k))
        acc = AcceptanceStats(drafts=100, accepted=round(100 * (tokens_per_verify(ALPHA, k) - 1))) if k else None
        return Generation([Completion(i, [1] * m, [], False) for i, m in enumerate(lengths)], acc)


class Clock:
    def __init__(self):
        self.now = 0.0

    def advance(self, seconds):
        self.now += seconds

    def __call__(self):
        return self.now


def test_profile_is_timed_once_per_key_and_restores_the_schedule(tiny_cfg, tmp_path, monkeypatch):
    import codraft.costprofile as costprofile

    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, cache_dir=str(tmp_path)),
                              drafter=dataclasses.replace(tiny_cfg.drafter, kind="eagle3", num_speculative_tokens=3, k_schedule="1-4:3,5-256:0"))
    clock = Clock()
    monkeypatch.setattr(costprofile, "perf_counter", clock)
    monkeypatch.setattr(costprofile, "describe", lambda engine_mode=None: {**FACTS, "engine_mode": engine_mode})
    head = type("Head", (), {"name": "eagle3", "hf_config": lambda self: {"hidden_size": 128}})()
    engine = FakeEngine(clock)
    settings = ProfileSettings(batches=(1, 8, 32), ks=(1, 3), tokens=40)
    prompts = [[5, 6, 7]] * 10
    first = profile_cost_model(engine, cfg, head, prompts, settings=settings, log=lambda *a: None)
    assert not first.cached and first.path.is_file() and first.path.parent == tmp_path / "costprofiles"
    assert len(first.timings) == 18 and engine.calls == 18 + 9  # 2 repeats of 9, and one warm-up per (batch, k)
    assert engine.schedules[-1] == [(1, 4, 3), (5, 256, 0)]  # the run's own k table again
    assert first.model.costs.t1 == pytest.approx(TRUE.t1, rel=0.05)
    saved = json.loads(first.path.read_text())
    assert saved["key"] == first.key and saved["hardware"]["cpu"] == "AMD EPYC" and len(saved["timings"]) == 18
    calls = engine.calls
    model = calibrated_cost_model(engine, cfg, head, prompts, settings=settings, log=lambda *a: None)
    assert engine.calls == calls  # read from the cache: nothing timed
    assert dataclasses.astuple(model.costs) == pytest.approx(dataclasses.astuple(first.model.costs))
    assert calibrated_cost_model(engine, cfg, None, prompts).costs == CostModel().costs  # no drafter: the default priors


def test_settings_are_capped_at_the_engine(tiny_cfg, tmp_path):
    from codraft.costprofile import measure

    cfg = dataclasses.replace(tiny_cfg, rollout=dataclasses.replace(tiny_cfg.rollout, max_num_seqs=16),
                              drafter=dataclasses.replace(tiny_cfg.drafter, num_speculative_tokens=2))
    engine = FakeEngine(Clock())
    timings = measure(engine, cfg, [[1, 2]], ProfileSettings(batches=(1, 64), ks=(1, 3), repeats=1), log=lambda *a: None)
    assert sorted({(t.batch, t.k) for t in timings}) == [(1, 0), (1, 1), (1, 2), (16, 0), (16, 1), (16, 2)]

