"""Data-parallel policy training with torch.distributed (DDP or FSDP2) next to one rollout engine.

    state = init_from_env(cfg.dist)                           # torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    policy = wrap_policy(policy, state, cfg.dist.strategy)     # DDP, FSDP2, or the model itself
    trainer = DistributedTrainer(policy, cfg.grpo, state, temperature, reference)
    batch, adv = broadcast_object((batch, adv) if state.is_main else None, state)
    scored = trainer.score(batch)                              # each rank scores its rows; summed
    stats = trainer.update(batch, scored, adv)                 # same gradient as one process
    weights = full_state_dict(policy, state)                   # full HF-named weights, main rank only

Launch: `torchrun --nproc-per-node 8 -m codraft ...`; several nodes add `--nnodes N --rdzv-backend
c10d --rdzv-endpoint HOST:PORT` (README.md, "Scaling out"). Without torchrun the world size is 1,
no group is created and every function is a no-op.

Who does what in a step (synchronous, single rollout engine):
- The main rank (rank 0) owns the rollout engine, the rewards and the drafter controller. It pushes
  the full policy weights (`full_state_dict`) into the engine, generates, scores rewards, computes
  the advantages, and broadcasts the token batch to the other ranks (`broadcast_object`), which wait
  in that broadcast meanwhile. The batch is token ids only (megabytes), so every rank holds the
  whole global batch; each rank trains on its rows (`shard_rows`).
- On GPU the engine's own tensor parallelism (`rollout.tensor_parallel_size = T`) spreads the
  engine over T GPUs of the main rank's node: vLLM's multiprocessing executor starts T worker
  processes (their own process groups, not the trainer's) on GPUs 0..T-1, which they share with
  the training ranks, each taking `rollout.gpu_memory_utilization` of its GPU. The weights pushed
  by the main rank go to every TP worker, which keeps its shard. The engine therefore stays on one
  node; on several nodes the other nodes only train.
- vLLM initialises torch.distributed only when no default group exists (vLLM 0.32,
  `init_distributed_environment`); an engine built *inside* a rank of a torchrun job would take the
  trainer's group as its world and hang or fail. With world_size > 1 the engine must run in child
  processes: `prepare_engine_environment` sets `VLLM_ENABLE_V1_MULTIPROCESSING=1` for that.

Gradient equality with one process: the loss of a mini-batch is the sum of its per-token losses
divided by the mini-batch's GLOBAL completion-token count (every rank computes it from the whole
batch, so it needs no communication), and ranks SUM their gradients (DDP through a sum comm hook,
FSDP2 with a gradient divide factor of 1) instead of averaging them. Clipping then sees the full
gradient, non-finite steps are skipped on every rank alike, and the diagnostics are summed over
ranks before they are divided by the global token count.

Checkpoints: under DDP every rank holds the whole state and rank 0 saves it; under FSDP2 every
rank saves and loads the trainer's `sharded_state_dict` (its shards of the policy and the AdamW
state) through torch.distributed.checkpoint, next to what rank 0 saves (codraft.checkpoint).

Tested here: CPU, gloo, 2 processes, DDP and FSDP2 against a single-process update. Not tested:
GPUs, NCCL, several nodes, vLLM tensor parallelism next to training ranks.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from codraft.batch import TokenBatch
from codraft.config import DistConfig, GRPOConfig
from codraft.grpo import GRPOTrainer


@dataclass(frozen=True)
class DistState:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_group = "none"  # the torchrun group of this process: "none", "joined" (init_from_env), "left" (shutdown)


def init_from_env(cfg: DistConfig = DistConfig()) -> DistState:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Without those variables, or with WORLD_SIZE=1, this is one process and no group is created.
    """
    global _group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=cfg.timeout_minutes))
        _group = "joined"
    return DistState(rank, world_size, local_rank, device)


def shutdown(drain: bool = True) -> None:
    """Leave the default process group (if one exists; `left_group()` then says whether it was
    the one init_from_env joined).

    drain: first wait at a barrier (gloo's waits for every collective queued before it). A gloo
    group destroyed with a collective still queued deadlocks: its destructor, holding the GIL (in
    `destroy_process_group` or a DDP reducer that outlives it), waits for the queue, and the worker
    finishing that collective waits for the GIL to free its tensors (seen in the two-rank DDP
    test). Pass False when leaving on an error: the other ranks may never reach the barrier."""
    global _group
    if dist.is_initialized():
        if drain:
            dist.barrier()
        dist.destroy_process_group()
        if _group == "joined":  # not a group vLLM made for an in-process engine and left behind
            _group = "left"


def left_group() -> bool:
    """Whether this process joined torchrun's process group (init_from_env) and left it (shutdown)."""
    return _group == "left"


def barrier(state: DistState) -> None:
    """Wait for every rank (a no-op in one process)."""
    if state.distributed:
        dist.barrier()


def prepare_engine_environment(state: DistState) -> None:
    """Keep vLLM out of the trainer's process group: engine core in child processes when world_size > 1."""
    if state.distributed:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"


# ----------------------------------------------------------------------------------- sharding


def shard_rows(n_rows: int, state: DistState) -> list[int]:
    """This rank's rows of an `n_rows` batch: strided, rank r takes r, r + W, r + 2W, ...

    Strided rather than contiguous because rollouts are prompt-major: a stride spreads each prompt's
    group (and its typical length) over all ranks, which balances their work. Every row belongs to
    exactly one rank; a rank may get none when n_rows < world_size.
    """
    return list(range(state.rank, n_rows, state.world_size))


def broadcast_object(obj: Any, state: DistState, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; for the rollout batch and the main rank's decisions)."""
    if not state.distributed:
        return obj
    box = [obj if state.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, state: DistState, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank `dst` (None on the others); [obj] without torchrun."""
    if not state.distributed:
        return [obj]
    box = [None] * state.world_size if state.rank == dst else None
    dist.gather_object(obj, box, dst=dst)
    return box


def all_reduce_sum(value: torch.Tensor | float, state: DistState) -> torch.Tensor | float:
    """Sum over ranks; a float comes back a float, a tensor a new tensor on its own device."""
    if not state.distributed:
        return value
    if isinstance(value, float):
        tensor = torch.tensor(value, dtype=torch.float64, device=state.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor)
    tensor = value.to(state.device, copy=True)  # NCCL reduces only CUDA tensors
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.to(value.device)


# ----------------------------------------------------------------------------------- wrapping


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise RuntimeError(f"dist.strategy='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard), absent in torch {torch.__version__}; use dist.strategy='ddp'") from None
    return fully_shard


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place, so an FSDP model is its own module)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _sum_hook(group, bucket):  # no annotations: DDP compares them with dist.GradBucket at registration
    """DDP comm hook: SUM gradients over ranks (DDP's default averages them). Returns a Future of the bucket."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one (Hugging Face decoders keep them in `layers`)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def wrap_policy(model: torch.nn.Module, state: DistState, strategy: str = "ddp") -> torch.nn.Module:
    """The module to train: DDP or FSDP2 over `model` (already on `state.device`), or `model` itself at world_size 1.

    Both strategies SUM gradients over ranks (see the module docstring); wrap before building the
    optimizer, since FSDP2 replaces the parameters by sharded ones.
    """
    if not state.distributed:
        return model
    if strategy == "ddp":
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        # buffers (rotary tables) are constants: synced once at init, not before every forward
        ddp_args = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in ddp_args else {"broadcast_buffers": False}
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
        ddp.register_comm_hook(None, _sum_hook)
        return ddp
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        fully_shard = _fully_shard()
        mesh = init_device_mesh(state.device.type, (state.world_size,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for module in model.modules():
            if is_fsdp(module):
                module.set_gradient_divide_factor(1.0)  # sum, not mean
                if hasattr(module, "set_force_sum_reduction_for_comms"):
                    module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM (the factor-1 reduction)
        return model
    raise ValueError(f"unknown dist.strategy {strategy!r}; expected 'ddp' or 'fsdp'")


def full_state_dict(model: torch.nn.Module, state: DistState, ranks: tuple[int, ...] = (0,)) -> dict[str, torch.Tensor]:
    """The full policy weights in Hugging Face names on `ranks` ({} on the others).

    A collective under FSDP2 (every rank must call it): gathered into the host memory of the ranks
    that want them (each rank that owns a rollout engine loads them into it). A LoRA model's
    adapters come back merged into the base weights (codraft.lora.merged_state_dict), as served.
    """
    from codraft import lora

    local = unwrap(model)
    wanted = state.rank in ranks or not state.distributed
    if is_fsdp(local) and state.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if tuple(ranks) == (0,):
            weights = get_model_state_dict(local, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:  # one tensor gathered at a time, kept in host memory where wanted (GPU memory: one tensor)
            weights = {}
            for name, shard in get_model_state_dict(local, options=StateDictOptions(full_state_dict=False)).items():
                full = shard.full_tensor() if hasattr(shard, "full_tensor") else shard
                if wanted:
                    weights[name] = full.detach().cpu()
    else:
        weights = local.state_dict() if wanted else {}
    if not wanted:
        return {}
    return lora.merged_state_dict(local, weights) if lora.is_lora(local) else weights


# ----------------------------------------------------------------------------------- training


class DistributedTrainer(GRPOTrainer):
    """GRPOTrainer whose ranks split the global batch's rows and together take the single-process step.

    `score` and `update` take the GLOBAL batch on every rank. Each rank runs the rows of
    `shard_rows`; ranks with fewer micro-batches than the busiest one run zero-weight passes, so
    every rank joins the same collectives (FSDP2 gathers weights in each forward, DDP reduces in
    the last backward of a mini-batch). `on_forward` sees this rank's rows only.
    """

    def __init__(self, policy: torch.nn.Module, cfg: GRPOConfig, state: DistState, temperature: float = 1.0, reference: torch.nn.Module | None = None, seed: int = 0):
        super().__init__(policy, cfg, temperature, reference, seed)
        self.state = state
        self.ddp = isinstance(policy, torch.nn.parallel.DistributedDataParallel)

    # ---- checkpoints: under FSDP2 every rank saves and loads its own shard (codraft.checkpoint)
    @property
    def sharded(self) -> bool:
        """True when the policy is FSDP2-sharded over the ranks (its parameters are DTensor shards)."""
        return self.state.distributed and is_fsdp(unwrap(self.policy))

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 saves: everything under DDP; under FSDP2 the learning-rate schedule only (the
        policy and its AdamW state are in `sharded_state_dict`)."""
        return {"lr_schedule": self.lr_schedule.state_dict()} if self.sharded else super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sharded:
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        else:
            super().load_state_dict(state)

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's shards of the FSDP2 policy and its AdamW state (DTensors under parameter names,
        for torch.distributed.checkpoint), {} when the policy is not sharded."""
        if not self.sharded:
            return {}
        from torch.distributed.checkpoint.state_dict import get_state_dict

        policy, optimizer = get_state_dict(self.policy, self.optimizer)
        return {"policy": policy, "optimizer": optimizer}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.policy, self.optimizer, model_state_dict=state["policy"], optim_state_dict=state["optimizer"])

    # ---- hooks (what a single-process GRPOTrainer does with all rows and no communication)
    def _plan(self, batch: TokenBatch, rows: list[int] | None = None) -> list[list[int]]:
        """This rank's micro-batches of `rows`, padded with [] (zero-weight passes) to the busiest rank's count.

        Every rank holds the whole batch, so it computes every rank's count itself: no communication.
        """
        B, W = batch.input_ids.shape[0], self.state.world_size
        rows = list(range(B)) if rows is None else rows
        owned = [set(shard_rows(B, replace(self.state, rank=k))) for k in range(W)]
        per_rank = [[r for r in rows if r in owned[k]] for k in range(W)]
        passes = max(len(self._chunks(batch, theirs)) for theirs in per_rank)
        mine = self._chunks(batch, per_rank[self.state.rank])
        return mine + [[]] * (passes - len(mine))

    def _idle_pass(self, batch: TokenBatch) -> None:
        """A forward (and, with grad on, a backward) that contributes exactly zero, to join the collectives."""
        mb = TokenBatch(batch.input_ids[:1, :2], batch.attention_mask[:1, :2], batch.completion_mask[:1, :2])
        logits, _ = self._forward(self.policy, mb)
        if torch.is_grad_enabled():
            (logits.sum() * 0.0).backward()

    def _sync(self, last: bool):
        """DDP reduces gradients in the last backward of a mini-batch only; FSDP2 in every backward
        (its accumulated gradients then stay sharded)."""
        return self.policy.no_sync() if self.ddp and not last else contextlib.nullcontext()

    def _all_ranks(self, flag: bool) -> bool:
        """True only if `flag` holds on every rank (decisions all ranks must take alike)."""
        if not self.state.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.state.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (per-rank partial sums of log-probs and diagnostics)."""
        return all_reduce_sum(tensor, self.state)

    def _clip(self) -> float:
        """Clip the full gradient; returns its norm before clipping (the same on every rank)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
