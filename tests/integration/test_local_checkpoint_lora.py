"""A local Hugging Face checkpoint as the policy, trained as LoRA adapters, served with EAGLE-3.

The fixture writes a bf16 Qwen3 checkpoint with its tokenizer into a fresh directory (as a real
checkpoint would be, not the testbed cache), then one 2-step GRPO run on it is shared by the tests:
LoRA rank 8 through peft, an EAGLE-3 drafter built to fit the checkpoint and refreshed every step."""
import pytest
import torch
from safetensors.torch import load_file

from codraft.engine import Sampling
from codraft.lora import base_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_policy_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("local-qwen3")
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_policy_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run(tiny_overrides, checkpoint_dir, tmp_path_factory):
    from codraft.configfile import load_config
    from codraft.runner import Run

    out = tmp_path_factory.mktemp("lora-run")
    cfg = load_config("smoke", overrides=tiny_overrides + [
        f"model.path={checkpoint_dir}", "lora.rank=8", "lora.alpha=32", "grpo.lr=2e-3",
        "drafter.kind=eagle3", "drafter.warmup_steps=40", "drafter.batch_size=16",
        "controller.policy=every_n", "controller.distill_steps=5", "run.steps=2", f"output.dir={out}",
    ])
    r = Run(cfg, out)
    records = r.train()
    yield r, records
    r.close()


def test_two_grpo_steps_on_the_local_checkpoint_with_eagle3(run, checkpoint_dir):
    r, records = run
    steps = [x for x in records if "reward/mean" in x]
    assert [x["step"] for x in steps] == [0, 1] and records[-1].get("final")
    assert r.policy_dir == checkpoint_dir
    assert all(x["spec/drafts"] > 0 and 1.0 <= x["spec/accept_len"] <= 1 + r.cfg.drafter.num_speculative_tokens for x in steps)
    assert all(x["controller/decision"] in ("swap", "refuse") for x in steps)
    # the drafter was built to fit the checkpoint and RUN_DIR/policy is a plain (merged) checkpoint
    assert (r.dir / "drafter" / "model.safetensors").is_file()
    saved = load_file(r.dir / "policy" / "model.safetensors")
    assert not any(".lora_" in k or "base_layer" in k for k in saved)
    # the closing summary: acceptance first / mean / last, refreshes, and the cost model's speedup estimate
    from codraft.runner import summary_rows

    rows = dict(summary_rows(records)) | r.parts.controller.summary()
    first, mean, last = (float(x) for x in rows["acceptance length first / mean / last"].split(" / "))
    assert first == pytest.approx(steps[0]["spec/accept_len"], abs=0.005) and last == pytest.approx(steps[-1]["spec/accept_len"], abs=0.005)
    assert min(first, last) - 0.005 <= mean <= max(first, last) + 0.005
    assert rows["gen speedup vs no speculation (cost-model estimate, last step)"].endswith("x")


def test_lora_changes_only_adapter_weights(run, checkpoint_dir):
    r, _ = run
    original = load_file(checkpoint_dir / "model.safetensors")
    state = r.parts.trainer.policy.state_dict()
    trainable = {n for n, p in r.parts.trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = base_name(key)
        reference = original.get(name, original.get("model.embed_tokens.weight") if name == "lm_head.weight" else None)
        assert torch.equal(value, reference.float()), key  # bf16 -> fp32 exactly, and untouched by training
    assert any(state[k].abs().max() > 0 for k in state if ".lora_B." in k)  # B starts at 0: the adapters moved


def test_engine_logprobs_match_the_merged_policy(run, checkpoint_dir):
    from codraft.batch import make_batch
    from codraft.loop import engine_logprobs

    r, _ = run
    r.parts.engine.load_policy_weights(r.parts.policy.full_weights().items())
    prompts = [p["ids"] for p in r.parts.prompts.held_out]
    gen = r.parts.engine.generate(prompts, n=4, sampling=Sampling(1.0, 1.0, 32), seed=3)
    batch = make_batch([prompts[c.prompt_index] for c in gen.completions], [c.token_ids for c in gen.completions], r.parts.prompts.pad_id)
    mask = batch.target_mask.float()

    def gap(logp):
        return float(((engine_logprobs(batch, gen) - logp).abs() * mask).sum() / mask.sum())

    merged = gap(r.parts.trainer.score(batch, force=True).old_logp)
    from transformers import AutoModelForCausalLM

    from codraft.grpo import GRPOTrainer

    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
    unmerged = gap(GRPOTrainer(base, r.cfg.grpo).score(batch, force=True).old_logp)
    print(f"mean |engine - trainer| log-prob: merged LoRA policy {merged:.4f}, base without adapters {unmerged:.4f}")
    assert merged < 0.02  # bf16 engine against the fp32 trainer
    assert unmerged > 2 * merged  # the engine serves the adapters, not the base weights
