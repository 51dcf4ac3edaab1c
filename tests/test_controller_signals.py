"""The controller's signals to the refresh policy, without an engine (issue 16 defects): the cost
model's fresh-drafter prediction reaches the policy, held-out data is whole prompt groups with the
gate and the report on different groups, per-token acceptance under a k schedule, the control
stage timed and counted in the step, a refused refresh reported back to the policy."""
import math
from types import SimpleNamespace

import pytest
import torch

from codraft.acceptance import AcceptanceStats
from codraft.batch import make_batch
from codraft.controller import Controller, live_alpha
from codraft.costmodel import tokens_per_verify
from codraft.drafter import DRAFTERS, target_parts
from codraft.engine import Completion, Generation
from codraft.metrics import StageTimer
from codraft.refresh import REFRESH_POLICIES, Decision, RefreshPolicy
from tests_helpers import scratch_registry, tiny_policy

G = 4  # group size
PROMPTS = [[1, 2, 3 + i] for i in range(8)]  # the step's prompts (what a suffix drafter indexes)


class FakeEngine:
    def __init__(self):
        self.loaded = 0

    def load_drafter_weights(self, weights):
        self.loaded += 1


class Recorder(RefreshPolicy):
    """Records every observation; refreshes when told to."""

    refresh_now = False

    def decide(self) -> Decision:
        return Decision(type(self).refresh_now, "test")


@pytest.fixture
def controller(tmp_path, tiny_cfg, monkeypatch):
    import dataclasses

    scratch_registry(monkeypatch, REFRESH_POLICIES)
    REFRESH_POLICIES.register("recorder")(Recorder)
    Recorder.refresh_now = False
    policy = tiny_policy()
    cfg = dataclasses.replace(
        tiny_cfg,
        rollout=dataclasses.replace(tiny_cfg.rollout, group_size=G, prompts_per_step=8),
        controller=dataclasses.replace(tiny_cfg.controller, policy="recorder", args={}, holdout_fraction=0.25, distill_steps=2),
    )
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config())
    view = SimpleNamespace(config=policy.config, target_parts=lambda: target_parts(policy))
    c = Controller(cfg, drafter, FakeEngine(), view, tmp_path / "drafter", [(1, 256, 3)])
    return c, policy


def step_generation(n_prompts: int, acceptance: AcceptanceStats, length: int = 6) -> Generation:
    completions = [Completion(i // G, [5 + (i % 7)] * length, [-1.0] * length, True) for i in range(n_prompts * G)]
    return Generation(completions, acceptance)


def record_step(c: Controller, policy, n_prompts: int, seed: int = 0):
    """Run the logprob-stage hook over a batch of n_prompts groups (prompt-major rows)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2, int(torch.randint(3, 30, (1,), generator=g))] for _ in range(n_prompts * G)]
    completions = [torch.randint(3, 30, (6,), generator=g).tolist() for _ in range(n_prompts * G)]
    batch = make_batch(prompts, completions, 0)
    hook = c.on_policy_forward(None)
    with torch.no_grad():
        out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    hook(list(range(n_prompts * G)), batch, out, out.logits)


def stats(alpha: float, k: int, drafts: int) -> AcceptanceStats:
    per_pos = tuple(round(drafts * alpha ** (i + 1)) for i in range(k))
    return AcceptanceStats(drafts, drafts * k, sum(per_pos), per_pos)


def test_held_out_data_is_whole_prompt_groups_and_gate_and_report_differ(controller):
    c, policy = controller
    record_step(c, policy, n_prompts=8)
    groups = {id(e): i // G for i, (_, e) in enumerate(c.data.pending)}
    c.after_step(0, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
    gate = {groups[id(e)] for e in c.data.gate}
    report = {groups[id(e)] for e in c.data.report}
    train = {groups[id(e)] for e in c.data.training()}
    assert gate and report and not gate & report  # the swap is decided on other sequences than reported
    assert not (gate | report) & train  # no sibling of a held-out sequence is trained on
    assert len(c.data.gate) == G * len(gate) and len(c.data.report) == G * len(report)  # whole groups
    assert len(gate | report) == 2  # a quarter of 8 groups


def split_steps(data, steps: int, n_groups: int = 8) -> list[list]:
    """Close `steps` steps of `n_groups` prompt groups (G sentinel examples each); each step's gate half."""
    gates = []
    for step in range(steps):
        data.pending = [(g, object()) for g in range(n_groups) for _ in range(G)]
        data.close_step(step)
        gates.append(list(data.gate))
    return gates


def test_the_gate_pools_the_gate_halves_of_the_last_gate_steps_steps_none_trained_on(tiny_cfg):
    import dataclasses

    from codraft.distill_data import DistillData

    cfg = dataclasses.replace(tiny_cfg, controller=dataclasses.replace(tiny_cfg.controller, gate_steps=3, buffer_steps=3, holdout_fraction=0.25))
    data = DistillData(cfg)
    gates = split_steps(data, 4)
    pool = data.gate_pool
    assert [id(e) for e in pool] == [id(e) for g in gates[1:] for e in g]  # steps 1-3: step 0 has left
    assert len(pool) == 3 * G  # one gate group a step (2 of 8 groups held out)
    trained = {id(e) for e in data.training()}
    assert not trained & {id(e) for e in pool} and not {id(e) for e in data.report} & {id(e) for e in pool}
    assert [id(e) for e in data.held_out] == [id(e) for e in gates[-1] + data.report]  # the drift signal: this step only

    resumed = DistillData(cfg)
    resumed.load_state_dict(data.state_dict())
    assert [id(e) for e in resumed.gate_pool] == [id(e) for e in pool] and [id(e) for e in resumed.gate] == [id(e) for e in gates[-1]]
    old = DistillData(cfg)  # a checkpoint written before gate_steps: one step's gate
    old.load_state_dict({"buffer": [], "gate": gates[-1], "report": data.report})
    assert [id(e) for e in old.gate_pool] == [id(e) for e in gates[-1]] == [id(e) for e in old.gate]

    single = DistillData(tiny_cfg)  # gate_steps = 1: this step's gate groups, as before
    split_steps(single, 3)
    assert single.gate_pool == single.gate and len(single.gate) == G


def test_the_swap_is_decided_on_the_pooled_gate_and_reported_on_this_steps_report(controller, monkeypatch):
    import dataclasses

    import codraft.controller as controller_module

    c, policy = controller
    c.cfg = dataclasses.replace(c.cfg, controller=dataclasses.replace(c.cfg.controller, gate_steps=2))
    c.data = controller_module.DistillData(c.cfg)
    seen = []
    real = controller_module.teacher_forced_alpha
    monkeypatch.setattr(controller_module, "teacher_forced_alpha", lambda d, ex, *a: seen.append([id(e) for e in ex]) or real(d, ex, *a))
    gates = []
    for step in range(2):
        record_step(c, policy, 8, seed=step)
        c.after_step(step, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
        gates.append([id(e) for e in c.data.gate])
    seen.clear()
    c.consider(c.serving)
    pooled, report = gates[0] + gates[1], [id(e) for e in c.data.report]
    assert seen == [pooled, pooled, report, report]  # serving and candidate on both gate halves, then on the report half



@pytest.mark.parametrize("margin, ratio, decision", [(0.0, 0.97, "refuse"), (0.05, 0.97, "swap"), (0.05, 0.9, "refuse"), (0.0, 1.01, "swap")])
def test_the_gate_margin_swaps_a_candidate_up_to_that_fraction_worse(controller, monkeypatch, margin, ratio, decision):
    """controller.gate_margin: a candidate is refused only when its gate acceptance falls more than
    the margin below the serving drafter's; the gate's own numbers are logged with the decision."""
    import copy
    import dataclasses

    import codraft.controller as controller_module

    c, policy = controller
    c.cfg = dataclasses.replace(c.cfg, controller=dataclasses.replace(c.cfg.controller, gate_margin=margin))
    record_step(c, policy, 8)
    c.after_step(0, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
    candidate = copy.deepcopy(c.serving)
    serving = c.serving
    length = {id(serving): 2.0, id(candidate): 2.0 * ratio}
    monkeypatch.setattr(controller_module, "teacher_forced_alpha", lambda d, ex, *a: SimpleNamespace(accept_len=length[id(d)]))
    out = c.consider(candidate)
    assert out["controller/decision"] == decision
    assert out["drafter/gate_before"] == 2.0 and out["drafter/gate_after"] == pytest.approx(2.0 * ratio)
    assert (c.serving is candidate) == (decision == "swap")
    if decision == "refuse":
        assert ("0.95 x serving 2.000" if margin else "<= serving 2.000") in out["controller/reason"]


def test_the_cost_model_is_asked_about_a_fresh_drafter(controller):
    """Issue 16: Observation.predicted_gen_s_fresh was never filled, so cost_benefit never used the cost model."""
    c, policy = controller
    for step, alpha in enumerate((0.8, 0.6, 0.4)):
        record_step(c, policy, 8, seed=step)
        timer = StageTimer()
        timer.seconds["gen"] = 2.0
        c.after_step(step, PROMPTS, step_generation(8, stats(alpha, 3, 200)), timer)
    obs = c.refresh_policy.history
    assert all(math.isfinite(o.predicted_gen_s_fresh) and math.isfinite(o.predicted_gen_s_now) for o in obs)
    assert obs[-1].predicted_gen_s_fresh < obs[-1].predicted_gen_s_now  # fresh acceptance 0.8 beats 0.4 now
    assert c.fresh_alpha == pytest.approx(0.8, abs=0.02)


def test_live_alpha_under_a_k_schedule_uses_the_drafts_own_k():
    """Issue 16: alpha was inverted with the largest k even when the schedule drafted fewer tokens."""
    alpha = 0.7
    mixed = stats(alpha, 1, 500) + stats(alpha, 3, 500)  # half the drafts at k = 1, half at k = 3
    assert live_alpha(mixed, ks=(0, 1, 3)) == pytest.approx(alpha, abs=0.005)  # the schedule's k values
    assert live_alpha(mixed) == pytest.approx(alpha, abs=0.04)  # only the mean k known: close
    from codraft.costmodel import alpha_from_accept_len

    assert abs(alpha_from_accept_len(mixed.accept_len, 3) - alpha) > 0.1  # the old inversion
    assert live_alpha(stats(alpha, 3, 1000)) == pytest.approx(alpha, abs=0.01)
    assert math.isnan(live_alpha(AcceptanceStats()))
    assert tokens_per_verify(alpha, 2) == pytest.approx(1 + alpha + alpha**2)


def test_control_stage_is_timed_and_counted_in_the_step(controller):
    """Issue 16: teacher-forced acceptance and the gate ran outside every timer."""
    c, policy = controller
    Recorder.refresh_now = True
    record_step(c, policy, 8)
    timer = StageTimer()
    with timer("control"):
        record = c.after_step(0, PROMPTS, step_generation(8, stats(0.6, 3, 40)), timer)
    metrics = timer.metrics()
    assert metrics["time/control_s"] > 0 and metrics["time/distill_s"] > 0
    assert record["controller/decision"] in ("swap", "refuse")
    parts = sum(metrics[f"time/{s}_s"] for s in ("control", "index", "distill", "swap") if f"time/{s}_s" in metrics)
    assert metrics["time/step_s"] == pytest.approx(parts)  # nested stages are not counted twice


def test_the_outcome_of_a_refresh_request_reaches_the_policy(controller, monkeypatch):
    c, policy = controller
    Recorder.refresh_now = True
    monkeypatch.setattr(c, "consider", lambda candidate, timer=None: {"controller/decision": "refuse", "controller/reason": "gate"})
    record_step(c, policy, 8)
    c.after_step(0, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
    Recorder.refresh_now = False
    record_step(c, policy, 8, seed=1)
    c.after_step(1, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
    record_step(c, policy, 8, seed=2)
    c.after_step(2, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
    outcomes = [o.refresh_outcome for o in c.refresh_policy.history]
    assert outcomes == ["", "refuse", ""]


@pytest.mark.parametrize("distill_lr, expected", [(0.0, "drafter"), (4e-3, 4e-3), (5e-4, 5e-4)])
def test_a_refresh_distils_at_controller_distill_lr_else_at_the_drafters(controller, monkeypatch, distill_lr, expected):
    """controller.distill_lr sets the refresh distillation's learning rate (0 = drafter.lr, the warm start's)."""
    import dataclasses

    import codraft.controller as controller_module

    c, policy = controller
    c.cfg = dataclasses.replace(c.cfg, controller=dataclasses.replace(c.cfg.controller, distill_lr=distill_lr))
    seen = []
    real = controller_module.distill
    monkeypatch.setattr(controller_module, "distill", lambda *a, **kw: seen.append(kw["lr"]) or real(*a, **kw))
    Recorder.refresh_now = True
    record_step(c, policy, 8)
    c.after_step(0, PROMPTS, step_generation(8, stats(0.6, 3, 40)), StageTimer())
    assert seen == [c.cfg.drafter.lr if expected == "drafter" else expected]
    assert c.cfg.drafter.lr == 1e-3  # between the two rates set: neither max nor min of the two passes


def test_policy_kl_is_zero_against_itself_and_matches_a_hand_computation():
    from codraft.distill import examples_from_forward
    from codraft.drafter import Features
    from codraft.policy_drift import PolicyDrift

    policy = tiny_policy()
    drift = PolicyDrift(policy.config, temperature=1.0)
    drift.note(policy.state_dict())
    batch = make_batch([[1, 2, 3]] * 2, [[4, 5, 6], [7, 8]], 0)
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    target = torch.zeros_like(batch.completion_mask)
    target[:, :-1] = batch.completion_mask[:, 1:]
    examples = examples_from_forward(Features(batch.input_ids, batch.attention_mask), target, logits)
    assert drift.kl(examples) == pytest.approx(0.0, abs=1e-3)  # bf16 teachers against the fp32 copy
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in policy.state_dict().items()}
    drift.note(moved)
    drift.adopt()
    with torch.no_grad():
        ref = torch.log_softmax(drift.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    now = torch.log_softmax(logits.float(), -1)
    mask = target.bool()
    expected = float((now.exp() * (now - ref)).sum(-1)[mask].mean())
    assert expected > 0.01 and drift.kl(examples) == pytest.approx(expected, rel=0.05)


def test_watchdog_republishes_then_turns_drafting_off():
    from codraft.watchdog import Watchdog

    dog = Watchdog(ratio=0.5, patience=2)
    assert [dog.check(0.7, 0.7), dog.check(0.1, 0.7), dog.check(0.1, 0.7)] == ["ok", "low", "republished"]
    assert [dog.check(0.1, 0.7), dog.check(0.1, 0.7)] == ["low", "drafting_off"]
    assert dog.check(0.1, 0.7) == "off"
    dog.reset()
    assert dog.check(0.1, 0.7) == "low" and dog.check(0.6, 0.7) == "ok"  # recovered: counting starts again
    assert Watchdog(ratio=0.0).check(0.0, 0.9) == "ok"  # off
