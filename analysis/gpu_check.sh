#!/usr/bin/env bash
# GPU check for a lent CUDA machine: PyTorch with CUDA, NO vLLM, no package installs, ~15 minutes in all.
# Runs, on the testbed (tiny Qwen3 + arithmetic task, built on first use into $CODRAFT_CACHE):
#   1. grpo       `codraft run` in this process with rollout.backend=reference, drafter.kind=none, 2 steps:
#                 the GRPO trainer on CUDA (the reference engine samples on the CPU: it builds its tensors there)
#   2. distill    an EAGLE-3 head on CUDA distilled against the testbed policy's CUDA forward (dense teachers,
#                 vocab 384), then against a random 151,936-token Qwen3 (sparse top-128 teachers, as Qwen3-8B)
#   3. engine     the reference rollout engine, plain and speculative, timed
#   4. cotrain    `codraft run` with an EAGLE-3 drafter refreshed every step (warm start + controller), 2 steps
# and prints seconds per stage and peak GPU memory (torch.cuda.max_memory_allocated) next to `codraft plan`'s
# estimate for the same configuration. Exits 1 if any stage failed, 3 if a package is missing.
#
#   bash analysis/gpu_check.sh              # on the GPU machine, from anywhere in the repository
#   bash analysis/gpu_check.sh --cpu        # the same Python on the CPU, smaller (a dry run of the script)
#   PYTHON=/opt/venv/bin/python bash analysis/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ "${1:-}" = "--cpu" ]; then export CUDA_VISIBLE_DEVICES=""; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export CODRAFT_LOG_LEVEL="${CODRAFT_LOG_LEVEL:-WARNING}"
exec "$PY" - "$@" <<'PYTHON'
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

CPU = "--cpu" in sys.argv
missing = [m for m in ("torch", "transformers", "tokenizers", "safetensors", "tyro", "tomli_w", "datasets", "rich", "tqdm", "scipy") if importlib.util.find_spec(m) is None]
if missing:
    print(f"gpu_check: missing packages {missing} (this machine cannot install them); nothing ran")
    sys.exit(3)

import torch  # noqa: E402

CUDA = torch.cuda.is_available() and not CPU
DEVICE = torch.device("cuda" if CUDA else "cpu")
GIB = 2**30
RESULTS: list[tuple[str, str, str]] = []  # (stage, outcome, details)
TESTBED = [  # the tiny testbed of tests/smoke_golden.py
    "model.hidden_size=128", "model.num_layers=4", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=256",
    "model.sft_steps=120", "model.sft_batch_size=32", "model.max_len=128", "task.args.max_ops=3", "task.num_train=200", "task.num_eval=8",
    "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=48", "run.eval_every=0", "run.eval_samples=1",
    "output.progress=false", "output.checkpoint_every=0", "rollout.backend=reference",
]


def gpu_key() -> str:
    """`dist.gpu` of this machine for `codraft plan` (h100-80gb when unknown or on the CPU)."""
    if not CUDA:
        return "h100-80gb"
    name, total = torch.cuda.get_device_name().lower(), torch.cuda.mem_get_info()[1] / GIB
    for key in ("gb200", "h200", "h100"):
        if key in name:
            return "h100-80gb" if key == "h100" else key
    return ("a100-80gb" if total > 60 else "a100-40gb") if "a100" in name else "h100-80gb"


def reset_peak() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if CUDA else math.nan


def stage(name):
    """Run a stage, time it, record its outcome; a failure is printed and the check goes on."""
    def wrap(fn):
        def run():
            reset_peak()
            t0 = time.perf_counter()
            try:
                details = fn()
                RESULTS.append((name, "ok", f"{time.perf_counter() - t0:.1f} s; {details}"))
            except Exception as err:  # noqa: BLE001 - every failure is reported, then the check goes on
                traceback.print_exc()
                RESULTS.append((name, "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"))
            print(f"[{name}] {RESULTS[-1][1]}: {RESULTS[-1][2]}", flush=True)
        return run
    return wrap


def plan_rank0(cfg, stage_name: str | None = None) -> float:
    """`codraft plan`'s rank-0 estimate for `cfg` on this GPU (GiB), without vLLM's share and the CUDA context
    (what max_memory_allocated sees): its peak, or one stage's sum plus the persistent state."""
    import dataclasses

    from codraft.plan import estimate

    cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, gpu=gpu_key(), nodes=1, gpus_per_node=1))
    plan = estimate(cfg)
    keep = lambda name: not name.startswith(("vLLM share", "CUDA context", "allocator slack"))  # noqa: E731
    base = sum(v[0] for name, s, v in plan.rows if s == "all" and keep(name))
    stages = {s: sum(v[0] for name, st, v in plan.rows if st == s and keep(name)) for s in ("logprob", "train", "control")}
    return (base + (stages[stage_name] if stage_name else max(stages.values()))) / GIB


def run_codraft(overrides: list[str]) -> tuple[list[dict], object]:
    from codraft.configfile import load_config
    from codraft.distributed import shutdown
    from codraft.runner import Run

    import dataclasses

    from codraft.config import TaskConfig

    small = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=16", "drafter.batch_size=4"] if CPU else []
    no_test = ["task.num_test=0"] if "num_test" in {f.name for f in dataclasses.fields(TaskConfig)} else []  # no test-split evaluation
    cfg = load_config("smoke", None, TESTBED + small + no_test + overrides)
    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run = Run(cfg, out / "run")
    try:
        records = [r for r in run.train() if not r.get("final")]  # step records (the final one is an evaluation)
    finally:
        run.close()
        shutdown(drain=True)
    return records, cfg


def stage_seconds(records: list[dict]) -> str:
    keys = sorted({k for r in records for k in r if k.startswith("time/") and k.endswith("_s")})
    return ", ".join(f"{k[5:-2]} {sum(r.get(k) or 0.0 for r in records) / len(records):.2f}" for k in keys)


@stage("grpo")
def check_grpo():
    records, cfg = run_codraft(["drafter.kind=none", f"run.steps={1 if CPU else 2}"])
    assert records and all(math.isfinite(r["train/loss"]) for r in records), "non-finite training loss"
    return f"per step: {stage_seconds(records)} s; peak GPU {peak_gib():.2f} GiB vs plan {plan_rank0(cfg):.2f} GiB"


def distill_on(policy, vocab: int, top_k: int, seqs: int, length: int, steps: int) -> str:
    from codraft.config import DrafterConfig
    from codraft.distill import distill, teacher_forced_alpha
    from codraft.drafter import build_drafter, target_parts
    from codraft.warmstart import record_examples

    drafter = build_drafter(policy, DrafterConfig(kind="eagle3")).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    pairs = [([1, 2, 3], torch.randint(4, vocab, (length - 3,), generator=g).tolist()) for _ in range(seqs)]
    examples = record_examples(policy, pairs, drafter, 0, top_k=top_k)
    assert examples[0].teacher.device.type == "cpu", "distillation examples must live in host memory"
    parts = target_parts(policy)
    reset_peak()
    t0 = time.perf_counter()
    stats = distill(drafter, examples, parts, steps=steps, k=3, loss="fkl", lr=1e-3, batch_size=2, vocab=vocab)
    train_s = time.perf_counter() - t0
    alpha = teacher_forced_alpha(drafter, examples[:4], parts, 3, vocab)
    assert math.isfinite(stats.loss_last) and 1.0 <= alpha.accept_len <= 4.0, (stats, alpha.accept_len)
    return f"{train_s / steps:.3f} s/step, loss {stats.loss_first:.3f} -> {stats.loss_last:.3f}, peak GPU {peak_gib():.2f} GiB"


@stage("distill")
def check_distill():
    from transformers import AutoModelForCausalLM, Qwen3Config

    from codraft.configfile import load_config
    from codraft.distill import resolve_top_k
    from codraft.plan import distill_bytes, model_facts
    from codraft.testbed import policy_source

    cfg = load_config("smoke", None, TESTBED + ["drafter.kind=eagle3"])
    policy = AutoModelForCausalLM.from_pretrained(policy_source(cfg), dtype=torch.float32).to(DEVICE).eval()
    small = distill_on(policy, policy.config.vocab_size, -1, 16, 96, 5 if CPU else 20)
    V, length = 151936, (128 if CPU else 1024)
    big = Qwen3Config(vocab_size=V, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(big).to(DEVICE).eval()
    assert resolve_top_k(-1, V) > 0
    large = distill_on(policy, V, -1, 4, length, 2 if CPU else 5)
    over = [f"model.max_len={length}", "drafter.kind=eagle3", "drafter.batch_size=2", "model.vocab_size=151936", "model.hidden_size=256",
            "model.intermediate_size=768", "model.num_heads=4", "model.num_kv_heads=2"]
    plan_cfg = load_config("smoke", None, TESTBED + over)
    facts = model_facts(plan_cfg)
    estimate = distill_bytes(plan_cfg, facts, sparse=True)[0] / GIB + facts.drafter * 16 / GIB
    return f"testbed (dense teachers): {small}; vocab 151,936 (sparse teachers): {large} vs plan {estimate:.2f} GiB (activations + drafter state)"


@stage("engine")
def check_engine():
    from transformers import AutoTokenizer

    from codraft.configfile import load_config
    from codraft.drafter import DRAFTERS
    from codraft.engine import Sampling
    from codraft.engines import make_engine
    from codraft.testbed import policy_source

    cfg = load_config("smoke", None, TESTBED + ["drafter.kind=eagle3"])
    path = policy_source(cfg)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok("12 + 7 =", add_special_tokens=False).input_ids, tok("3 * 4 =", add_special_tokens=False).input_ids]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=32)
    plain = make_engine(cfg, path)
    t0 = time.perf_counter()
    gen = plain.generate(prompts, 2, sampling, seed=0)
    plain_s = time.perf_counter() - t0
    drafter = DRAFTERS.get("eagle3").build(plain.policy, DRAFTERS.get("eagle3").Config())
    spec = make_engine(cfg, path, drafter, None)
    t0 = time.perf_counter()
    sgen = spec.generate(prompts, 2, sampling, seed=0)
    spec_s = time.perf_counter() - t0
    where = next(plain.policy.parameters()).device
    return (f"plain {plain_s:.2f} s for {gen.num_tokens} tokens, speculative {spec_s:.2f} s for {sgen.num_tokens} tokens "
            f"(accept len {sgen.acceptance.accept_len:.2f}); the engine's policy is on {where}")


@stage("cotrain")
def check_cotrain():
    records, cfg = run_codraft(["drafter.kind=eagle3", "drafter.warmup_steps=10", "controller.policy=every_n", "controller.distill_steps=3", f"run.steps={1 if CPU else 2}"])
    assert any(r.get("drafter/distill_steps") for r in records), "the drafter was never distilled"
    return (f"per step: {stage_seconds(records)} s; peak GPU {peak_gib():.2f} GiB vs plan {plan_rank0(cfg):.2f} GiB; "
            f"teacher-forced accept len {records[-1].get('drafter/accept_len_serving', float('nan')):.2f}")


if __name__ == "__main__":
    where = f"{torch.cuda.get_device_name()} ({torch.cuda.mem_get_info()[1] / GIB:.1f} GiB, plan key {gpu_key()})" if CUDA else "CPU (--cpu or no CUDA)"
    print(f"gpu_check: torch {torch.__version__} on {where}", flush=True)
    for check in (check_grpo, check_distill, check_engine, check_cotrain):
        check()
    print("\n" + json.dumps({"device": where, "results": RESULTS}, indent=1))
    failed = [name for name, outcome, _ in RESULTS if outcome != "ok"]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'}")
    sys.exit(1 if failed else 0)
PYTHON
