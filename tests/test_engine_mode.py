"""Eager or compiled vLLM by measurement (codraft/engine_mode.py): the decision rule, the per-machine
cache, RNG left untouched by the timing engines, torchrun ranks, and the config key."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

import codraft.engine_mode as engine_mode
from codraft.config import ConfigError
from codraft.configfile import load_config
from codraft.engine import Completion, Generation
from codraft.engine_mode import ModeTiming, decide, engine_mode_key, resolve_engine_mode

FACTS = {"cpu": "AMD EPYC", "cores": 2, "isa": ["avx2"], "accelerator": None, "torch": "2.13.0+cpu", "vllm": "0.32.0", "openmp": "gnu (libgomp)"}
START = {"eager": 10.0, "compiled": 70.0}  # seconds the fake engines take to start
BATCH = {"eager": 3.0, "compiled": 2.0}  # and per GRPO batch: compiled saves 1 s a step for 60 s more start-up


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Advances the clock as an engine of its mode would, and reseeds the RNGs as vLLM's start-up does."""

    built: list[str] = []

    def __init__(self, clock: Clock, cfg, policy_dir):
        self.clock, self.mode = clock, cfg.rollout.engine_mode
        FakeEngine.built.append(self.mode)
        torch.manual_seed(1234)
        random.seed(1234)
        clock.now += START[self.mode]

    def generate(self, prompts, n, sampling, seed):
        self.clock.now += BATCH[self.mode] * (1.5 if seed == 10_000 else 1.0)  # the first batch of a shape is slower
        return Generation([Completion(i // n, [1] * 7, [], True) for i in range(len(prompts) * n)])

    def close(self):
        pass


@pytest.fixture
def auto_cfg(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(engine_mode, "describe", lambda **_: dict(FACTS))
    FakeEngine.built = []
    return dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, cache_dir=str(tmp_path)),
                               rollout=dataclasses.replace(tiny_cfg.rollout, engine_mode="auto"))


def fake_build(monkeypatch) -> callable:
    clock = Clock()
    monkeypatch.setattr(engine_mode, "perf_counter", clock)
    return lambda cfg, policy_dir: FakeEngine(clock, cfg, policy_dir)


def with_steps(cfg, steps: int):
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=steps))


def test_compiled_when_the_steps_repay_the_compile():
    timings = [ModeTiming("eager", 10.0, 3.0, 100), ModeTiming("compiled", 70.0, 2.0, 100)]
    assert decide(timings, 61)[0] == "compiled" and decide(timings, 60)[0] == "eager"
    mode, reason = decide(timings, 8)
    assert mode == "eager" and reason == ("8 steps x (3.00 s eager - 2.00 s compiled per GRPO batch of 100 tokens) = 8 s saved <= 60 s more start-up "
                                          "(70 s compiled, 10 s eager)")
    fewer = [ModeTiming("eager", 10.0, 3.0, 100), ModeTiming("compiled", 70.0, 2.0, 50)]  # compiled sampled half the tokens: slower per token
    assert decide(fewer, 10_000)[0] == "eager"
    slower = [ModeTiming("eager", 10.0, 2.0, 100), ModeTiming("compiled", 12.0, 2.5, 100)]
    assert decide(slower, 10_000)[0] == "eager"  # compiled steps slower: never worth it


def test_auto_times_both_modes_once_per_machine_and_decides_per_run(auto_cfg, monkeypatch):
    build = fake_build(monkeypatch)
    prompts = [[5, 6, 7]] * 40
    first = resolve_engine_mode(with_steps(auto_cfg, 100), "policy", prompts, build=build, log=lambda *a: None)
    assert FakeEngine.built == ["eager", "compiled"] and not first.cached
    assert first.mode == "compiled" and "100 steps x (3.00 s eager - 2.00 s compiled per GRPO batch of 112 tokens)" in first.reason
    assert {t.mode: (t.start_s, t.batch_s, t.tokens) for t in first.timings} == {
        "eager": (10.0, 3.0, 7 * auto_cfg.rollout.prompts_per_step * auto_cfg.rollout.group_size), "compiled": (70.0, 2.0, 7 * auto_cfg.rollout.prompts_per_step * auto_cfg.rollout.group_size)}
    short = resolve_engine_mode(with_steps(auto_cfg, 20), "policy", prompts, build=build, log=lambda *a: None)
    assert FakeEngine.built == ["eager", "compiled"] and short.cached and short.mode == "eager"  # the same cache, another run length
    assert short.key == first.key and short.as_json()["timings"] == first.as_json()["timings"]
    wider = dataclasses.replace(auto_cfg, model=dataclasses.replace(auto_cfg.model, hidden_size=256))
    resolve_engine_mode(wider, "policy", prompts, build=build, log=lambda *a: None)
    assert FakeEngine.built == ["eager", "compiled"] * 2  # another model: timed again


def test_timing_leaves_the_run_rngs_as_they_were(auto_cfg, monkeypatch):
    build = fake_build(monkeypatch)
    torch.manual_seed(7)
    random.seed(7)
    resolve_engine_mode(auto_cfg, "policy", [[1, 2]] * 40, build=build, log=lambda *a: None)
    after = torch.rand(3), random.random()
    torch.manual_seed(7)
    random.seed(7)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()


def test_configured_modes_gpus_and_other_ranks_take_no_timing(auto_cfg, monkeypatch):
    build = fake_build(monkeypatch)
    eager = dataclasses.replace(auto_cfg, rollout=dataclasses.replace(auto_cfg.rollout, engine_mode="eager"))
    assert resolve_engine_mode(eager, "p", [], build=build).mode == "eager"
    reference = dataclasses.replace(auto_cfg, rollout=dataclasses.replace(auto_cfg.rollout, backend="reference"))
    assert resolve_engine_mode(reference, "p", [], build=build).mode == "eager"
    with pytest.raises(RuntimeError, match="rank 0 left no measurement at .*engine_modes"):
        resolve_engine_mode(auto_cfg, "p", [], is_main=False, build=build)
    monkeypatch.setattr(engine_mode, "describe", lambda **_: {**FACTS, "accelerator": "NVIDIA H100"})
    assert resolve_engine_mode(auto_cfg, "p", [], build=build).mode == "compiled"
    assert FakeEngine.built == []


def test_a_resumed_run_keeps_the_mode_it_started_in(auto_cfg, monkeypatch, tmp_path):
    build = fake_build(monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "hardware.json").write_text(json.dumps({**FACTS, "engine_mode": "compiled", "engine_mode_choice": {"mode": "compiled"}}))
    choice = resolve_engine_mode(with_steps(auto_cfg, 1), "p", [[1]] * 40, build=build, run_dir=run_dir)
    assert choice.mode == "compiled" and "started in" in choice.reason and FakeEngine.built == []  # 1 step alone would choose eager
    (run_dir / "hardware.json").write_text(json.dumps({**FACTS, "engine_mode": "eager"}))  # a run from before `auto`: nothing chosen
    assert resolve_engine_mode(with_steps(auto_cfg, 1), "p", [[1]] * 40, build=build, run_dir=run_dir, log=lambda *a: None).cached is False


def test_the_key_names_what_decides_the_timings(auto_cfg):
    key, what = engine_mode_key(FACTS, auto_cfg)
    assert what["hardware"].startswith("avx2|AMD EPYC|2|") and len(key) == 16
    moved = dataclasses.replace(auto_cfg, model=dataclasses.replace(auto_cfg.model, cache_dir="/elsewhere"))
    longer = with_steps(auto_cfg, 999)
    assert engine_mode_key(FACTS, moved)[0] == key and engine_mode_key(FACTS, longer)[0] == key  # not what is timed
    amx = {**FACTS, "cpu": "Intel Xeon", "isa": ["amx_bf16", "avx512f"]}
    bigger = dataclasses.replace(auto_cfg, rollout=dataclasses.replace(auto_cfg.rollout, group_size=16))
    assert len({key, engine_mode_key(amx, auto_cfg)[0], engine_mode_key(FACTS, bigger)[0]}) == 3


def test_the_config_key_and_presets():
    assert load_config("default").rollout.engine_mode == "auto"
    assert load_config("smoke").rollout.engine_mode == "eager"
    assert load_config("qwen3-8b-8gpu").rollout.engine_mode == "compiled"
    with pytest.raises(ConfigError, match="rollout.engine_mode"):
        load_config("smoke", overrides=["rollout.engine_mode=fast"])
    with pytest.raises(ConfigError, match="unknown config key 'rollout.enforce_eager'; it was replaced by engine_mode"):
        load_config("smoke", overrides=["rollout.enforce_eager=true"])
