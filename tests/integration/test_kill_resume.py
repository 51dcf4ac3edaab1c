"""SIGKILL a running `codraft run` mid-step, resume it, and compare with an uninterrupted run.

Both runs: the tiny testbed, EAGLE-3 refreshed every step (so the drafter, the refresh policy and the
distillation buffer are part of the state), a checkpoint after every step, the same seed. The killed
run dies while step 2 is under way (step 1's metrics line is on disk); `--resume` continues from the
step-1 checkpoint. Everything sampled or counted must then equal the uninterrupted run exactly
(rewards, tokens, acceptance counts, refresh decisions); losses to 1e-6 relative. Timings differ."""
import os
import signal
import subprocess
import sys
import time

import pytest

from codraft.io import read_jsonl

pytestmark = pytest.mark.integration

EXACT = ("reward/mean", "reward/accuracy", "gen/tokens", "spec/drafts", "spec/draft_tokens", "spec/accepted", "controller/decision", "drafter/version", "eval/accuracy")
CLOSE = ("train/loss", "train/entropy", "drafter/distill_loss", "drafter/alpha_after")


def command(overrides, out, resume=False):
    target = ["--resume", str(out)] if resume else ["--preset", "smoke", *[a for o in overrides for a in ("--set", o)], "--out", str(out)]
    return [sys.executable, "-m", "codraft", "run", *target]


def metric_lines(out):
    path = out / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


@pytest.fixture(scope="module")
def runs(tiny_overrides, tiny_policy_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("kill-resume")
    overrides = tiny_overrides + [
        "run.steps=4", "drafter.kind=eagle3", "drafter.warmup_steps=40", "controller.policy=every_n", "controller.distill_steps=5", "output.checkpoint_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(command(overrides, base / "full"), capture_output=True, text=True, timeout=900, env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = base / "killed"
    proc = subprocess.Popen(command(overrides, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 900
    while len(metric_lines(killed)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into step 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = metric_lines(killed)
    resumed = subprocess.run(command(overrides, killed, resume=True), capture_output=True, text=True, timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return metric_lines(base / "full"), metric_lines(killed), seen


def test_killed_mid_step(runs):
    _, _, seen = runs
    assert [r["step"] for r in seen][:2] == [0, 1]
    assert not any(r.get("final") for r in seen) and max(r["step"] for r in seen) < 3  # it died before finishing


def test_resumed_run_matches_the_uninterrupted_one(runs):
    full, resumed, _ = runs
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == [0, 1, 2, 3, 4]  # none lost, none repeated
    assert resumed[-1].get("final") and full[-1].get("final")
    for a, b in zip(full, resumed):
        for key in EXACT:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
        for key in CLOSE:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
