"""Before a run touches its directory: what can be checked without building models, and the
directory itself (a new run's must be empty and writable; a resumed run's must hold a run).

Bad input fails here, before any output is written or changed.
"""
from __future__ import annotations

from pathlib import Path

from codraft import checkpoint
from codraft.config import Config, ConfigError
from codraft.costmodel import parse_k_schedule
from codraft.io import read_jsonl
from codraft.task import Task, make_task


def preflight(cfg: Config) -> tuple[Task, tuple]:
    """The task and its (train, held-out) splits, after checking the task's data, the model path,
    plug-in names and their settings."""
    from codraft.drafter import drafter_settings
    from codraft.refresh import make_refresh_policy
    from codraft.testbed import check_checkpoint

    task = make_task(cfg.task, cfg.task.seed)
    splits = task.splits()
    for name, ds in zip(("training", "held-out"), splits):
        if len(ds) == 0:
            raise ValueError(f"the task yielded no {name} prompts")
    if cfg.model.path:
        check_checkpoint(Path(cfg.model.path).expanduser())
        check_context_length(cfg, Path(cfg.model.path).expanduser())
    if cfg.drafter.kind != "none":
        drafter_settings(cfg.drafter)
        make_refresh_policy(cfg.controller.policy, cfg.controller.args)
        parse_k_schedule(cfg.drafter.k_schedule, cfg.drafter.num_speculative_tokens, cfg.rollout.max_num_seqs)
        if cfg.drafter.path and not Path(cfg.drafter.path).is_dir():
            raise FileNotFoundError(f"drafter.path: no such directory: {cfg.drafter.path}")
    return task, splits


def check_context_length(cfg: Config, path: Path) -> None:
    """`model.max_len` (the engine's context) must fit the checkpoint's position embeddings."""
    import json

    limit = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and cfg.model.max_len > limit:
        raise ConfigError(f"config key 'model.max_len' is {cfg.model.max_len}, more than the {limit} positions of the checkpoint at {path}")


def prepare_new(run_dir: Path) -> None:
    """A new run's directory: created if missing, refused if it holds a run or cannot be written."""
    if (run_dir / "config.toml").exists() or (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"output directory {run_dir} already holds a run (config.toml / metrics.jsonl); "
            f"continue it with `codraft run --resume {run_dir}` or pick another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output directory {run_dir} is not writable: {err.strerror}") from None


def check_resumable(run_dir: Path, cfg: Config, world_size: int = 1) -> None:
    """A directory to resume: it holds a run that has steps left, and a checkpoint a job of
    `world_size` ranks can load (a sharded one needs as many ranks as wrote it)."""
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no run there (config.toml missing)")
    if checkpoint.last_step(run_dir) < 0:
        raise FileNotFoundError(
            f"--resume {run_dir}: no checkpoint there ({run_dir / 'checkpoints' / 'latest'} missing): the run stopped before "
            f"its first checkpoint (or ran with output.checkpoint_every=0); start it again with another --out"
        )
    if (run_dir / "metrics.jsonl").exists() and any(r.get("final") for r in read_jsonl(run_dir / "metrics.jsonl")):
        if checkpoint.last_step(run_dir) >= cfg.run.steps - 1:
            raise FileExistsError(f"--resume {run_dir}: the run already finished all {cfg.run.steps} steps (raise run.steps to continue it)")
    check_lr_left(run_dir, cfg)
    checkpoint.check_world_size(run_dir, world_size, sharded=world_size > 1 and cfg.dist.strategy == "fsdp")


def check_lr_left(run_dir: Path, cfg: Config) -> None:
    """A cosine learning rate reaches 0 just after the run's last planned step and a resume continues
    it from there (codraft/grpo.py, LRSchedule): a run that finished, resumed with more steps, would
    train nothing in them. Refused before anything is written. The planned steps are config.toml's,
    which a resume rewrites at start: an extension that died before its first checkpoint is not
    caught (its checkpoint's schedule still ends at the old length)."""
    from codraft.configfile import config_from_toml

    planned = config_from_toml(run_dir / "config.toml").run.steps
    done = checkpoint.last_step(run_dir) + 1
    if cfg.grpo.lr_decay == "cosine" and cfg.run.steps > planned and done >= planned:
        raise ConfigError(
            f"--resume {run_dir} --set run.steps={cfg.run.steps}: the run's cosine learning rate (grpo.lr_decay) reached 0 after its "
            f"last planned step ({planned} steps, all done), so the {cfg.run.steps - planned} added steps would not train the policy; "
            f"start a new run with run.steps={cfg.run.steps} instead (a run meant to be extended uses grpo.lr_decay=constant)"
        )
