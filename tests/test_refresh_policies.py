"""Refresh policies: contract tests over every registered policy (a new policy is covered without
writing a test), then each policy's own behaviour, the registry, and the README's worked example.

Synthetic traces are generators of `Observation`s that take each step's `Decision` back: after a
refresh decision a fresh drafter serves from the next step, and the trace's acceptance recovers.
"""
from __future__ import annotations

import importlib
import json
import dataclasses
import math
import random
import re
import sys
import tomllib
from pathlib import Path
from typing import Callable, Iterator

import pytest
import tomli_w

from codraft.config import ConfigError
from codraft.configfile import from_dict, load_config, section_fields, to_dict
from codraft.costmodel import CostModel, KSchedule, k_at, tokens_per_verify
from codraft.refresh import REFRESH_POLICIES, Decision, Observation, RefreshPolicy, make_refresh_policy
from codraft.registry import UnknownNameError
from codraft.refresh import describe_policies
from tests_helpers import scratch_registry

K = 3
LENGTHS = tuple(random.Random(0).randint(8, 192) for _ in range(32))
COST = CostModel()
DISTILL_S, SWAP_S = 2.0, 0.1
README = Path(__file__).resolve().parents[1] / "schedulers" / "README.md"

# --------------------------------------------------------------------------------------------
# synthetic traces

AlphaAt = Callable[[int, int, random.Random], float]
"""Per-token acceptance of the serving drafter at (step, step it was installed, rng)."""

TRACES: dict[str, AlphaAt] = {
    "flat": lambda step, installed, rng: 0.75,
    "slow_decay": lambda step, installed, rng: 0.85 * 0.97 ** (step - installed),
    "fast_decay": lambda step, installed, rng: 0.9 * 0.6 ** (step - installed),
    "collapse": lambda step, installed, rng: 0.8 if step < 12 or installed >= 12 else 0.15,
    "noisy": lambda step, installed, rng: min(1.0, max(0.0, 0.8 * 0.985 ** (step - installed) + rng.gauss(0, 0.05))),
}
FRESH_ALPHA = 0.85


def observation(step: int, alpha: float, installed: int, refreshed: bool, schedule: KSchedule, predicted: bool) -> Observation:
    k = schedule if isinstance(schedule, int) else max(k for _, _, k in schedule)
    drafts = 2000 if k else 0
    gen_s = COST.predict_gen_s(LENGTHS, alpha, schedule)
    return Observation(
        step=step,
        drafts=drafts,
        draft_tokens=k * drafts,
        accepted=round((tokens_per_verify(alpha, k) - 1) * drafts),
        k=k,
        alpha_serving=alpha,
        accept_len_serving=tokens_per_verify(alpha, k),
        tv_serving=1.0 - alpha,
        gen_s=gen_s,
        gen_tokens=sum(LENGTHS),
        step_s=gen_s + 5.0,
        last_distill_s=DISTILL_S if refreshed else math.nan,
        last_swap_s=SWAP_S if refreshed else math.nan,
        steps_since_refresh=step - installed,
        predicted_gen_s_fresh=COST.predict_gen_s(LENGTHS, FRESH_ALPHA, schedule) if predicted else math.nan,
        predicted_gen_s_now=gen_s if predicted else math.nan,
        completion_lengths=LENGTHS,
    )


def trace(kind: str, steps: int = 40, seed: int = 0) -> Iterator[Observation]:
    """One run's observations; send each step's Decision back. A refresh installs a fresh drafter for
    the next step; a k schedule applies from the next step. Generation is timed by COST. The noisy
    trace leaves the cost model's predictions out (NaN), so policies fall back on acceptance levels."""
    alpha_at, rng = TRACES[kind], random.Random(seed)
    installed, refreshed, schedule = 0, False, K
    for step in range(steps):
        alpha = alpha_at(step, installed, rng)
        decision = yield observation(step, alpha, installed, refreshed, schedule, predicted=kind != "noisy")
        if decision.refresh:
            installed, refreshed = step + 1, True
        if decision.k_schedule is not None:
            schedule = decision.k_schedule


class Driver:
    """Feeds a trace to a policy one step at a time (the policy may be swapped mid-trace)."""

    def __init__(self, observations: Iterator[Observation]):
        self.observations = observations
        self.next: Observation | None = next(observations)

    def step(self, policy: RefreshPolicy) -> Decision:
        assert self.next is not None
        policy.observe(self.next)
        decision = policy.decide()
        try:
            self.next = self.observations.send(decision)
        except StopIteration:
            self.next = None
        return decision

    def run(self, policy: RefreshPolicy, steps: int | None = None) -> list[Decision]:
        decisions = []
        while self.next is not None and (steps is None or len(decisions) < steps):
            decisions.append(self.step(policy))
        return decisions


def refresh_steps(decisions: list[Decision]) -> list[int]:
    return [step for step, d in enumerate(decisions) if d.refresh]


# --------------------------------------------------------------------------------------------
# the contract every registered policy meets (also applied to the README's example)


def check_runs_within_min_interval(name: str, kind: str) -> None:
    policy = make_refresh_policy(name, seed=0)
    decisions = Driver(trace(kind)).run(policy)
    assert len(decisions) == 40
    for d in decisions:
        assert isinstance(d, Decision) and isinstance(d.refresh, bool) and d.reason
        if d.k_schedule is not None:
            assert all(lo <= hi and k >= 0 for lo, hi, k in d.k_schedule)
            assert all(a[1] < b[0] for a, b in zip(d.k_schedule, d.k_schedule[1:])), "ranges overlap"
    steps = refresh_steps(decisions)
    assert all(b - a >= policy.min_interval() for a, b in zip(steps, steps[1:])), (steps, policy.min_interval())


def check_deterministic(name: str, kind: str) -> None:
    first = Driver(trace(kind, seed=5)).run(make_refresh_policy(name, seed=3))
    second = Driver(trace(kind, seed=5)).run(make_refresh_policy(name, seed=3))
    assert first == second


def check_resumes_exactly(name: str, kind: str, at: int = 17) -> None:
    straight = Driver(trace(kind)).run(make_refresh_policy(name, seed=1))
    driver = Driver(trace(kind))
    before = make_refresh_policy(name, seed=1)
    head = driver.run(before, steps=at)
    state = json.loads(json.dumps(before.state_dict()))  # what a checkpoint holds
    after = make_refresh_policy(name, seed=1)
    after.load_state_dict(state)
    assert json.dumps(after.state_dict()) == json.dumps(before.state_dict())
    assert head + driver.run(after) == straight


def check_config_round_trips_through_toml(name: str) -> None:
    cls = REFRESH_POLICIES.get(name)
    default = cls.Config()
    text = tomli_w.dumps(to_dict(default))
    assert from_dict(cls.Config, tomllib.loads(text), prefix="controller.args.") == default
    assert make_refresh_policy(name, tomllib.loads(text)).config == default


def check_documented(name: str) -> None:
    cls = REFRESH_POLICIES.get(name)
    assert cls.description and "\n" not in cls.description
    for field_name, _, _, doc in section_fields(cls.Config):
        assert doc.strip(), f"{name}: config field {field_name!r} has no docstring"


CONTRACT_TRACES = list(TRACES)


@pytest.mark.parametrize("kind", CONTRACT_TRACES)
@pytest.mark.parametrize("name", REFRESH_POLICIES.names())
def test_runs_and_never_refreshes_more_often_than_min_interval(name, kind):
    check_runs_within_min_interval(name, kind)


@pytest.mark.parametrize("kind", CONTRACT_TRACES)
@pytest.mark.parametrize("name", REFRESH_POLICIES.names())
def test_deterministic_for_a_seed(name, kind):
    check_deterministic(name, kind)


@pytest.mark.parametrize("kind", CONTRACT_TRACES)
@pytest.mark.parametrize("name", REFRESH_POLICIES.names())
def test_state_dict_resumes_mid_trace_identically(name, kind):
    check_resumes_exactly(name, kind)


@pytest.mark.parametrize("name", REFRESH_POLICIES.names())
def test_default_config_round_trips_through_toml(name):
    check_config_round_trips_through_toml(name)


@pytest.mark.parametrize("name", REFRESH_POLICIES.names())
def test_description_and_every_config_field_documented(name):
    check_documented(name)


def test_describe_policies_lists_every_policy_and_field():
    text = describe_policies()
    for name in REFRESH_POLICIES.names():
        assert f"{name}: {REFRESH_POLICIES.get(name).description}" in text
    assert "  n: int = 1\n      Refresh every n steps" in text
    assert "refresh.drop: float = 0.15" in text  # adaptive_k's nested threshold section, flattened


# --------------------------------------------------------------------------------------------
# each policy's own behaviour


@pytest.mark.parametrize("kind", CONTRACT_TRACES)
def test_never_never_refreshes(kind):
    assert refresh_steps(Driver(trace(kind)).run(make_refresh_policy("never"))) == []


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_every_n_refreshes_exactly_every_n_steps(n):
    decisions = Driver(trace("flat")).run(make_refresh_policy("every_n", {"n": n}))
    assert refresh_steps(decisions) == list(range(n - 1, 40, n))


def test_threshold_fires_on_collapse_and_not_on_flat():
    collapse = refresh_steps(Driver(trace("collapse")).run(make_refresh_policy("threshold")))
    assert collapse and 12 <= collapse[0] <= 14  # promptly after the collapse at step 12
    assert len(collapse) == 1  # the refreshed drafter recovers; nothing more to do
    assert refresh_steps(Driver(trace("flat")).run(make_refresh_policy("threshold"))) == []


def _accept_len_obs(step: int, accept_len: float, since: int) -> Observation:
    drafts = 1000
    return Observation(step=step, drafts=drafts, draft_tokens=K * drafts, accepted=round((accept_len - 1) * drafts), k=K, steps_since_refresh=since)


def test_threshold_hysteresis_when_a_refresh_does_not_happen():
    policy = make_refresh_policy("threshold", {"drop": 0.2, "ema": 1.0, "min_interval": 1})
    levels = [3.0, 3.0, 2.2, 2.2, 2.2, 2.9, 2.2]  # level 3.0; fires below 2.4, re-arms above 2.7
    decisions = []
    for step, accept_len in enumerate(levels):  # the refresh is never carried out (no fresh drafter)
        policy.observe(_accept_len_obs(step, accept_len, since=step))
        decisions.append(policy.decide().refresh)
    assert decisions == [False, False, True, False, False, False, True]


@pytest.mark.parametrize("name", ["threshold", "adaptive_k"])
def test_a_refused_refresh_is_asked_for_again(name):
    """Issue 16: after one refused candidate the trigger stayed disarmed, and the policy behaved like
    `never` for the rest of the run. Told the refresh was refused, it asks again after min_interval."""
    args = {"drop": 0.2, "ema": 1.0, "min_interval": 2}
    policy = make_refresh_policy(name, args if name == "threshold" else {"refresh": args})
    fired, outcome = [], ""
    for step in range(10):
        level = 3.0 if step < 2 else 2.0  # acceptance collapses at step 2 and never recovers
        obs = dataclasses.replace(_accept_len_obs(step, level, since=step), refresh_outcome=outcome)
        policy.observe(obs)
        decision = policy.decide()
        fired.append(decision.refresh)
        outcome = "refuse" if decision.refresh else ""  # the controller refuses every candidate
    assert fired[2] and sum(fired) >= 3, fired
    assert all(not (a and b) for a, b in zip(fired, fired[1:]))  # never two in a row (min_interval 2)


def test_threshold_rebaselines_after_a_refresh():
    policy = make_refresh_policy("threshold", {"drop": 0.2, "ema": 1.0, "min_interval": 1})
    for step, (accept_len, since) in enumerate([(3.0, 0), (2.2, 1), (2.2, 0), (2.2, 1)]):
        policy.observe(_accept_len_obs(step, accept_len, since))
        fired = policy.decide().refresh
    assert not fired  # the new drafter's level is 2.2: no drop relative to it


def _drift_fires(args: dict, alphas: list[float], since: list[int] | None = None) -> list[bool]:
    policy = make_refresh_policy("drift", {"min_interval": 1, **args})
    fired = []
    for step, alpha in enumerate(alphas):
        steps_since = since[step] if since else step
        policy.observe(Observation(step=step, alpha_serving=alpha, tv_serving=1 - alpha, steps_since_refresh=steps_since))
        fired.append(policy.decide().refresh)
    return fired


@pytest.mark.parametrize("signal", ["alpha", "tv"])
def test_drift_fires_when_teacher_forced_acceptance_drops(signal):
    fired = _drift_fires({"signal": signal, "threshold": 0.1}, [0.8, 0.78, 0.75, math.nan, 0.7, 0.65])
    assert fired == [False, False, False, False, True, True]  # 0.7 < 0.9 x 0.8; NaN = not measured


def test_drift_peak_baseline_measures_the_fall_from_the_highest_acceptance_since_the_refresh():
    # RL lifts acceptance from 0.80 to 0.90 before the shift: 0.79 is a 12% fall from the peak
    # but only 1% below the first measurement.
    rise_then_fall = [0.80, 0.85, 0.90, 0.88, 0.79, 0.70]
    assert _drift_fires({"baseline": "first"}, rise_then_fall) == [False] * 5 + [True]  # 0.70 < 0.72
    assert _drift_fires({"baseline": "peak"}, rise_then_fall) == [False] * 4 + [True, True]  # 0.79 < 0.81
    # A new drafter starts a new peak: 0.70 after the refresh is its own baseline, not a fall from 0.90.
    assert _drift_fires({"baseline": "peak"}, [0.90, 0.70, 0.70, 0.66], since=[0, 1, 0, 1]) == [False, True, False, False]


def test_drift_max_interval_refreshes_on_time_while_acceptance_holds():
    flat = [0.9] * 10
    assert _drift_fires({"max_interval": 4}, flat) == [False, False, False, True, False, False, False, True, False, False]
    # A fall still fires at once and restarts the clock: 0.7 at step 5 (< 0.81), then 4 steps on.
    fall = [0.9] * 5 + [0.7] + [0.9] * 6
    since = [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5]  # the refreshes at steps 3 and 5 swapped
    assert [i for i, f in enumerate(_drift_fires({"max_interval": 4}, fall, since)) if f] == [3, 5, 9]
    assert _drift_fires({}, flat) == [False] * 10  # off by default
    with pytest.raises(ConfigError, match="controller.args.max_interval"):
        make_refresh_policy("drift", {"max_interval": 1, "min_interval": 2})


def test_drift_max_interval_counts_from_a_refused_request_and_survives_a_resume():
    """A refused candidate leaves the old drafter serving (steps_since_refresh keeps counting) but
    restarts the clock: the next time-based request comes max_interval steps after the refused one.
    A policy restored from its state_dict between two requests fires on the same step."""
    def obs(step):
        return Observation(step=step, alpha_serving=0.9, tv_serving=0.1, steps_since_refresh=step)

    policy = make_refresh_policy("drift", {"max_interval": 3})
    fired = []
    for step in range(5):
        policy.observe(obs(step))
        fired.append(policy.decide().refresh)
    resumed = make_refresh_policy("drift", {"max_interval": 3})
    resumed.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    for step in range(5, 9):
        resumed.observe(obs(step))
        fired.append(resumed.decide().refresh)
    assert [i for i, f in enumerate(fired) if f] == [2, 5, 8]


def test_drift_fires_on_decaying_trace_and_not_on_flat():
    assert refresh_steps(Driver(trace("slow_decay")).run(make_refresh_policy("drift")))
    assert refresh_steps(Driver(trace("flat")).run(make_refresh_policy("drift"))) == []


def _cost_obs(step: int, distill_s: float, **kw) -> Observation:
    return Observation(step=step, steps_since_refresh=step + 1, last_distill_s=distill_s, last_swap_s=0.5, **kw)


def test_cost_benefit_refreshes_when_savings_over_horizon_exceed_cost():
    # 1 s per step to gain x horizon 10 = 10 s > 2.5 s of refresh
    policy = make_refresh_policy("cost_benefit", {"horizon": 10, "margin": 1.0, "ema": 1.0})
    policy.observe(_cost_obs(0, 2.0, predicted_gen_s_now=3.0, predicted_gen_s_fresh=2.0))
    assert policy.decide().refresh


def test_cost_benefit_holds_when_refreshes_are_expensive():
    policy = make_refresh_policy("cost_benefit", {"horizon": 10, "margin": 1.0, "ema": 1.0})
    policy.observe(_cost_obs(0, 50.0, predicted_gen_s_now=3.0, predicted_gen_s_fresh=2.0))
    assert not policy.decide().refresh
    assert policy.refresh_cost_s() == 50.5


def test_cost_benefit_derives_savings_from_acceptance_without_predictions():
    policy = make_refresh_policy("cost_benefit", {"horizon": 5, "prior_refresh_s": 4.0, "ema": 1.0, "min_interval": 1})
    policy.observe(Observation(step=0, k=K, alpha_serving=0.8, gen_s=10.0, steps_since_refresh=0))
    assert not policy.decide().refresh  # fresh: nothing to save
    policy.observe(Observation(step=1, k=K, alpha_serving=0.4, gen_s=10.0, steps_since_refresh=1))
    expected = 10.0 * (1 - tokens_per_verify(0.4, K) / tokens_per_verify(0.8, K))
    assert policy.saving_s == pytest.approx(expected)
    assert policy.refresh_cost_s() == 4.0  # the prior: no refresh measured yet
    assert 5 * expected > 4.0 and policy.decide().refresh


def test_cost_benefit_refreshes_less_often_the_more_it_demands_back():
    counts = [len(refresh_steps(Driver(trace("slow_decay")).run(make_refresh_policy("cost_benefit", {"horizon": 30, "margin": m})))) for m in (0.25, 1.0, 4.0)]
    assert counts[0] > counts[1] > counts[2]


def _adaptive_k_schedule(alpha: float, keep_measuring: bool = True, **cost) -> tuple[tuple[int, int, int], ...]:
    policy = make_refresh_policy("adaptive_k", {"calibrate": False, "keep_measuring": keep_measuring, "cost": cost})
    policy.observe(Observation(step=0, k=K, alpha_serving=alpha, completion_lengths=LENGTHS, gen_s=1.0))
    schedule = policy.decide().k_schedule
    assert schedule is not None and schedule[0][0] == 1 and schedule[-1][1] == 256
    return schedule


def test_adaptive_k_schedule_beats_both_never_and_always_drafting_when_drafting_is_expensive():
    cost = {"d0": 2e-3, "d1": 2e-4}  # per-sequence drafting as dear as the target's
    schedule = _adaptive_k_schedule(0.95, keep_measuring=False, **cost)
    model = make_refresh_policy("adaptive_k", {"cost": cost}).cost_model
    never, always = ((1, 256, 0),), ((1, 256, K),)
    assert model.predict_gen_s(LENGTHS, 0.95, schedule) <= min(model.predict_gen_s(LENGTHS, 0.95, s) for s in (never, always))


def test_adaptive_k_does_not_draft_with_poor_acceptance_except_to_keep_measuring():
    assert _adaptive_k_schedule(0.05, keep_measuring=False) == ((1, 256, 0),)
    assert _adaptive_k_schedule(0.05) == ((1, 1, 1), (2, 256, 0))  # the batch's last sequence drafts k = 1


def test_adaptive_k_schedules_for_the_restored_drafter_when_it_refreshes():
    decisions = Driver(trace("collapse")).run(make_refresh_policy("adaptive_k"))
    refresh = next(d for d in decisions if d.refresh)
    assert "for alpha 0.800" in refresh.reason  # planned for the post-refresh level (0.8), not the collapse (0.15)


def test_adaptive_k_waits_for_an_acceptance_measurement():
    policy = make_refresh_policy("adaptive_k")
    policy.observe(Observation(step=0, k=0))
    assert policy.decide().k_schedule is None


def test_adaptive_k_refreshes_like_threshold_on_collapse():
    steps = refresh_steps(Driver(trace("collapse")).run(make_refresh_policy("adaptive_k")))
    assert steps and 12 <= steps[0] <= 14


def test_adaptive_k_calibrates_its_cost_model_to_the_measured_timings():
    policy = make_refresh_policy("adaptive_k", {"cost": {"t0": 1e-3, "t1": 1e-3}})  # priors far off the trace's
    Driver(trace("flat")).run(policy, steps=10)
    schedule = policy.schedule  # in force since step 1; the trace times generation with COST
    measured = COST.predict_gen_s(LENGTHS, 0.75, schedule)
    uncalibrated = make_refresh_policy("adaptive_k", {"cost": {"t0": 1e-3, "t1": 1e-3}}).cost_model
    assert abs(uncalibrated.predict_gen_s(LENGTHS, 0.75, schedule) / measured - 1) > 0.5
    assert policy.cost_model.predict_gen_s(LENGTHS, 0.75, schedule) == pytest.approx(measured, rel=0.02)


# --------------------------------------------------------------------------------------------
# registry and config errors


def test_registry_refuses_a_duplicate_name():
    class Impostor(RefreshPolicy):
        pass

    with pytest.raises(ValueError, match="already registered"):
        REFRESH_POLICIES.register("threshold")(Impostor)


def test_registry_typo_lists_the_known_names():
    with pytest.raises(UnknownNameError) as err:
        REFRESH_POLICIES.get("threshhold")
    assert "'threshold'" in str(err.value)
    for name in REFRESH_POLICIES.names():
        assert name in str(err.value)


def test_bad_config_key_names_the_key():
    with pytest.raises(ConfigError, match=r"controller\.args\.m\b"):
        make_refresh_policy("every_n", {"m": 2})
    with pytest.raises(ConfigError, match=r"controller\.args\.refresh\.dorp"):
        make_refresh_policy("adaptive_k", {"refresh": {"dorp": 0.1}})


@pytest.mark.parametrize(
    "name, args, key",
    [("every_n", {"n": 0}, "n"), ("threshold", {"drop": 1.5}, "drop"), ("drift", {"threshold": 0.0}, "threshold"),
     ("cost_benefit", {"horizon": 0}, "horizon"), ("adaptive_k", {"refresh": {"ema": 0.0}}, "refresh.ema"),
     ("adaptive_k", {"cost": {"t0": -1.0}}, "cost")],
)
def test_bad_config_value_names_the_key(name, args, key):
    with pytest.raises(ConfigError, match=re.escape(f"controller.args.{key}")):
        make_refresh_policy(name, args)


def test_cli_overrides_reach_the_policy_config():
    cfg = load_config("smoke", overrides=["controller.policy=adaptive_k", "controller.args.refresh.drop=0.3", "controller.args.ks=[0, 2]"])
    policy = make_refresh_policy(cfg.controller.policy, cfg.controller.args)
    assert policy.config.refresh.drop == 0.3 and policy.config.ks == (0, 2)


# --------------------------------------------------------------------------------------------
# the README's worked example really runs and meets the contract


def readme_example() -> tuple[str, str]:
    """(policy name, code) of the example in README's 'Add a refresh policy in one file' section."""
    section = README.read_text().split("## Add a refresh policy in one file", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return re.search(r'REFRESH_POLICIES\.register\("(\w+)"\)', code).group(1), code


def test_readme_example_registers_and_meets_the_contract(tmp_path, monkeypatch):
    name, code = readme_example()
    package = tmp_path / "readme_policies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    scratch_registry(monkeypatch, REFRESH_POLICIES)  # registration undone afterwards
    try:
        importlib.import_module(f"readme_policies.{name}")
        assert name in REFRESH_POLICIES.names()
        for kind in CONTRACT_TRACES:
            check_runs_within_min_interval(name, kind)
            check_deterministic(name, kind)
            check_resumes_exactly(name, kind)
        check_config_round_trips_through_toml(name)
        check_documented(name)
        assert f"{name}: " in describe_policies()
        assert refresh_steps(Driver(trace("collapse")).run(make_refresh_policy(name)))  # it does react
        assert refresh_steps(Driver(trace("flat")).run(make_refresh_policy(name))) == []
    finally:
        for module in ("readme_policies", f"readme_policies.{name}"):
            sys.modules.pop(module, None)
