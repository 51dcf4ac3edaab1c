"""What `codraft plan` knows besides the model: GPU memory by name, the per-token coefficients of its
estimates (and where each was measured), and how a plan is printed.

Coefficients are bytes. Activation and distillation figures were measured on this project's CPU
machine with saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`, unique storages)
around the Hugging Face Qwen3 forward with SDPA attention and around `codraft.distill` on an EAGLE-3
head, over six model shapes; the fits were exact in fp32 and within 25 B/token/layer under bf16
autocast. Logit chains and engine runtime are counted from the code (`codraft.grpo`, vLLM's
sampler), not measured. `analysis/gpu_check.sh` compares the total with a real CUDA peak.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    name: str
    gib: float
    """Memory a process sees (`torch.cuda.mem_get_info` total), GiB, rounded down."""


GPUS = {
    "gb200": GPUSpec("NVIDIA GB200 (Blackwell; Grace host, 4 GPUs per compute tray)", 184.0),
    "h200": GPUSpec("NVIDIA H200 141 GB", 139.8),
    "h100-80gb": GPUSpec("NVIDIA H100 80 GB", 79.1),
    "a100-80gb": GPUSpec("NVIDIA A100 80 GB", 79.1),
    "a100-40gb": GPUSpec("NVIDIA A100 40 GB", 39.4),
}
ALIASES = {"h100": "h100-80gb", "h200-141gb": "h200", "gb200-186gb": "gb200"}
DEFAULT_GPU = "h100-80gb"


def gpu_spec(name: str) -> tuple[str, GPUSpec]:
    """(canonical name, spec) of a GPU type; an unknown name raises ValueError listing the known ones."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower()) or DEFAULT_GPU
    if key not in GPUS:
        known = ", ".join(list(GPUS) + list(ALIASES))
        raise ValueError(f"config key 'dist.gpu': unknown GPU {name!r}; known: {known} (A100 needs its size: a100-40gb / a100-80gb)")
    return key, GPUS[key]


# --------------------------------------------------------------------------- policy training
def layer_activation_bytes(hidden: int, intermediate: int, q_dim: int, kv_dim: int, autocast: bool) -> int:
    """Saved activations of one Qwen3/Llama decoder layer per token (SDPA attention, no checkpointing).
    Measured: fp32 24h + 16I + 16q + 16kv exactly; bf16 autocast 26h + 8I + 10q + 10kv (+-25 B)."""
    if autocast:
        return 26 * hidden + 8 * intermediate + 10 * q_dim + 10 * kv_dim
    return 24 * hidden + 16 * intermediate + 16 * q_dim + 16 * kv_dim


OUTSIDE_LAYERS_PER_TOKEN_H = 16
"""Saved activations outside the layers per token, in units of h bytes (embedding output, final norm, head input)."""
TRAIN_LOGITS_PER_TOKEN_V = {True: 20, False: 22}
"""Peak bytes per token per vocabulary entry of the update's loss chain (codraft.grpo): the model's logits
(bf16 2 or fp32 4), their fp32 copy over the temperature (4), and three fp32 [tokens, V] temporaries of
the logsumexp backward or the entropy (12), plus 2 for the gather's gradient."""
SCORE_LOGITS_PER_TOKEN_V = {True: 14, False: 16}
"""Same for the logprob stage (no_grad): logits, the fp32 copy, logsumexp temporaries."""
HOOK_LOGITS_PER_TOKEN_V = 8
"""Extra on the main rank in the logprob stage: the drafter hook's fp32 logits over the temperature and their log-softmax."""

# --------------------------------------------------------------------------- drafter
DISTILL_PER_STEP_V = {False: 9.2, True: 4.5}
"""Saved bytes per aligned position per draft step per vocabulary entry in `codraft.distill`:
dense teachers (False) 9.2, sparse ones (True) 4.5 (measured)."""
DISTILL_BACKWARD_V = 8
"""Transient [positions, V] fp32 gradients of one draft step in backward (counted)."""
DISTILL_DENSE_TEACHER_V = 8
"""A dense teacher's batch in fp32 (4) and its probabilities in the loss (4), per position."""
DISTILL_PER_STEP_HIDDEN = 30
"""Saved bytes per position per draft step per unit of (H + I) of the draft layer (measured: 116 H at I = 3 H)."""
ALPHA_BATCH_SEQUENCES = 32
"""`codraft.distill.teacher_forced_alpha`'s default batch size (sequences; fewer where ALPHA_BATCH_ELEMENTS binds)."""
ALPHA_TENSORS_V = 3
"""Teacher-forced acceptance (no_grad): [positions, V] fp32 tensors besides the k steps' logits (softmax, p, off-support mask)."""

# --------------------------------------------------------------------------- engine and process
ENGINE_RUNTIME_GIB = 1.5
"""vLLM's own working memory outside weights and KV cache: CUDA graphs, activations of a forward over
its token budget, workspace (the sampler's logits are counted apart)."""
CUDA_CONTEXT_GIB = 0.75
"""A process's CUDA context and NCCL buffers (the trainer; vLLM's workers sit inside its share)."""
ALLOCATOR_SLACK = 0.05
"""Allocator fragmentation, as a share of the trainer's peak."""


# --------------------------------------------------------------------------- printing
def gib(n: float) -> str:
    return f"{n / GIB:8.1f}" if n else "       -"


def format_plan(title: str, roles: list[str], rows: list[tuple[str, str, list[float]]], totals: list[tuple[str, list[str]]], notes: list[str]) -> str:
    """A fixed-width table: one row per component (its stage in brackets), one column per kind of GPU, GiB."""
    width = max([len(f"{name} [{stage}]") for name, stage, _ in rows] + [len(label) for label, _ in totals]) + 2
    rule = "-" * (width + 18 * len(roles))
    out = [title, "", f"{'GiB per GPU':<{width}}" + "".join(f"{r:>18}" for r in roles), rule]
    out += [f"{name + ' [' + stage + ']':<{width}}" + "".join(f"{gib(v):>18}" for v in values) for name, stage, values in rows]
    out += [rule] + [f"{label:<{width}}" + "".join(f"{v:>18}" for v in values) for label, values in totals]
    return "\n".join(out + [""] + notes)
