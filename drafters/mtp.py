"""Multi-token-prediction head in the DeepSeek-V3 style, served by vLLM's `mtp` method.

Architecture (DeepSeek-V3 section 2.2, one MTP module):
    x      = input_proj(concat(hidden_layernorm(h), token_layernorm(embed(next token))))   # [2H] -> [H]
    r      = x + attn(input_layernorm(x));  y = r + mlp(post_attention_layernorm(r))       # one block
    out    = final_layernorm(y);  logits = lm_head(out)                                      # target's head
with `h` the target's final hidden state (step 0) or the previous step's `out` (steps >= 1), and the
embedding and output head shared with the target.

Serving route: vLLM's MiMo MTP layer (`MiMoMTPModel`, vllm/model_executor/models/mimo_mtp.py) has
exactly this shape for a dense target: two RMSNorms, a projection, a Qwen2 block (q/k/v with bias)
and a final RMSNorm, with the target's embedding and head shared. The checkpoint declares
`architectures: ["MiMoForCausalLM"]` with `num_nextn_predict_layers: 1`, which vLLM's speculative
config rewrites into that MTP model; it is served with `method: "mtp"`. That layer takes its shape
(heads, KV heads, MLP width, head width = hidden / heads) and its layer count from the *target's*
config, so the head is built with the target's shape and the engine passes
`hf_overrides={"num_nextn_predict_layers": 1}` for the target. vLLM hands an MTP head the
target's final hidden state after its final norm, and zeroes the token embedding at position 0;
training here does the same. (vLLM's `eagle` route would also serve a head of this shape, but
without the two input norms and the final norm, which are not foldable into its weights.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codraft.drafter import DRAFTERS, Drafter, DrafterMismatch, Features, TargetParts, shifted, target_shape
from codraft.nn import DraftBlock, RMSNorm

PREFIX = "model.mtp_layers.0."


@DRAFTERS.register("mtp")
class MTPDrafter(Drafter):
    description = "DeepSeek-V3-style MTP head on the target's final hidden state; target's embedding and head; vLLM `mtp`."
    method = "mtp"
    needs_last = True

    def __init__(self, shape: dict, heads: int, kv_heads: int, intermediate: int):
        super().__init__()
        H, eps = shape["hidden_size"], shape["rms_norm_eps"]
        self.shape = dict(shape, mtp_heads=heads, mtp_kv_heads=kv_heads, mtp_intermediate=intermediate)
        self.token_layernorm = RMSNorm(H, eps)
        self.hidden_layernorm = RMSNorm(H, eps)
        self.input_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, eps)
        self.block = DraftBlock(H, H, heads, kv_heads, H // heads, intermediate, eps, shape["rope_theta"], qkv_bias=True)
        self.final_layernorm = RMSNorm(H, eps)

    @classmethod
    def build(cls, policy: nn.Module, settings=None, token_counts=None) -> "MTPDrafter":
        # vLLM builds the MTP block from the *target's* config (heads, KV heads, MLP width), with a
        # Qwen2 attention whose head width is hidden / heads; the head here is shaped the same way.
        shape = target_shape(policy.config)
        drafter = cls(shape, shape["num_heads"], shape["num_kv_heads"], shape["intermediate_size"])
        with torch.no_grad():
            drafter.block.q_proj.bias.zero_()
            drafter.block.k_proj.bias.zero_()
            drafter.block.v_proj.bias.zero_()
        return drafter

    def check_fits(self, policy_config) -> None:
        shape = target_shape(policy_config)
        mine = (self.shape["mtp_heads"], self.shape["mtp_kv_heads"], self.shape["mtp_intermediate"])
        theirs = (shape["num_heads"], shape["num_kv_heads"], shape["intermediate_size"])
        if mine != theirs:
            raise DrafterMismatch(f"MTP head (heads, KV heads, MLP width) {mine} must equal the target's {theirs}: vLLM builds it from the target's config")
        if self.shape["hidden_size"] != shape["hidden_size"]:
            raise DrafterMismatch(f"MTP head hidden size {self.shape['hidden_size']} does not fit the target's {shape['hidden_size']}")
        if self.shape["vocab_size"] != shape["vocab_size"]:
            raise DrafterMismatch(f"MTP head vocabulary {self.shape['vocab_size']} does not fit the target's {shape['vocab_size']}")

    def unroll(self, feats: Features, target: TargetParts, steps: int) -> list[tuple[torch.Tensor, int]]:
        ids, mask = feats.input_ids, feats.attention_mask
        T = ids.shape[1]
        hidden = feats.last.to(self.input_proj.weight.dtype)  # [B, T, H] target's final (normed) hidden
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outs = []
        for j in range(steps):
            positions = torch.arange(T, device=ids.device) + j
            emb = F.embedding(shifted(ids, 1 + j), target.embed).to(hidden.dtype)  # [B, T, H]
            emb = torch.where((positions == 0)[None, :, None], torch.zeros_like(emb), emb)
            x = self.input_proj(torch.cat([self.hidden_layernorm(hidden), self.token_layernorm(emb)], dim=-1))
            q, k, v = self.block.qkv(self.input_layernorm(x), positions)
            keys.append(k)
            values.append(v)
            r = x + self.block.attend(q, keys, values, mask)
            hidden = self.final_layernorm(r + self.block.mlp(self.block.post_attention_layernorm(r)))
            logits = hidden.float() @ target.lm_head.float().T  # [B, T, V]
            outs.append((logits, 1 + j))
        return outs

    def target_overrides(self) -> dict:
        """vLLM's MiMo MTP layer reads its layer count from the target's config."""
        return {"num_nextn_predict_layers": 1}

    def hf_config(self) -> dict:
        s = self.shape
        return {
            "architectures": ["MiMoForCausalLM"],
            "model_type": "qwen2",
            "num_nextn_predict_layers": 1,
            "num_hidden_layers": 1,
            "hidden_size": s["hidden_size"],
            "intermediate_size": s["mtp_intermediate"],
            "num_attention_heads": s["mtp_heads"],
            "num_key_value_heads": s["mtp_kv_heads"],
            "rms_norm_eps": s["rms_norm_eps"],
            "rope_theta": s["rope_theta"],
            "rope_parameters": {"rope_type": "default", "rope_theta": s["rope_theta"]},
            "max_position_embeddings": s["max_position_embeddings"],
            "vocab_size": s["vocab_size"],
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    def serving_weights(self) -> dict[str, torch.Tensor]:
        return {
            PREFIX + "token_layernorm.weight": self.token_layernorm.weight,
            PREFIX + "hidden_layernorm.weight": self.hidden_layernorm.weight,
            PREFIX + "input_proj.weight": self.input_proj.weight,
            PREFIX + "input_layernorm.weight": self.input_layernorm.weight,
            **self.block.hf_state(PREFIX),
            PREFIX + "final_layernorm.weight": self.final_layernorm.weight,
        }

    @classmethod
    def from_checkpoint(cls, config: dict, weights: dict[str, torch.Tensor], policy: nn.Module) -> "MTPDrafter":
        shape = target_shape(policy.config)
        shape.update(hidden_size=config["hidden_size"], vocab_size=config["vocab_size"])
        drafter = cls(shape, config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"])
        drafter.load_serving_weights(weights)
        return drafter
