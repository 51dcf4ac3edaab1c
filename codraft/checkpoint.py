"""Checkpoint and resume of a mapping of named stateful components.

    components = {"trainer": trainer, "rng": RNGState(), "controller": controller}
    save(run_dir, step, components)          # each component's state_dict() -> checkpoints/step-<step>/<name>.pt
    next_step = load(run_dir, components)    # each component.load_state_dict(...); 0 without a checkpoint

Layout: `RUN_DIR/checkpoints/step-000007/` holds `state.json` (the completed step, the format
version, the component names) and one `<name>.pt` per component whose state is not empty;
`RUN_DIR/checkpoints/latest` names the newest complete one. A checkpoint is written under a
temporary name, fsynced and renamed into place; only then is `latest` replaced (an atomic rename
of a one-line file), and only then are versions older than the last `keep` removed. At every
instant `latest` names a complete checkpoint, so a kill at any point resumes from the previous or
the new one, never from a half-written one.

The run decides what its components are: in a GRPO run, the trainer (policy weights and AdamW
state), the process RNG states, and the drafter controller (serving drafter, refresh-policy state,
cost model, distillation buffer, held-out rollouts, drafter version and refresh log, k schedule).
What is not saved is rebuilt exactly: the frozen reference, the engine (rebuilt, then given the
checkpoint's weights), prompts and sampling seeds (functions of run.seed and the step).

Resume rule (`truncate_logs`): metrics.jsonl and samples.jsonl are rewritten (atomically) to hold
only records of steps <= the checkpoint's step, then the loop continues at the next step. Steps
after the checkpoint that had already been logged are recomputed and logged once.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch

from codraft.io import atomic_write_text, fsync_tree, jsonl_line, read_jsonl

CHECKPOINT_VERSION = 3


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RNGState:
    """The process-wide random states a step draws from (dropout, module init, Python's random)."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_dir(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory, or None when the run has none."""
    pointer = checkpoints_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which holds no state.json (the checkpoint was removed by hand?)")
    return path


def save(run_dir: Path, step: int, components: Mapping[str, Stateful], keep: int = 2) -> Path:
    """Write every component's state after `step` completed (call on the rank that writes); keeps the
    newest `keep` checkpoints. Returns the checkpoint's directory."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        names = []
        for key, component in components.items():
            state = component.state_dict()
            if state:
                torch.save(state, tmp / f"{key}.pt")
                names.append(key)
        (tmp / "state.json").write_text(json.dumps({"version": CHECKPOINT_VERSION, "step": step, "components": names, "saved_at": time.time()}))
        fsync_tree(tmp)
        final = root / name
        if final.exists():  # the same step saved again (a resumed run): replace the older copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    prune(root, keep, name)
    return final


def prune(root: Path, keep: int, newest: str) -> None:
    """Remove complete checkpoints older than the newest `keep` and leftovers of interrupted saves."""
    versions = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    for old in versions[: max(0, len(versions) - max(1, keep))]:
        if old != newest:
            shutil.rmtree(root / old, ignore_errors=True)
    for leftover in root.glob(".step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def last_step(run_dir: Path) -> int:
    """The last completed step recorded by a checkpoint, or -1 when the run has none yet."""
    path = latest_dir(run_dir)
    return -1 if path is None else int(json.loads((path / "state.json").read_text())["step"])


def load(run_dir: Path, components: Mapping[str, Stateful]) -> int:
    """Restore every saved component's state; returns the step to continue from (0 without a checkpoint)."""
    path = latest_dir(run_dir)
    if path is None:
        return 0
    meta = json.loads((path / "state.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"--resume {run_dir}: checkpoint format {meta.get('version')} is not this codraft's ({CHECKPOINT_VERSION}); resume it with the codraft that wrote it")
    for name, component in components.items():
        file = path / f"{name}.pt"
        if file.is_file():
            component.load_state_dict(torch.load(file, map_location="cpu", weights_only=False))
    return int(meta["step"]) + 1


def truncate_logs(run_dir: Path, step: int) -> None:
    """Keep only records of steps <= `step` (drops a torn last line too)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(run_dir) / name
        if path.exists():
            kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step and not r.get("final")]
            atomic_write_text(path, "".join(jsonl_line(r) for r in kept))
