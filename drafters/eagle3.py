"""EAGLE-3 head, served by vLLM's `eagle3` method (`LlamaForCausalLMEagle3`).

Architecture (what vLLM computes with these weights):
    g      = fc(concat(aux_low, aux_mid, aux_high))       # [H] from three target layers (step 0)
    x      = concat(input_layernorm(embed(token)), hidden_norm(g))   # [2H], embed shared with the target
    r      = g + attn(x)                                  # one Llama decoder layer, q/k/v take 2H
    g'     = r + mlp(post_attention_layernorm(r))         # pre-norm output, fed to the next draft step
    logits = lm_head(norm(g'))                            # own head over a draft vocabulary (d2t maps ids)
At draft step j >= 1 the hidden input is g' of step j-1 (no fc); training unrolls the steps
(training-time test) with the attention pattern vLLM sees (`codraft.nn.DraftBlock.attend`).
With `norm_before_residual` the residual is hidden_norm(g) instead of g (vLLM's flag of that name).

Checkpoints: codraft exports the classic layout (`LlamaForCausalLMEagle3`, what it serves) or vLLM's
`speculators` layout, and reads both as published (drafters/eagle3_formats.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codraft.config import ConfigError
from codraft.drafter import DRAFTERS, Drafter, DrafterMismatch, Features, TargetParts, shifted, target_shape
from codraft.nn import DraftBlock, RMSNorm
from drafters.eagle3_formats import read_eagle3, to_speculators


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's (2, L/2, L-3) when those are distinct and inside the target, else evenly spread ids."""
    ids = (2, num_layers // 2, num_layers - 3)
    if len(set(ids)) == 3 and min(ids) >= 0 and max(ids) < num_layers:
        return ids
    if num_layers < 3:
        raise DrafterMismatch(f"EAGLE-3 needs a target with at least 3 layers, got {num_layers}")
    return (1, num_layers // 2, num_layers - 1) if num_layers >= 4 else (0, 1, 2)


@dataclass(frozen=True)
class Eagle3Config:
    aux_layers: tuple[int, ...] = ()
    """The three target layers whose entering residual stream is fused (empty = automatic)."""
    draft_vocab_size: int = 0
    """Size of the reduced draft vocabulary, most frequent tokens first (0 = the target's)."""

    def validate(self, prefix: str = "drafter.args.") -> None:
        if self.draft_vocab_size < 0:
            raise ConfigError(f"config key '{prefix}draft_vocab_size' must be >= 0 (0 = the target's vocabulary)")


@DRAFTERS.register("eagle3")
class Eagle3Drafter(Drafter):
    description = "EAGLE-3 head: fuses three target layers, one decoder layer, own (reducible) vocabulary; vLLM `eagle3`."
    Config = Eagle3Config
    method = "eagle3"
    reads = ("architectures:LlamaForCausalLMEagle3", "architectures:Eagle3LlamaForCausalLM", "speculators:eagle3")

    def __init__(self, shape: dict, aux_layers: tuple[int, ...], draft_ids: torch.Tensor | None, norm_before_residual: bool = False, embed: torch.Tensor | None = None):
        super().__init__()
        H = shape["hidden_size"]
        self.shape = shape
        self.aux_layers = tuple(aux_layers)
        self.vocab_size = shape["vocab_size"]
        self.norm_before_residual = bool(norm_before_residual)
        vd = self.vocab_size if draft_ids is None else len(draft_ids)
        self.fc = nn.Linear(len(aux_layers) * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, shape["rms_norm_eps"])
        self.hidden_norm = RMSNorm(H, shape["rms_norm_eps"])
        self.block = DraftBlock(2 * H, H, shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], shape["intermediate_size"], shape["rms_norm_eps"], shape["rope_theta"],
                                qkv_bias=shape.get("attention_bias", False))
        self.norm = RMSNorm(H, shape["rms_norm_eps"])
        self.lm_head = nn.Linear(H, vd, bias=False)
        # draft id -> target id; None means the draft vocabulary is the target's
        self.register_buffer("draft_ids", draft_ids.long() if draft_ids is not None else None)
        # [V, H] a published head's own (frozen) token embedding; None: the target's, shared as vLLM shares it
        self.register_buffer("embed_tokens", embed.float() if embed is not None else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def head_shape(cls, policy: nn.Module, settings: Eagle3Config) -> dict:
        """The head's shape: the target's (a subclass may change, say, the MLP width; vLLM reads it
        from the exported config.json)."""
        return target_shape(policy.config)

    @classmethod
    def build(cls, policy: nn.Module, settings: Eagle3Config, token_counts: torch.Tensor | None = None) -> "Eagle3Drafter":
        shape = cls.head_shape(policy, settings)
        aux = tuple(settings.aux_layers) if settings.aux_layers else default_aux_layers(shape["num_layers"])
        draft_ids = None
        if 0 < settings.draft_vocab_size < shape["vocab_size"]:
            counts = token_counts if token_counts is not None else torch.zeros(shape["vocab_size"])
            draft_ids = torch.sort(torch.topk(counts.float(), settings.draft_vocab_size).indices).values
        drafter = cls(shape, aux, draft_ids)
        drafter.check_fits(policy.config)
        with torch.no_grad():  # start from the target's output head rows
            head = policy.get_output_embeddings().weight.detach().float()
            drafter.lm_head.weight.copy_(head if draft_ids is None else head[draft_ids])
        return drafter

    def check_fits(self, policy_config) -> None:
        shape = target_shape(policy_config)
        L = shape["num_layers"]
        if len(self.aux_layers) != 3 or len(set(self.aux_layers)) != 3:
            raise DrafterMismatch(f"EAGLE-3 needs 3 distinct aux layer ids, got {list(self.aux_layers)} (vLLM drops duplicates silently)")
        if min(self.aux_layers) < 0 or max(self.aux_layers) >= L:
            raise DrafterMismatch(f"EAGLE-3 aux layer ids {list(self.aux_layers)} out of range for a {L}-layer target (valid: 0..{L - 1})")
        if self.shape["hidden_size"] != shape["hidden_size"]:
            raise DrafterMismatch(f"EAGLE-3 hidden size {self.shape['hidden_size']} does not fit the target's {shape['hidden_size']}")
        if self.vocab_size != shape["vocab_size"]:
            raise DrafterMismatch(f"EAGLE-3 vocabulary {self.vocab_size} does not fit the target's {shape['vocab_size']}")
        if self.draft_ids is not None and int(self.draft_ids.max()) >= shape["vocab_size"]:
            raise DrafterMismatch("EAGLE-3 draft vocabulary maps to token ids outside the target vocabulary")

    # ------------------------------------------------------------------ compute
    def full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [.., Vd] -> target-vocabulary logits [.., V] (-inf off the draft vocab)."""
        if self.draft_ids is None:
            return logits
        out = logits.new_full(logits.shape[:-1] + (self.vocab_size,), float("-inf"))
        out[..., self.draft_ids] = logits
        return out

    def unroll(self, feats: Features, target: TargetParts, steps: int) -> list[tuple[torch.Tensor, int]]:
        ids, mask = feats.input_ids, feats.attention_mask
        T = ids.shape[1]
        hidden = self.fc(feats.aux.to(self.fc.weight.dtype))  # [B, T, H]
        table = self.embed_tokens if self.embed_tokens is not None else target.embed  # [V, H]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outs = []
        for j in range(steps):
            token = shifted(ids, 1 + j)  # the token after the one at i + j
            emb = F.embedding(token, table).to(hidden.dtype)  # [B, T, H]
            positions = torch.arange(T, device=ids.device) + j
            normed = self.hidden_norm(hidden)
            x = torch.cat([self.input_layernorm(emb), normed], dim=-1)  # [B, T, 2H]
            q, k, v = self.block.qkv(x, positions)
            keys.append(k)
            values.append(v)
            residual = (normed if self.norm_before_residual else hidden) + self.block.attend(q, keys, values, mask)
            hidden = residual + self.block.mlp(self.block.post_attention_layernorm(residual))  # pre-norm output
            logits = self.lm_head(self.norm(hidden))  # [B, T, Vd]
            outs.append((self.full_vocab(logits.float()), 1 + j))
        return outs

    # ------------------------------------------------------------------ checkpoint
    def hf_config(self) -> dict:
        s = self.shape
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": s["hidden_size"],
            "target_hidden_size": s["hidden_size"],
            "intermediate_size": s["intermediate_size"],
            "num_attention_heads": s["num_heads"],
            "num_key_value_heads": s["num_kv_heads"],
            "head_dim": s["head_dim"],
            "num_hidden_layers": 1,
            "rms_norm_eps": s["rms_norm_eps"],
            "rope_theta": s["rope_theta"],
            "max_position_embeddings": s["max_position_embeddings"],
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.lm_head.weight.shape[0],
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": bool(s.get("attention_bias", False)),
            "norm_before_residual": self.norm_before_residual,
            "eagle_aux_hidden_state_layer_ids": list(self.aux_layers),
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layers), "use_aux_hidden_state": True},
            "torch_dtype": "bfloat16",
        }

    def serving_weights(self) -> dict[str, torch.Tensor]:
        out = {
            "fc.weight": self.fc.weight,
            "midlayer.input_layernorm.weight": self.input_layernorm.weight,
            "midlayer.hidden_norm.weight": self.hidden_norm.weight,
            **self.block.hf_state("midlayer."),
            "norm.weight": self.norm.weight,
            "lm_head.weight": self.lm_head.weight,
        }
        if self.draft_ids is not None:
            out["d2t"] = self.draft_ids - torch.arange(len(self.draft_ids), device=self.draft_ids.device)  # offsets: target = draft + d2t
        if self.embed_tokens is not None:
            out["embed_tokens.weight"] = self.embed_tokens
        return out

    def speculators_checkpoint(self, verifier: dict, k: int) -> tuple[dict, dict[str, torch.Tensor]]:
        return to_speculators(self.hf_config(), self.serving_weights(), verifier, k)

    @classmethod
    def from_checkpoint(cls, config: dict, weights: dict[str, torch.Tensor], policy: nn.Module) -> "Eagle3Drafter":
        """Codraft's own export, or a published classic / speculators checkpoint (drafters/eagle3_formats.py)."""
        ckpt = read_eagle3(config, weights, policy.config, policy.get_input_embeddings().weight)
        shape = {**target_shape(policy.config), **ckpt.head, "vocab_size": ckpt.vocab_size}
        drafter = cls(shape, ckpt.aux_layers, ckpt.draft_ids, norm_before_residual=ckpt.norm_before_residual, embed=ckpt.embed)
        drafter.check_fits(policy.config)  # the reason it does not fit the target before any weight shape
        extra = sorted(set(ckpt.weights) - set(drafter.serving_weights()))
        if extra:
            raise DrafterMismatch(f"EAGLE-3 checkpoint holds tensors codraft's head does not compute: {extra[:4]}{'...' if len(extra) > 4 else ''}")
        drafter.load_serving_weights(ckpt.weights)
        return drafter
