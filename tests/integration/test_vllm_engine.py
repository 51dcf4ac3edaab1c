"""The in-process vLLM engine: weight sync is real, and a 2-step GRPO run writes every output."""
import dataclasses
import json

import pytest
import torch

from codraft.batch import token_logprobs
from codraft.configfile import load_config
from codraft.vllm_engine import CHUNK_BYTES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(tiny_cfg, tiny_policy_dir):
    from codraft.vllm_engine import VLLMEngine

    eng = VLLMEngine(tiny_cfg, tiny_policy_dir)
    yield eng
    eng.close()


def hf_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return token_logprobs(logits, torch.tensor(ids[1:]))


def test_weight_sync_changes_engine_logprobs(engine, tiny_policy_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32)
    ids = tok("Q: 4+5-3=? A: 4+5=9. 9-3=6. #### 6", add_special_tokens=False).input_ids
    before = torch.tensor(engine.prompt_logprobs(ids))
    assert (before - hf_logprobs(model, ids)).abs().max() < 0.1  # bf16 engine vs fp32 trainer

    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    target = hf_logprobs(model, ids)
    assert (before - target).abs().max() > 0.5  # the perturbation is visible before the sync

    engine.load_policy_weights(model.state_dict().items())
    assert engine.hooks["install_weight_transfer"]  # through vLLM's weight-update session, codraft's backend
    assert engine.last_sync["chunks"] == 1 and engine.last_sync["bytes"] == 0  # in process: the tensors themselves
    after = torch.tensor(engine.prompt_logprobs(ids))
    assert (after - target).abs().max() < 0.1
    assert (after - target).abs().mean() < 0.02
    assert (after - before).abs().max() > 0.5

    original = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32)
    engine.chunk_bytes = 64 * 1024  # whole layers per chunk: every layer of the policy is replaced, in many updates
    try:
        engine.load_policy_weights(original.state_dict().items())  # leave the shared engine as found
    finally:
        engine.chunk_bytes = CHUNK_BYTES
    assert engine.last_sync["chunks"] > 4
    assert (torch.tensor(engine.prompt_logprobs(ids)) - before).abs().max() < 1e-3


def test_generation_is_seeded_and_grouped(engine, tiny_cfg):
    from codraft.engine import Sampling

    prompts = [[5, 6, 7], [8, 9]]
    a = engine.generate(prompts, n=3, sampling=Sampling(1.0, 1.0, 8), seed=11)
    b = engine.generate(prompts, n=3, sampling=Sampling(1.0, 1.0, 8), seed=11)
    assert [c.prompt_index for c in a.completions] == [0, 0, 0, 1, 1, 1]
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert len({tuple(c.token_ids) for c in a.completions}) > 1  # samples of a group differ
    for c in a.completions:
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
    assert "apply_rejection_fix" not in engine.hooks and "plain_sampling_without_drafts" not in engine.hooks  # speculation only


def test_a_drafter_swap_in_process_changes_acceptance_and_swapping_back_restores_it(tiny_cfg, tiny_policy_dir):
    """Placed after the last test of the shared engine: closing an engine in process resets vLLM's
    process-wide parallel state, which an engine built before it still uses.
    The hot swap through vLLM's draft weight-update session (`start_draft_weight_update`): a random
    drafter is (almost) never accepted, and the warm-started one, swapped back, drafts as before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.engine import Sampling
    from codraft.engines import make_engine
    from codraft.task import make_task
    from codraft.warmstart import initial_drafter

    cfg = dataclasses.replace(tiny_cfg, drafter=dataclasses.replace(tiny_cfg.drafter, kind="eagle3", num_speculative_tokens=3, warmup_steps=60, batch_size=16))
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    train, held = make_task(cfg.task, cfg.task.seed).splits()
    encode = lambda rows: [tok(p, add_special_tokens=False).input_ids for p in rows["prompt"]]  # noqa: E731
    drafter, path = initial_drafter(cfg, policy, encode(train), tiny_policy_dir, tok.eos_token_id, tok.pad_token_id, log=lambda *a: None)
    eng = make_engine(cfg, tiny_policy_dir, drafter, path)
    try:
        accept = lambda: eng.generate(encode(held)[:8], n=4, sampling=Sampling(1.0, 1.0, 40), seed=5).acceptance  # noqa: E731
        before, serving = accept(), drafter.serving_weights()
        torch.manual_seed(0)
        eng.load_drafter_weights({n: (torch.randn_like(t.float()) * 0.02).to(t.dtype) if t.is_floating_point() else t for n, t in serving.items()})
        swapped = accept()
        eng.load_drafter_weights(serving)
        restored = accept()
    finally:
        eng.close()
    assert swapped.accept_len < 1.1 < before.accept_len
    assert (restored.drafts, restored.accepted) == (before.drafts, before.accepted)


def test_two_step_grpo_run_writes_outputs(tiny_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    from codraft.runner import Run

    cfg = dataclasses.replace(tiny_cfg, output=dataclasses.replace(tiny_cfg.output, dir=str(tmp_path)))
    run = Run(cfg, tmp_path)
    try:
        records = run.train()
    finally:
        run.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    from codraft.io import jsonl_line

    assert lines == [json.loads(jsonl_line(r)) for r in records]
    for key in ("reward/mean", "time/prepare_s", "time/gen_s", "time/reward_s", "time/logprob_s", "time/train_s", "time/step_s", "gen/tokens", "eval/accuracy"):
        assert key in lines[0], key
    assert lines[-1]["final"] and "eval/accuracy" in lines[-1]
    assert load_config(preset=None, path=tmp_path / "config.toml") == cfg
    samples = [json.loads(s) for s in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(run.policy_dir, dtype=torch.float32)
    changed = [n for (n, p), (_, q) in zip(trained.named_parameters(), initial.named_parameters()) if not torch.equal(p, q)]
    assert changed, "two GRPO steps left the policy unchanged"
    assert (tmp_path / "policy" / "tokenizer.json").is_file()


def test_existing_run_directory_is_refused(tiny_cfg, tmp_path):
    from codraft.runner import Run

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="already holds a run"):
        Run(tiny_cfg, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'
