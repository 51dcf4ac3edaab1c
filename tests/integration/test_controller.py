"""Co-training in the live engine: distil against the drifted policy, gate, hot-swap in place.

One GRPO run (EAGLE-3, every-step refresh policy) is shared by the tests of this module."""
import copy
import math

import pytest
import torch

from codraft.drafter import DrafterMismatch, load_drafter, target_parts
from codraft.engine import Sampling

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tiny_overrides, tmp_path_factory):
    from codraft.configfile import load_config
    from codraft.runner import Run

    out = tmp_path_factory.mktemp("cotrain")
    cfg = load_config("smoke", overrides=tiny_overrides + [
        "drafter.kind=eagle3", "drafter.warmup_steps=60", "drafter.batch_size=16", "controller.policy=every_n",
        "controller.distill_steps=10", "run.steps=3", "grpo.lr=3e-4", f"output.dir={out}",
    ])
    r = Run(cfg, out)
    records = r.train()
    yield r, records
    r.close()


def measured_acceptance(r, prompts, seed=5, n=8):
    return r.parts.engine.generate(prompts, n=n, sampling=Sampling(1.0, 1.0, 40), seed=seed).acceptance


def measured_accept_len(r, prompts, seed=5, n=8):
    return measured_acceptance(r, prompts, seed, n).accept_len


def test_run_logs_controller_and_spec_metrics(run):
    r, records = run
    steps = [x for x in records if "reward/mean" in x]
    for key in ("spec/accept_len", "spec/accept_rate", "spec/accept_pos_0", "spec/drafts", "spec/draft_tokens", "spec/accepted",
                "controller/decision", "controller/reason", "drafter/version", "drafter/alpha_serving", "buffer/examples",
                "drafter/policy_kl", "controller/watchdog", "time/control_s", "train/entropy"):
        assert key in steps[0], key
    decisions = [x["controller/decision"] for x in steps]
    assert set(decisions) <= {"swap", "refuse"}  # every_n(1) asks for a refresh every step
    swapped = [x for x in steps if x["controller/decision"] == "swap"]
    for x in swapped:  # decided on the gate groups, reported on the report groups: after need not beat before there
        assert math.isfinite(x["drafter/alpha_after"]) and math.isfinite(x["drafter/alpha_before"])
        assert x["time/swap_s"] > 0 and x["time/distill_s"] > 0 and x["time/control_s"] > 0
    for x in steps:
        assert "drafter/policy_kl" in x and x["controller/watchdog"] in ("ok", "low")
    assert steps[-1]["drafter/version"] == len(swapped)
    # RUN_DIR/drafter holds the serving drafter
    on_disk = load_drafter(r.dir / "drafter", r.parts.trainer.policy)
    for name, t in r.parts.controller.serving.serving_weights().items():
        assert torch.allclose(t.detach().float().to(torch.bfloat16).float(), on_disk.serving_weights()[name].float(), atol=1e-2), name


def test_distilled_drafter_raises_acceptance_after_swap(run):
    r, _ = run
    c = r.parts.controller
    prompts = [p["ids"] for p in r.parts.prompts.held_out]
    # make the serving drafter stale: perturb the policy (and sync it), as RL drift would
    torch.manual_seed(0)
    with torch.no_grad():
        for p in r.parts.trainer.policy.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    r.parts.engine.load_policy_weights(r.parts.trainer.policy.state_dict().items())
    stale = measured_acceptance(r, prompts, n=24)  # a few thousand drafts
    # record fresh rollouts of the drifted policy through the controller's own hook, then refresh
    from codraft.batch import make_batch

    gen = r.parts.engine.generate(prompts, n=8, sampling=Sampling(1.0, 1.0, 40), seed=9)
    batch = make_batch([prompts[x.prompt_index] for x in gen.completions], [x.token_ids for x in gen.completions], r.parts.prompts.pad_id)
    r.parts.trainer.score(batch, on_forward=c.on_policy_forward(None))
    examples = [e for _, e in c.data.pending]
    c.data.pending = []
    c.data.gates.append(examples[:8])  # the gate decides (gate_steps = 1: this step's half alone)
    c.data.report = examples[8:16]  # the report measures
    c.data.buffer.append(examples[16:])
    candidate = copy.deepcopy(c.serving)
    from codraft.distill import distill, teacher_forced_alpha

    parts, vocab = target_parts(r.parts.trainer.policy), r.parts.trainer.policy.config.vocab_size
    distill(candidate, examples[16:], parts, steps=150, k=c.k, loss="fkl", lr=1e-3, batch_size=16, vocab=vocab)
    before = teacher_forced_alpha(c.serving, c.data.report, parts, c.k, vocab).accept_len
    result = c.consider(candidate)
    assert result["controller/decision"] == "swap"
    assert result["drafter/alpha_after"] > before
    fresh = measured_acceptance(r, prompts, n=24)
    # one-sided z-test at significance 0.001 (z > 3.09) on the mean acceptance lengths
    z = (fresh.accept_len - stale.accept_len) / (fresh.accept_len_stderr**2 + stale.accept_len_stderr**2) ** 0.5
    print(f"measured acceptance length: stale {stale.accept_len:.3f} -> after swap {fresh.accept_len:.3f} (z = {z:.1f}); "
          f"teacher-forced {before:.3f} -> {result['drafter/alpha_after']:.3f}")
    assert z > 3.09


def test_bad_candidate_is_refused_and_old_drafter_keeps_serving(run):
    r, _ = run
    c = r.parts.controller
    prompts = [p["ids"] for p in r.parts.prompts.held_out]
    version, before = c.version, measured_accept_len(r, prompts, seed=21)
    files = (r.dir / "drafter" / "model.safetensors").read_bytes()
    bad = copy.deepcopy(c.serving)
    with torch.no_grad():
        for p in bad.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    result = c.consider(bad)
    assert result["controller/decision"] == "refuse" and "<=" in result["controller/reason"]
    assert c.version == version and measured_accept_len(r, prompts, seed=21) == before
    assert (r.dir / "drafter" / "model.safetensors").read_bytes() == files


def test_misshaped_candidate_errors_before_touching_the_engine(run):
    r, _ = run
    c = r.parts.controller
    prompts = [p["ids"] for p in r.parts.prompts.held_out]
    before = measured_accept_len(r, prompts, seed=22)
    wrong = copy.deepcopy(c.serving)
    wrong.fc = torch.nn.Linear(wrong.fc.in_features, wrong.fc.out_features + 8, bias=False)
    with pytest.raises(DrafterMismatch, match="does not fit the serving one"):
        c.swap(wrong)
    nonfinite = copy.deepcopy(c.serving)
    with torch.no_grad():
        nonfinite.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        c.swap(nonfinite)
    assert measured_accept_len(r, prompts, seed=22) == before


def test_outputs_after_a_swap_are_still_lossless(run, tiny_cfg, tiny_policy_dir):
    from codraft.lossless import check_lossless
    from codraft.vllm_engine import VLLMEngine

    r, _ = run
    assert r.parts.controller.version >= 1
    plain = VLLMEngine(tiny_cfg, tiny_policy_dir)
    try:
        plain.load_policy_weights(r.parts.trainer.policy.state_dict().items())
        r.parts.engine.load_policy_weights(r.parts.trainer.policy.state_dict().items())
        report = check_lossless(plain, r.parts.engine, [p["ids"] for p in r.parts.prompts.held_out[:6]], samples_per_prompt=160, positions=10, alpha=0.01, seed=13)
        assert report.passed, f"min p {report.min_p:.2e}"
    finally:
        plain.close()


def test_watchdog_restores_a_drafter_corrupted_behind_the_controllers_back(tiny_overrides, tmp_path):
    """Acceptance collapsing after a weight sync because the engine holds stale or broken drafter
    weights (reported by users of several RL frameworks): the watchdog sees live acceptance far below
    the teacher-forced prediction, republishes the serving drafter, and acceptance comes back."""
    from codraft.configfile import load_config
    from codraft.loop import grpo_step
    from codraft.runner import Run

    cfg = load_config("smoke", overrides=tiny_overrides + [
        "drafter.kind=eagle3", "drafter.warmup_steps=60", "drafter.batch_size=16", "controller.policy=never",
        "controller.watchdog=0.5", "controller.watchdog_patience=1", "run.steps=4", "run.eval_every=0", f"output.dir={tmp_path}",
    ])
    r = Run(cfg, tmp_path)
    try:
        healthy = grpo_step(0, r.parts)
        assert healthy["controller/watchdog"] == "ok"
        serving = r.parts.controller.serving.serving_weights()
        torch.manual_seed(0)
        r.parts.engine.load_drafter_weights({n: torch.randn_like(t) * 0.02 if t.is_floating_point() else t for n, t in serving.items()})
        broken = grpo_step(1, r.parts)
        restored = grpo_step(2, r.parts)
    finally:
        r.close()
    print(f"accept_len healthy {healthy['spec/accept_len']:.2f}, corrupted {broken['spec/accept_len']:.2f}, after the watchdog {restored['spec/accept_len']:.2f}")
    assert broken["controller/watchdog"] == "republished" and broken["spec/accept_len"] < 1.2
    assert restored["controller/watchdog"] == "ok"
    assert restored["spec/accept_len"] > 1 + 0.7 * (healthy["spec/accept_len"] - 1)
