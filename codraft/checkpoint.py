"""Checkpoint and resume of the whole co-training state.

`RUN_DIR/checkpoint/` (replaced atomically, so a kill leaves the previous one intact) holds:
    state.json     the last completed step and what wrote it
    trainer.pt     policy weights (fp32), AdamW state, and the torch / Python RNG states
    controller.pt  serving drafter weights, refresh-policy state, cost model, distillation buffer
                   and held-out rollouts, drafter version and refresh log, k schedule
What is not saved, because it is rebuilt exactly: the frozen reference (the initial policy,
rebuilt from its source), the engine (rebuilt, then given the checkpoint's weights), prompts and
sampling seeds (functions of run.seed and the step), held-out evaluation prompts.

Resume rule: metrics.jsonl and samples.jsonl are rewritten (atomically) to hold only records of
steps <= the checkpoint's step, then the loop continues at the next step. Steps after the
checkpoint that had already been logged are recomputed and logged once.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from codraft.io import atomic_dir, atomic_write_text, jsonl_line, read_jsonl

if TYPE_CHECKING:
    from codraft.runner import Run

CHECKPOINT_VERSION = 1


def save(run: "Run", step: int) -> None:
    """Write the state after `step` completed (the main rank writes; DDP ranks hold identical replicas)."""
    if not run.is_main:
        return
    with atomic_dir(run.dir / "checkpoint") as tmp:
        torch.save({"policy": run.trainer.policy.state_dict(), "optimizer": run.trainer.optimizer.state_dict(), "rng": rng_state()}, tmp / "trainer.pt")
        controller_state = run.controller.state_dict()
        if controller_state:
            torch.save(controller_state, tmp / "controller.pt")
        (tmp / "state.json").write_text(json.dumps({"version": CHECKPOINT_VERSION, "step": step, "saved_at": time.time()}))


def rng_state() -> dict[str, Any]:
    """The process-wide random states a step draws from (distillation batches, dropout, Python's random)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def last_step(run_dir: Path) -> int:
    """The last completed step recorded by a checkpoint, or -1 when the run has none yet."""
    state = Path(run_dir) / "checkpoint" / "state.json"
    if not state.is_file():
        return -1
    return int(json.loads(state.read_text())["step"])


def load(run: "Run") -> int:
    """Restore the state into a freshly built run; returns the step to continue from."""
    ckpt = run.dir / "checkpoint"
    step = last_step(run.dir)
    if step < 0:
        return 0
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    run.trainer.policy.load_state_dict(trainer["policy"])
    run.trainer.optimizer.load_state_dict(trainer["optimizer"])
    if "rng" in trainer:
        set_rng_state(trainer["rng"])
    if run.is_main and (ckpt / "controller.pt").is_file():
        run.controller.load_state_dict(torch.load(ckpt / "controller.pt", map_location="cpu", weights_only=False))
    if run.is_main:
        truncate_logs(run.dir, step)
    return step + 1


def truncate_logs(run_dir: Path, step: int) -> None:
    """Keep only records of steps <= `step` (drops a torn last line too)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(run_dir) / name
        if path.exists():
            kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step and not r.get("final")]
            atomic_write_text(path, "".join(jsonl_line(r) for r in kept))


def describe(run_dir: Path) -> dict[str, Any]:
    return {"step": last_step(run_dir), "has_config": (Path(run_dir) / "config.toml").is_file()}
