"""`codraft run` under torchrun: 2 gloo ranks (DDP) take the same steps as one process.

Both runs use the plain-PyTorch rollout engine (the engine lives on the main rank either way, so
the rollouts of step 0 are the same) and no drafter; the 2-rank job splits each step's batch over
its ranks. Compared: step 0's rewards exactly, its loss to 1e-5 relative, and the final policy
weights (fp32; sums of per-rank gradients against one process's sum, so they differ by rounding).
Adam divides each gradient by its running scale, which turns rounding into visible differences for
the rare weights whose gradient is near zero: the bounds are 1e-8 on the mean absolute difference
(seen: 4e-10; 2.3e-9 on the testbed warm-started at lr 1e-3), 10% of Adam's largest move,
lr x steps = 2e-3, on the worst weight (seen: 1.1e-5; 6.1e-5), and 1 in 10,000 weights differing by
more than 1e-6 (seen: 6 of 661,632; 16).

Then the vLLM engine under torchrun (its engine core in child processes) with an EAGLE-3 drafter whose
k schedule the controller changes every step (`drafter.k_schedule=auto`, then the `adaptive_k`
policy): both run their steps, log `spec/k_schedule`, and the next step drafts as the schedule says."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from codraft.io import read_jsonl
from conftest import child_env

pytestmark = pytest.mark.integration

LR, STEPS = 1e-3, 2  # STEPS: run.steps in tiny_overrides


def codraft_run(out, overrides, ranks):
    sets = [a for o in overrides for a in ("--set", o)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    cmd = launcher + ["-m", "codraft", "run", "--preset", "smoke", *sets, "--out", str(out)]
    env = child_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r for r in read_jsonl(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tiny_overrides, tiny_policy_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("torchrun")
    overrides = tiny_overrides + ["drafter.kind=none", "rollout.backend=reference", "grpo.autocast_bf16=false", f"grpo.lr={LR}", "run.threads=1"]
    return {ranks: (codraft_run(base / f"ranks{ranks}", overrides, ranks), base / f"ranks{ranks}") for ranks in (1, 2)}


def test_two_ranks_take_the_same_step_as_one_process(runs, tiny_policy_dir):
    (one, one_dir), (two, two_dir) = runs[1], runs[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2]
    assert one[0]["reward/mean"] == two[0]["reward/mean"]  # same rollouts of the same initial policy
    assert two[0]["train/loss"] == pytest.approx(one[0]["train/loss"], rel=1e-5)
    assert two[0]["train/trained_frac"] == one[0]["train/trained_frac"]
    w1, w2 = load_file(one_dir / "policy" / "model.safetensors"), load_file(two_dir / "policy" / "model.safetensors")
    assert w1.keys() == w2.keys()
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    worst, mean = diffs.max().item(), diffs.mean().item()
    assert mean < 1e-8, mean
    assert worst < 0.1 * LR * STEPS, worst
    assert (diffs > 1e-6).float().mean().item() < 1e-4  # a handful of weights, not a layer
    initial = load_file(tiny_policy_dir / "model.safetensors")
    moved = max((w1[k] - initial[k].float()).abs().max().item() for k in w1)
    assert moved > 0.5 * LR * STEPS  # the runs trained: the agreement is not that of two untouched copies


@pytest.mark.parametrize("controls", [["drafter.k_schedule=auto"], ["controller.policy=adaptive_k", "rollout.engines=2"]], ids=["k_schedule_auto", "adaptive_k_two_engines"])
def test_the_vllm_engine_takes_k_schedules_under_torchrun(controls, tiny_overrides, tmp_path):
    """These crashed: the k schedule was changed in the scheduler of an in-process engine core only.
    With two vLLM engines (one per rank), rank 0's schedule changes reach rank 1's engine too."""
    from codraft.costmodel import parse_k_schedule

    overrides = tiny_overrides + ["rollout.backend=vllm", "drafter.kind=eagle3", "run.threads=1", "run.eval_every=0", *controls]
    records = codraft_run(tmp_path / "run", overrides, ranks=2)
    steps = [r for r in records if not r.get("final")]
    assert [r["step"] for r in steps] == [0, 1]
    assert all("spec/k_schedule" in r for r in steps)
    assert steps[0]["spec/drafts"] > 0  # the warm-started drafter drafts at the built-in k everywhere
    k_max = max(k for _, _, k in parse_k_schedule(steps[0]["spec/k_schedule"], 3, 256))
    assert steps[1]["spec/draft_tokens"] <= k_max * steps[1]["spec/drafts"]  # step 1 drafted by step 0's schedule


def test_two_engines_generate_what_one_engine_does(tiny_overrides, tmp_path):
    """`rollout.engines=2`: ranks 0 and 1 each own an engine and a drafter copy and generate half the
    prompts with the seeds one engine gives those requests; the drafter swaps of rank 0's controller
    (every step: `controller.gate=false`) are replayed on rank 1's engine before the next step. So
    the rollouts, the rewards and the summed acceptance counts are those of one engine, step by step."""
    overrides = tiny_overrides + [
        "rollout.backend=reference", "drafter.kind=eagle3", "drafter.num_speculative_tokens=3", "drafter.batch_size=16", "controller.gate=false",
        "grpo.autocast_bf16=false", "run.threads=1", "run.eval_every=0", "run.steps=3", "output.samples_per_step=16",
    ]
    one = codraft_run(tmp_path / "one", overrides, ranks=2)
    two = codraft_run(tmp_path / "two", overrides + ["rollout.engines=2"], ranks=2)
    steps = lambda records: [r for r in records if not r.get("final")]  # noqa: E731
    assert [r["step"] for r in steps(two)] == [0, 1, 2]
    assert [r.get("controller/decision") for r in steps(one)][:2] == ["swap", "swap"]  # the engines served new drafters
    for a, b in zip(steps(one), steps(two)):
        for key in ("spec/drafts", "spec/draft_tokens", "spec/accepted", "gen/tokens", "reward/mean"):
            assert a[key] == b[key], (a["step"], key)
    samples = lambda run: [(s["step"], s["completion"]) for s in read_jsonl(tmp_path / run / "samples.jsonl")]  # noqa: E731
    assert samples("one") == samples("two")
