"""Plain-PyTorch pieces of the draft heads: RMSNorm, rotary embeddings, and a decoder block whose
attention can be unrolled over several draft steps (training-time test).

The draft heads must compute exactly what vLLM's serving code computes with the same weights, so
these follow vLLM's Llama/Qwen2 layers: RMSNorm in fp32, neox-style rotary embeddings, grouped-query
attention, SwiGLU MLP.

Training-time test (EAGLE-3): draft step 0 runs over all positions with causal attention over
step-0 keys. At draft step j >= 1 the query at position i sits at position i + j; at serving time it
attends to the step-0 keys of positions <= i (the verified context) and to the keys that draft
steps 1..j wrote for this same chain. `DraftBlock.attend` computes exactly that pattern.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding. x [B, heads, T, hd], positions [B, T] (or [T])."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))  # [hd/2]
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, T, hd/2]
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)  # [B, 1, T, hd/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class DraftBlock(nn.Module):
    """A decoder block: attention over `in_width` inputs, SwiGLU MLP. Residual handling is the caller's."""

    def __init__(self, in_width: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float, theta: float, qkv_bias: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, head_dim, theta
        self.q_proj = nn.Linear(in_width, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(in_width, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(in_width, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, in_width] -> q [B, h, T, hd], k, v [B, kv, T, hd] with rotary applied."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotary(q, positions, self.theta), rotary(k, positions, self.theta), v

    def attend(self, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], key_mask: torch.Tensor) -> torch.Tensor:
        """Step-j attention: causal over keys[0] (the context), diagonal over keys[1..j] (this chain).

        q [B, h, T, hd]; keys[m], values[m] [B, kv, T, hd]; key_mask [B, T] (1 = real token).
        Returns the attention output projected back to the hidden width [B, T, hidden].
        """
        B, h, T, hd = q.shape
        rep = self.heads // self.kv_heads
        expand = lambda t: t.repeat_interleave(rep, dim=1)  # noqa: E731  [B, kv, T, hd] -> [B, h, T, hd]
        scale = 1.0 / math.sqrt(hd)
        k0, v0 = expand(keys[0]), expand(values[0])
        ctx = torch.matmul(q, k0.transpose(-1, -2)).float() * scale  # [B, h, T, T]
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & key_mask.bool()[:, None, None, :]
        ctx = ctx.masked_fill(~allowed, float("-inf"))
        diag = [(q * expand(k)).sum(-1, keepdim=True).float() * scale for k in keys[1:]]  # each [B, h, T, 1]
        probs = torch.cat([ctx] + diag, dim=-1).softmax(-1).to(q.dtype)  # [B, h, T, T + j]
        out = torch.matmul(probs[..., :T], v0)
        for m, v in enumerate(values[1:]):
            out = out + probs[..., T + m : T + m + 1] * expand(v)
        out = out.transpose(1, 2).reshape(B, T, h * hd)
        return self.o_proj(out)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def hf_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Weights under Hugging Face Llama/Qwen2 layer names (`self_attn.q_proj.weight`, `mlp.up_proj.weight`, ...)."""
        out = {}
        for name, tensor in self.state_dict().items():
            group = "mlp" if name.split(".")[0] in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[f"{prefix}{name}" if name.startswith("post_attention_layernorm") else f"{prefix}{group}.{name}"] = tensor
        return out

    def load_hf_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        mine = {}
        for name in self.state_dict():
            group = "mlp" if name.split(".")[0] in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"{prefix}{name}" if name.startswith("post_attention_layernorm") else f"{prefix}{group}.{name}"
            mine[name] = state[key]
        self.load_state_dict(mine)
