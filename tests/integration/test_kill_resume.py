"""SIGKILL a running `codraft run` mid-step, resume it, and compare with an uninterrupted run.

Both runs: the tiny testbed, EAGLE-3 refreshed every step (so the drafter, the refresh policy and the
distillation buffer are part of the state), a checkpoint after every step, the same seed. The killed
run dies while step 2 is under way (step 1's metrics line is on disk); `--resume` continues from the
step-1 checkpoint. Everything sampled or counted must then equal the uninterrupted run exactly
(rewards, tokens, acceptance counts, refresh decisions); losses to 1e-6 relative. Timings differ.

The same under FSDP2 with 2 torchrun ranks (gloo, the plain-PyTorch rollout engine): every rank
writes its shard of the policy and of the AdamW state into the step directory, and the kill takes
the whole job (the launcher and both ranks, as a lost machine would). The resumed run must match the
uninterrupted 2-rank run as above, and its final policy weights must equal that run's exactly."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codraft.io import read_jsonl
from conftest import child_env

pytestmark = pytest.mark.integration

EXACT = ("reward/mean", "reward/accuracy", "gen/tokens", "spec/drafts", "spec/draft_tokens", "spec/accepted", "controller/decision", "drafter/version", "eval/accuracy")
CLOSE = ("train/loss", "train/entropy", "drafter/distill_loss", "drafter/alpha_after")


FSDP = ["rollout.backend=reference", "dist.strategy=fsdp", "grpo.autocast_bf16=false", "run.threads=1"]


def command(overrides, out, resume=False, ranks=1):
    target = ["--resume", str(out)] if resume else ["--preset", "smoke", *[a for o in overrides for a in ("--set", o)], "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    return [*launcher, "-m", "codraft", "run", *target]


def job_pids(root: int) -> list[int]:
    """`root` and every process under it (torchrun starts its ranks in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def kill_during_step_2(cmd, out, env):
    """Start `cmd`, SIGKILL it and all its processes once step 1's metrics line is on disk; returns the lines seen."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 900
    while len(metric_lines(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into step 2
    for pid in job_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return metric_lines(out)


def metric_lines(out):
    path = out / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


@pytest.fixture(scope="module")
def runs(tiny_overrides, tiny_policy_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("kill-resume")
    overrides = tiny_overrides + [
        "run.steps=4", "drafter.kind=eagle3", "drafter.warmup_steps=40", "controller.policy=every_n", "controller.distill_steps=5", "output.checkpoint_every=1",
    ]
    env = child_env()
    full = subprocess.run(command(overrides, base / "full"), capture_output=True, text=True, timeout=900, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = base / "killed"
    seen = kill_during_step_2(command(overrides, killed), killed, env)
    resumed = subprocess.run(command(overrides, killed, resume=True), capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return metric_lines(base / "full"), metric_lines(killed), seen


def test_killed_mid_step(runs):
    _, _, seen = runs
    assert [r["step"] for r in seen][:2] == [0, 1]
    assert not any(r.get("final") for r in seen) and max(r["step"] for r in seen) < 3  # it died before finishing


def test_resumed_run_matches_the_uninterrupted_one(runs):
    full, resumed, _ = runs
    assert_same_steps(full, resumed)


def assert_same_steps(full, resumed):
    """No step lost or repeated; what is sampled or counted equal, losses to 1e-6 relative."""
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [0, 1, 2, 3, 4]  # none lost, none repeated
    assert resumed[-1].get("final") and full[-1].get("final")
    for a, b in zip(full, resumed):
        for key in EXACT:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
        for key in CLOSE:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_overrides, tiny_policy_dir, tmp_path_factory):
    """The uninterrupted and the killed-then-resumed 2-rank FSDP2 runs: (metrics, run dir) of each, and the lines seen at the kill."""
    base = tmp_path_factory.mktemp("kill-resume-fsdp")
    overrides = tiny_overrides + FSDP + [
        "run.steps=4", "drafter.kind=eagle3", "drafter.warmup_steps=40", "controller.policy=every_n", "controller.distill_steps=5", "output.checkpoint_every=1",
    ]
    env = child_env()
    full = subprocess.run(command(overrides, base / "full", ranks=2), capture_output=True, text=True, timeout=900, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = base / "killed"
    seen = kill_during_step_2(command(overrides, killed, ranks=2), killed, env)
    resumed = subprocess.run(command(overrides, killed, resume=True, ranks=2), capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return (metric_lines(base / "full"), base / "full"), (metric_lines(killed), killed), seen


def test_fsdp_run_killed_mid_step(fsdp_runs):
    _, (_, killed), seen = fsdp_runs
    assert [r["step"] for r in seen][:2] == [0, 1]
    assert not any(r.get("final") for r in seen) and max(r["step"] for r in seen) < 3
    latest = killed / "checkpoints" / (killed / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (latest / "trainer_dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # a shard per rank


def test_resumed_fsdp_run_matches_the_uninterrupted_one(fsdp_runs):
    (full, full_dir), (resumed, resumed_dir), _ = fsdp_runs
    assert_same_steps(full, resumed)
    assert any(r.get("spec/drafts") for r in full) and any(r.get("drafter/distill_loss") for r in full)  # the drafter's state took part
    w_full, w_resumed = load_file(full_dir / "policy" / "model.safetensors"), load_file(resumed_dir / "policy" / "model.safetensors")
    assert w_full.keys() == w_resumed.keys()
    for key, value in w_full.items():
        assert torch.equal(w_resumed[key], value), key
