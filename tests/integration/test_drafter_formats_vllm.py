"""A codraft EAGLE-3 drafter in vLLM's speculators format: `codraft export-drafter` writes it, plain vLLM
serves it the way a speculators checkpoint is served (`LLM(model=DIR)`: the verifier and the method come
from its config.json) and speculates with it, and codraft imports it back through `drafter.path` for a
smoke run. The drafter is the tiny testbed's cached warm start (`codraft.warmstart.initial_drafter`)."""
import dataclasses
import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from codraft.acceptance import read_vllm_counters
from codraft.io import read_jsonl

pytestmark = pytest.mark.integration
K = 3


@pytest.fixture(scope="module")
def exported(tiny_cfg, tiny_policy_dir, tmp_path_factory):
    """The warm-started EAGLE-3 drafter, in a run directory next to its policy, exported in the speculators format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.cli import main
    from codraft.task import make_task
    from codraft.warmstart import initial_drafter

    # the drafter settings of tests/integration/test_speculative.py, so the cached warm start is shared
    cfg = dataclasses.replace(tiny_cfg, drafter=dataclasses.replace(tiny_cfg.drafter, kind="eagle3", num_speculative_tokens=K, warmup_steps=60, batch_size=16))
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    train, held = make_task(cfg.task, cfg.task.seed).splits()
    encode = lambda rows: [tok(p, add_special_tokens=False).input_ids for p in rows["prompt"]]  # noqa: E731
    drafter, _ = initial_drafter(cfg, policy, encode(train), tiny_policy_dir, tok.eos_token_id, tok.pad_token_id, log=lambda *a: None)
    base = tmp_path_factory.mktemp("formats")
    (base / "run").mkdir()
    (base / "run" / "policy").symlink_to(tiny_policy_dir)
    drafter.export(base / "run" / "drafter")
    assert main(["export-drafter", str(base / "run"), "--k", str(K), "--out", str(base / "drafter-speculators")]) == 0
    return {"dir": base / "drafter-speculators", "base": base, "drafter": drafter, "policy": policy, "held": encode(held), "cfg": cfg, "policy_dir": tiny_policy_dir}


def test_vllm_reads_the_speculators_config(exported):
    """vLLM's own reader (transformers_utils/configs/speculators) and its engine-config resolution."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.transformers_utils.configs.speculators import SpeculatorsConfig

    config = json.loads((exported["dir"] / "config.json").read_text())
    assert SpeculatorsConfig.extract_vllm_speculative_config(config) == {"method": "eagle3", "num_speculative_tokens": K}
    layer = SpeculatorsConfig.extract_transformers_pre_trained_config(json.loads(json.dumps(config)))
    assert layer["architectures"] == ["Eagle3LlamaForCausalLM"] and layer["norm_before_residual"] is False
    assert layer["eagle_aux_hidden_state_layer_ids"] == list(exported["drafter"].aux_layers)
    common = dict(dtype="bfloat16", enforce_eager=True, max_model_len=exported["cfg"].model.max_len, skip_tokenizer_init=True)
    by_dir = EngineArgs(model=str(exported["dir"]), **common).create_engine_config()  # the verifier replaces the model
    assert os.path.samefile(by_dir.model_config.model, exported["policy_dir"])
    assert (by_dir.speculative_config.method, by_dir.speculative_config.num_speculative_tokens) == ("eagle3", K)
    named = EngineArgs(model=str(exported["policy_dir"]), speculative_config={"method": "eagle3", "model": str(exported["dir"]), "num_speculative_tokens": K}, **common)
    assert named.create_engine_config().speculative_config.draft_model_config.hf_config.architectures == ["Eagle3LlamaForCausalLM"]
    # without "method", vLLM takes a path whose name lacks "eagle3" for a draft model: the method must be named
    unnamed = EngineArgs(model=str(exported["policy_dir"]), speculative_config={"model": str(exported["dir"]), "num_speculative_tokens": K}, **common)
    assert unnamed.create_engine_config().speculative_config.method == "draft_model"


def test_plain_vllm_serves_the_speculators_checkpoint_and_speculates(exported):
    from vllm import LLM, SamplingParams

    cfg = exported["cfg"]
    llm = LLM(model=str(exported["dir"]), dtype="bfloat16", enforce_eager=True, max_model_len=cfg.model.max_len, seed=0, disable_log_stats=False,
              kv_cache_memory_bytes=int(cfg.rollout.kv_cache_gib * 2**30), enable_chunked_prefill=False)  # codraft's CPU settings (vllm_engine._llm_kwargs)
    try:
        spec = llm.llm_engine.vllm_config.speculative_config
        assert spec.method == "eagle3" and spec.num_speculative_tokens == K and spec.draft_model_config.model == str(exported["dir"])
        outs = llm.generate([{"prompt_token_ids": p} for p in exported["held"]], SamplingParams(temperature=0.0, max_tokens=32))
        acc = read_vllm_counters(llm.get_metrics())
    finally:
        del llm
        gc.collect()
    assert all(len(o.outputs[0].token_ids) > 0 for o in outs)
    print(f"plain vLLM, speculators checkpoint: {acc.drafts} drafts, {acc.accepted}/{acc.draft_tokens} accepted, accept len {acc.accept_len:.2f}")
    assert acc.drafts > 0 and acc.draft_tokens == K * acc.drafts and acc.accepted > 0


def test_reimported_drafter_runs_a_codraft_smoke_run(exported, tiny_overrides):
    from codraft.drafter import load_drafter

    again = load_drafter(exported["dir"], exported["policy"])
    for name, tensor in exported["drafter"].serving_weights().items():
        assert torch.equal(tensor.detach().float(), again.serving_weights()[name].detach().float()), name
    out = exported["base"] / "smoke"
    sets = tiny_overrides + ["run.steps=2", "drafter.kind=eagle3", f"drafter.num_speculative_tokens={K}", f"drafter.path={exported['dir']}"]
    proc = subprocess.run([sys.executable, "-m", "codraft", "run", "--preset", "smoke", *[a for o in sets for a in ("--set", o)], "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "spec/drafts" in r]
    assert len(steps) == 2 and all(r["spec/drafts"] > 0 for r in steps) and sum(r["spec/accepted"] for r in steps) > 0
    served = json.loads((out / "drafter" / "config.json").read_text())  # re-exported in the format codraft serves
    assert served["architectures"] == ["LlamaForCausalLMEagle3"] and served["eagle_aux_hidden_state_layer_ids"] == list(again.aux_layers)
