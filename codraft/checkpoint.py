"""Checkpoint and resume of a mapping of named stateful components.

    components = {"trainer": trainer, "rng": RNGState(), "controller": controller}
    save(run_dir, step, components, dist)    # each component's state_dict() -> checkpoints/step-<step>/<name>.pt
    next_step = load(run_dir, components, dist)  # each component.load_state_dict(...); 0 without a checkpoint

Layout: `RUN_DIR/checkpoints/step-000007/` holds `state.json` (the completed step, the format
version, the component names, the world size, the sharded components) and one `<name>.pt` per
component whose state is not empty; `RUN_DIR/checkpoints/latest` names the newest complete one. A
checkpoint is written under a temporary name, fsynced and renamed into place; only then is `latest`
replaced (an atomic rename of a one-line file), and only then are versions older than the last
`keep` removed. At every instant `latest` names a complete checkpoint, so a kill at any point
resumes from the previous or the new one, never from a half-written one.

Sharded state (`ShardedStateful`: the FSDP2 policy and its AdamW state) is split over the ranks of a
torchrun job: every rank writes its own shard with `torch.distributed.checkpoint` into
`<name>_dcp/` of the same temporary directory, the ranks meet at a barrier once every shard is
written, and only then does rank 0 write the other components and publish. Rank 0 writes the rest
in every case (under DDP every rank holds the whole state). A sharded checkpoint resumes on the
same number of ranks only (refused otherwise, naming both sizes); the ranks must share the file
system the run directory is on.

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
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from codraft.config import ConfigError
from codraft.distributed import DistState, barrier, broadcast_object
from codraft.io import atomic_write_text, fsync_tree, jsonl_line, read_jsonl

CHECKPOINT_VERSION = 3


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ShardedStateful(Protocol):
    """A component part of whose state is split over ranks. `sharded_state_dict()` is this rank's
    part (tensors `torch.distributed.checkpoint` saves, and loads in place), {} when nothing is
    sharded; its `state_dict()` holds the rest, which rank 0 saves."""

    def sharded_state_dict(self) -> dict[str, Any]: ...

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None: ...


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


def sharded_states(components: Mapping[str, Stateful]) -> dict[str, dict[str, Any]]:
    """This rank's part of every sharded component, by name (components with nothing sharded left out)."""
    states = {name: c.sharded_state_dict() for name, c in components.items() if isinstance(c, ShardedStateful)}
    return {name: state for name, state in states.items() if state}


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def save(run_dir: Path, step: int, components: Mapping[str, Stateful], keep: int = 2, dist: DistState = DistState()) -> Path | None:
    """Write every component's state after `step` completed; keeps the newest `keep` checkpoints.

    Under torchrun every rank calls it: each writes its shard of the sharded components, then rank 0
    writes the rest and publishes. Returns the checkpoint's directory on rank 0, None on the others."""
    shards = sharded_states(components)
    if not dist.is_main and not shards:  # nothing of this rank's own to write
        return None
    root, name, tmp = checkpoints_dir(run_dir), f"step-{step:06d}", None
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    if shards:  # every rank writes into rank 0's temporary directory
        tmp = Path(broadcast_object(str(tmp) if dist.is_main else None, dist))
    try:
        for key, state in shards.items():
            _dcp().save(state, checkpoint_id=tmp / f"{key}_dcp")
        if shards:
            barrier(dist)  # every rank's shard is on disk before rank 0 publishes
        if not dist.is_main:
            return None
        _write_components(tmp, step, components, sorted(shards), dist.world_size)
        fsync_tree(tmp)
        final = root / name
        if final.exists():  # the same step saved again (a resumed run): replace the older copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    prune(root, keep, name)
    return final


def _write_components(tmp: Path, step: int, components: Mapping[str, Stateful], sharded: list[str], world_size: int) -> None:
    """Every component's non-empty `state_dict()` as `<name>.pt`, then `state.json` (written last)."""
    names = []
    for key, component in components.items():
        state = component.state_dict()
        if state:
            torch.save(state, tmp / f"{key}.pt")
            names.append(key)
    meta = {"version": CHECKPOINT_VERSION, "step": step, "components": names, "sharded": sharded, "world_size": world_size, "saved_at": time.time()}
    (tmp / "state.json").write_text(json.dumps(meta))


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


def check_world_size(run_dir: Path, world_size: int, sharded: bool) -> None:
    """The latest checkpoint fits a job of `world_size` ranks that shards its policy (`sharded`) or not.

    Sharded state resumes on as many ranks as wrote it (it is not resharded), and a sharding job
    resumes only from sharded state. Unsharded checkpoints (one process, DDP) fit any job that does not shard."""
    path = latest_dir(run_dir)
    if path is None:
        return
    meta = json.loads((path / "state.json").read_text())
    saved, was_sharded = int(meta.get("world_size", 1)), bool(meta.get("sharded"))
    if not (sharded or was_sharded):
        return
    how = "with the policy sharded over its ranks (dist.strategy='fsdp')" if was_sharded else "without sharding"
    if saved != world_size:
        raise ConfigError(
            f"--resume {run_dir}: checkpoint {path.name} was written by {saved} rank(s) {how}, and this job has {world_size}; "
            f"resume it with {saved} rank(s) (torchrun --nproc-per-node ...): sharded checkpoints are not resharded"
        )
    if sharded != was_sharded:
        raise ConfigError(f"--resume {run_dir}: checkpoint {path.name} was written {how}, and this job {'shards' if sharded else 'does not shard'} the policy; resume it with the dist.strategy that wrote it")


def load(run_dir: Path, components: Mapping[str, Stateful], dist: DistState = DistState()) -> int:
    """Restore every saved component's state; returns the step to continue from (0 without a checkpoint).

    Under torchrun every rank calls it (each reads its shard of the sharded components)."""
    path = latest_dir(run_dir)
    if path is None:
        return 0
    meta = json.loads((path / "state.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"--resume {run_dir}: checkpoint format {meta.get('version')} is not this codraft's ({CHECKPOINT_VERSION}); resume it with the codraft that wrote it")
    shards = sharded_states(components)  # templates, filled in place
    check_world_size(run_dir, dist.world_size, bool(shards))
    for name, component in components.items():
        if name in shards:
            _dcp().load(shards[name], checkpoint_id=path / f"{name}_dcp")
            component.load_sharded_state_dict(shards[name])
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
