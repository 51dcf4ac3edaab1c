"""Build a run's components once (`Parts`), in an order that keeps seeded runs reproducible.

    parts = build_parts(cfg, run_dir, task, splits)

Order matters for the process RNG (module initialisation draws from it): the policy (and LoRA
adapters), the frozen reference, the warm-started drafter, the data-parallel wrapping and the
trainer, then the engine and the controller. Under torchrun the main rank owns the drafter, the
controller and the outputs, and an engine; with `rollout.engines` > 1 other ranks own engines too
(codraft/rollouts.py). Every rank trains on the main rank's batches.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from codraft.config import Config, ConfigError
from codraft.configfile import write_config
from codraft.controller import Controller, NoController
from codraft.costmodel import parse_k_schedule
from codraft.costprofile import calibrated_cost_model
from codraft.distributed import DistState, DistributedTrainer, barrier, wrap_policy
from codraft.drafter import Drafter, load_drafter, target_parts
from codraft.engine_mode import EngineModeChoice, resolve_engine_mode, with_mode
from codraft.engines import make_engine
from codraft.grpo import GRPOTrainer
from codraft.hardware import describe
from codraft.io import atomic_write_text
from codraft.lora import apply_lora
from codraft.metrics import MetricsSink
from codraft.precision import compute_dtype
from codraft.parts import Parts, PolicyView, RunOutputs
from codraft.prompts import Prompts
from codraft.rollouts import RolloutGroup, owners
from codraft.scoring import Scorer
from codraft.task import Task
from codraft.testbed import policy_source
from codraft.warmstart import initial_drafter

logger = logging.getLogger(__name__)


def load_policy(path: Path, attention: str, device: torch.device):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).to(device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"model.path: cannot load the policy from {path}: {str(err).splitlines()[0]}") from None


def load_reference(path: Path, attention: str, device: torch.device):
    """The frozen initial policy of the KL term."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).to(device).eval()
    reference.requires_grad_(False)
    return reference


def find_policy_dir(cfg: Config, task: Task, dist: DistState) -> Path:
    """The initial policy: the main rank builds (or finds) the testbed; the others then read the cache."""
    path = policy_source(cfg, task) if dist.is_main else None
    barrier(dist)
    return path if path is not None else policy_source(cfg, task)


def build_parts(cfg: Config, run_dir: Path, task: Task, splits, dist: DistState) -> Parts:
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    policy_dir = find_policy_dir(cfg, task, dist)
    prompts = Prompts.load(cfg, task, splits, policy_dir)
    configured, mode = cfg, engine_mode(cfg, policy_dir, prompts, dist, run_dir)
    cfg = with_mode(cfg, mode.mode)  # what the engines and the cost profile see; config.toml keeps the configured one
    attention = "eager" if dist.device.type == "cpu" else "sdpa"  # eager attention trains faster on CPU here
    policy = load_policy(policy_dir, attention, dist.device)
    if cfg.grpo.gradient_checkpointing:  # recompute layers in backward instead of keeping their activations
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = apply_lora(policy, cfg.lora)  # LoRA: only adapters train
    config, parts = policy.config, target_parts(policy)
    reference = load_reference(policy_dir, attention, dist.device) if cfg.grpo.kl_coef > 0 else None
    # the main rank owns the drafter and the controller; the drafter warm-starts on the unwrapped policy
    serving = _serving_drafter(cfg, policy, prompts, policy_dir, run_dir) if dist.is_main and cfg.drafter.kind != "none" else None
    engine_ranks = owners(dist.world_size, cfg.rollout.engines)
    drafter_copy = _drafter_copy(cfg, policy, run_dir, dist, engine_ranks)  # the other engines' drafters, as exported by rank 0
    policy = wrap_policy(policy, dist, cfg.dist.strategy)  # DDP / FSDP2 under torchrun, else as is
    trainer_cls = DistributedTrainer if dist.distributed else GRPOTrainer
    extra = (dist,) if dist.distributed else ()
    trainer = trainer_cls(policy, cfg.grpo, *extra, temperature=cfg.rollout.temperature, reference=reference, seed=cfg.run.seed)
    view = PolicyView(trainer, dist, config, parts, engine_ranks)
    out = Parts(cfg, dist, policy_dir, prompts, Scorer(task, prompts.tokenizer), trainer, view, NoController())
    k_schedule = parse_k_schedule(cfg.drafter.k_schedule, cfg.drafter.num_speculative_tokens, cfg.rollout.max_num_seqs) if cfg.drafter.kind != "none" else None
    drafter_dir = run_dir / "drafter"
    out.rollouts = _rollout_group(cfg, dist, engine_ranks, serving if dist.is_main else drafter_copy, policy_dir, drafter_dir, k_schedule)
    if dist.is_main:
        out.engine = engine = out.rollouts.local_engine
        if serving is not None:  # the controller changes rank 0's engine; RolloutGroup replays the changes on the others
            cost = calibrated_cost_model(engine, cfg, serving, prompts.warm_start(), k_schedule=k_schedule) if cfg.controller.cost_profile else None
            out.controller = Controller(cfg, serving, out.rollouts.engine, view, drafter_dir, k_schedule, cost=cost)
        write_hardware(cfg, run_dir, dist, mode)
        write_config(configured, run_dir / "config.toml")  # last: a run that failed to start leaves no config behind
        sink = MetricsSink(run_dir / "metrics.jsonl", tensorboard=cfg.output.tensorboard)
        out.outputs = RunOutputs(run_dir, sink, prompts.tokenizer, cfg.output.samples_per_step, cfg.rollout.group_size)
    return out


def engine_mode(cfg: Config, policy_dir: Path, prompts: Prompts, dist: DistState, run_dir: Path) -> EngineModeChoice:
    """The engine mode of this run (`rollout.engine_mode`; `auto`: the mode a resumed run started in,
    or measured once per machine by the main rank, whose cache the other ranks then read)."""
    ids = prompts.warm_start()
    if cfg.rollout.engine_mode != "auto" or not dist.distributed:
        return resolve_engine_mode(cfg, policy_dir, ids, run_dir=run_dir)
    choice = resolve_engine_mode(cfg, policy_dir, ids, run_dir=run_dir) if dist.is_main else None
    barrier(dist)
    return choice or resolve_engine_mode(cfg, policy_dir, ids, is_main=False, run_dir=run_dir)


def write_hardware(cfg: Config, run_dir: Path, dist: DistState, mode: EngineModeChoice) -> None:
    """RUN_DIR/hardware.json: the machine, the engine mode (and why) and the training precision of this run."""
    facts = describe(
        engine_mode=mode.mode,
        engine_mode_choice=mode.as_json(),
        train_precision=compute_dtype(dist.device, cfg.grpo.autocast_bf16),
        world_size=dist.world_size,
    )
    atomic_write_text(run_dir / "hardware.json", json.dumps(facts, indent=2) + "\n")


def _rollout_group(cfg: Config, dist: DistState, engine_ranks: list[int], drafter: Drafter | None, policy_dir: Path, drafter_dir: Path, k_schedule) -> RolloutGroup:
    """Every engine of the job (rank 0's, or one per group of ranks), all serving rank 0's drafter."""
    owner = dist.rank in engine_ranks
    if owner and dist.device.type == "cuda" and dist.local_rank != 0:
        raise ConfigError(f"config key 'rollout.engines' is {cfg.rollout.engines}: on GPUs an engine takes its node's GPUs from device 0, so only a node's local "
                          f"rank 0 may own one (one engine per node: rollout.engines = the number of nodes); rank {dist.rank} is local rank {dist.local_rank}")
    engine = make_engine(cfg, policy_dir, drafter, drafter_dir if drafter is not None else None, k_schedule) if owner else None
    group = RolloutGroup(dist, cfg.rollout.engines, engine)
    if len(engine_ranks) > 1:
        if dist.is_main and drafter is not None and drafter.learned:  # the copies were read from the bf16 export: rank 0's exact weights, replayed
            group.engine.load_drafter_weights(drafter.serving_weights())
        barrier(dist)  # every engine is up before rank 0 profiles its own, or a resume rewrites RUN_DIR/drafter
    return group


def _drafter_copy(cfg: Config, policy, run_dir: Path, dist: DistState, engine_ranks: list[int]) -> Drafter | None:
    """On a rank other than 0 that owns an engine: the initial drafter rank 0 exported to RUN_DIR/drafter."""
    if len(engine_ranks) == 1 or cfg.drafter.kind == "none":
        return None
    barrier(dist)  # rank 0 has exported it
    if dist.is_main or dist.rank not in engine_ranks:
        return None
    device = next(policy.parameters()).device if cfg.rollout.backend == "reference" else "cpu"  # vLLM reads only its config
    return load_drafter(run_dir / "drafter", policy).to(device).eval()


def _serving_drafter(cfg: Config, policy, prompts: Prompts, policy_dir: Path, run_dir: Path) -> Drafter:
    """The initial drafter (`drafter.path`, or the cached warm start), exported to RUN_DIR/drafter."""
    serving, _ = initial_drafter(cfg, policy, prompts.warm_start(), policy_dir, prompts.eos_id, prompts.pad_id)
    serving.eval()
    serving.export(run_dir / "drafter")
    return serving
