"""The engine-start cost profile on a real engine (tiny testbed, EAGLE-3, eager vLLM): it times
plain and speculative batches, writes its cache, leaves the run's k table in place, and a second
call reads the cache instead of timing."""
import dataclasses
import json
import math

import pytest
import torch

pytestmark = pytest.mark.integration


def test_profile_on_a_real_engine_is_cached_and_restores_the_k_table(tiny_cfg, tiny_policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.costprofile import ProfileSettings, calibrated_cost_model, profile_cost_model
    from codraft.engine import Sampling
    from codraft.engines import make_engine
    from codraft.task import make_task
    from codraft.warmstart import initial_drafter

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    train, _ = make_task(tiny_cfg.task, tiny_cfg.task.seed).splits()
    prompts = [tok(p, add_special_tokens=False).input_ids for p in train["prompt"]]
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, cache_dir=str(tmp_path)),
                              drafter=dataclasses.replace(tiny_cfg.drafter, kind="eagle3", num_speculative_tokens=3, k_schedule="1-2:3,3-256:0",
                                                          warmup_steps=60, batch_size=16))
    drafter, path = initial_drafter(dataclasses.replace(cfg, model=tiny_cfg.model), policy, prompts, tiny_policy_dir, tok.eos_token_id,
                                    tok.pad_token_id, log=lambda *a: None)  # the warm start test_speculative.py caches
    engine = make_engine(cfg, tiny_policy_dir, drafter, path, [(1, 2, 3), (3, 256, 0)])
    try:
        settings = ProfileSettings(batches=(1, 4), ks=(1, 3), tokens=12, repeats=1, warmup_tokens=2)
        profile = profile_cost_model(engine, cfg, drafter, prompts, settings=settings, log=lambda *a: None)
        assert not profile.cached and len(profile.timings) == 6 and profile.path.is_file()
        assert {(t.batch, t.k) for t in profile.timings} == {(b, k) for b in (1, 4) for k in (0, 1, 3)}
        assert all(t.seconds > 0 and len(t.lengths) == t.batch for t in profile.timings)
        assert all(math.isnan(t.accept_len) == (t.k == 0) for t in profile.timings)  # counters only while drafting
        assert json.loads(profile.path.read_text())["hardware"]["cores"] >= 1
        assert engine.k_schedule == [(1, 2, 3), (3, 256, 0)] and engine.drafting  # the run's table again
        assert engine.generate(prompts[:1], n=1, sampling=Sampling(1.0, 1.0, 8), seed=3).acceptance.drafts > 0
        model = calibrated_cost_model(engine, cfg, drafter, prompts, settings=settings, log=lambda *a: None)
        assert dataclasses.astuple(model.costs) == pytest.approx(dataclasses.astuple(profile.model.costs))  # from the cache
        assert len(model.records) == 6 and min(dataclasses.astuple(model.costs)) >= 0
    finally:
        engine.close()
