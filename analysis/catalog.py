"""Per-GPU figures from vendor datasheets and Qwen3 model shapes, for the roofline model
(`analysis/roofline.py`) and the projection (`analysis/projection.py`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# Hardware: per-GPU figures from vendor datasheets (dense BF16, i.e. without 2:4 sparsity)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    name: str
    """Display name."""
    hbm_tb_s: float
    """Peak HBM bandwidth per GPU, TB/s."""
    bf16_tflops: float
    """Peak dense BF16 tensor throughput per GPU, TFLOP/s (datasheets quote 2x this with sparsity)."""
    memory_gb: float
    """HBM capacity per GPU, GB."""
    source: str
    """Where the figures come from."""


DEVICES: dict[str, Device] = {
    "h100": Device("H100 SXM", 3.35, 989.0, 80.0,
                   "NVIDIA H100 Tensor Core GPU datasheet, SXM column (nvidia.com/en-us/data-center/h100): "
                   "BF16 1,979 TFLOPS with sparsity, 3.35 TB/s, 80 GB"),
    "h200": Device("H200 SXM", 4.8, 989.0, 141.0,
                   "NVIDIA H200 Tensor Core GPU datasheet, SXM column (nvidia.com/en-us/data-center/h200): "
                   "BF16 1,979 TFLOPS with sparsity, 4.8 TB/s, 141 GB"),
    "b200": Device("B200 (HGX, 1000 W)", 8.0, 2250.0, 180.0,
                   "NVIDIA HGX B200 specifications (nvidia.com/en-us/data-center/hgx): 8 GPUs = 36 PFLOPS "
                   "FP16/BF16 sparse, 1.44 TB HBM3e, 64 TB/s; per GPU 2.25 PF dense, 180 GB, 8 TB/s"),
    "gb200": Device("GB200 (Blackwell GPU in NVL72)", 8.0, 2500.0, 186.0,
                    "NVIDIA GB200 NVL72 specifications (nvidia.com/en-us/data-center/gb200-nvl72): 72 GPUs = "
                    "360 PFLOPS FP16/BF16 sparse, 13.4 TB HBM3e, 576 TB/s; per GPU 2.5 PF dense, ~186 GB, 8 TB/s"),
    "cpu-2core": Device("this machine: 2 vCPU AMD EPYC (Zen 4)", 0.02, 0.1, 24.0,
                        "ROUGH, not a datasheet: numpy copy measured ~20 GB/s and fp32 GEMM ~0.06 TFLOP/s on "
                        "2 cores; 0.1 TFLOP/s assumes AVX-512 BF16 helps a little. Order of magnitude only"),
}

# ----------------------------------------------------------------------------------------------
# Models: Qwen3 presets (Qwen3 technical report, arXiv 2505.09388, and each model's config.json)
# ----------------------------------------------------------------------------------------------

DRAFT_VOCAB = 32_000  # EAGLE-3 heads predict over a reduced draft vocabulary


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """Display name."""
    params_b: float
    """Total parameters, billions (embeddings and lm_head included)."""
    active_params_b: float
    """Parameters used per token, billions (= params_b for a dense model)."""
    layers: int
    """Decoder layers."""
    hidden: int
    """Model width."""
    q_heads: int
    """Query heads (attention FLOPs scale with q_heads x head_dim)."""
    kv_heads: int
    """Key/value heads (the KV cache scales with kv_heads x head_dim)."""
    head_dim: int
    """Per-head width."""
    draft_intermediate: int
    """MLP width of an EAGLE-3 head for this target (the target's own for dense models)."""
    expert_params_b: float = 0.0
    """MoE: parameters in routed experts, billions (0 for a dense model)."""
    experts: int = 0
    """MoE: routed experts per layer."""
    experts_per_token: int = 0
    """MoE: experts each token is routed to."""
    bytes_per_param: float = 2.0
    """Bytes per weight and per KV element (bf16 = 2)."""

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param  # K and V

    def weight_bytes_read(self, tokens: np.ndarray | float) -> np.ndarray | float:
        """HBM bytes of weights one forward over `tokens` tokens reads.

        Dense: all weights. MoE: non-expert weights plus each expert that at least one of the
        tokens is routed to; with uniform routing an expert is missed by all of them with
        probability (1 - experts_per_token / experts) ** tokens.
        """
        dense = (self.params_b - self.expert_params_b) * 1e9
        if not self.experts:
            return np.asarray(tokens) * 0.0 + dense * self.bytes_per_param
        hit = 1.0 - (1.0 - self.experts_per_token / self.experts) ** np.asarray(tokens, dtype=float)
        return (dense + self.expert_params_b * 1e9 * hit) * self.bytes_per_param

    def drafter(self) -> ModelSpec:
        """The EAGLE-3 head of this target: fc (3H -> H), one decoder layer whose attention
        reads 2H-wide inputs, a dense MLP, and an lm_head over the draft vocabulary."""
        h, q, kv = self.hidden, self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        params = 3 * h * h + 2 * h * (q + 2 * kv) + q * h + 3 * h * self.draft_intermediate + DRAFT_VOCAB * h
        return ModelSpec(f"EAGLE-3 head of {self.name}", params / 1e9, params / 1e9, 1, h, self.q_heads,
                         self.kv_heads, self.head_dim, self.draft_intermediate, bytes_per_param=self.bytes_per_param)


def _qwen3(name, params_b, layers, hidden, q, kv, inter, active_b=None, expert_b=0.0, experts=0, top_k=0):
    return ModelSpec(name, params_b, active_b or params_b, layers, hidden, q, kv, 128, inter, expert_b, experts, top_k)


MODELS: dict[str, ModelSpec] = {
    "qwen3-1.7b": _qwen3("Qwen3-1.7B", 1.7, 28, 2048, 16, 8, 6144),
    "qwen3-4b": _qwen3("Qwen3-4B", 4.0, 36, 2560, 32, 8, 9728),
    "qwen3-8b": _qwen3("Qwen3-8B", 8.2, 36, 4096, 32, 8, 12288),
    "qwen3-14b": _qwen3("Qwen3-14B", 14.8, 40, 5120, 40, 8, 17408),
    "qwen3-32b": _qwen3("Qwen3-32B", 32.8, 64, 5120, 64, 8, 25600),
    # MoE: experts hold 3 x hidden x moe_intermediate per expert per layer (768 and 1536 wide).
    # The EAGLE-3 head of a MoE target is assumed dense, with a 3 x hidden MLP.
    "qwen3-30b-a3b": _qwen3("Qwen3-30B-A3B", 30.5, 48, 2048, 32, 4, 6144, 3.3, 3 * 2048 * 768 * 128 * 48 / 1e9, 128, 8),
    "qwen3-235b-a22b": _qwen3("Qwen3-235B-A22B", 235.0, 94, 4096, 64, 4, 12288, 22.0,
                              3 * 4096 * 1536 * 128 * 94 / 1e9, 128, 8),
}
