"""Shared fixtures: one tiny testbed (built once, cached on disk) for every test that needs a model."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
STARTUP_ENV = dict(os.environ)
"""The environment before any engine ran in the test process: vLLM sets variables in the process
that builds an engine (LD_PRELOAD, LOCAL_WORLD_SIZE, VLLM_DIST_IDENT, ...), and a torchrun job
launched with them fails to start its engine core."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a codraft process a test launches: the test process's own from before any
    engine, one OpenMP thread (the same arithmetic whatever the core count), and `extra`."""
    return {**STARTUP_ENV, "OMP_NUM_THREADS": "1", **extra}

# A testbed small enough to build in seconds, still a Qwen3 that vLLM serves on CPU and deep
# enough (4 layers) for EAGLE-3's three distinct auxiliary layers.
TINY = [
    "model.hidden_size=128",
    "model.num_layers=4",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=256",
    "model.sft_steps=120",
    "model.sft_batch_size=32",
    "model.max_len=128",
    "task.args.max_ops=3",
    "task.num_train=200",
    "task.num_eval=8",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=48",
    "rollout.kv_cache_gib=0.125",
    "run.steps=2",
    "run.eval_every=1",
    "run.eval_samples=1",
    "output.progress=false",
]


@pytest.fixture(scope="session")
def tiny_overrides():
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    from codraft.configfile import load_config

    return load_config("smoke", overrides=tiny_overrides)


@pytest.fixture(scope="session")
def tiny_policy_dir(tiny_cfg):
    from codraft.testbed import policy_source

    return policy_source(tiny_cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def tiny_setup(tiny_cfg, tiny_policy_dir):
    """The tiny testbed's tokenizer, fp32 policy (eval mode) and the task's training and held-out
    prompts as token ids, once per test module."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.task import make_task

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    train, held = make_task(tiny_cfg.task, tiny_cfg.task.seed).splits()
    enc = lambda rows: [tok(p, add_special_tokens=False).input_ids for p in rows["prompt"]]  # noqa: E731
    return {"tok": tok, "policy": policy, "train": enc(train), "held": enc(held)}
