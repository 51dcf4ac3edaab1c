"""A small independent Qwen3 draft model (1-2 layers) on the target's tokenizer, served by vLLM's
`draft_model` method.

It reads no target features: it is a language model of its own, started from the target's
embedding and output head and distilled to the target's next-token distributions. At serving time
vLLM runs it autoregressively for k tokens, so one teacher-forced pass over a sequence trains every
draft position at once (shift 0: its prediction at i competes with the target's at i).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codraft.config import ConfigError
from codraft.drafter import DRAFTERS, Drafter, DrafterMismatch, Features, TargetParts, target_shape


@dataclass(frozen=True)
class DraftModelConfig:
    num_layers: int = 1
    """Decoder layers of the small draft model (1-4)."""

    def validate(self, prefix: str = "drafter.args.") -> None:
        if not 1 <= self.num_layers <= 4:
            raise ConfigError(f"config key '{prefix}num_layers' must be in 1..4 (a draft model here has 1-4 layers), got {self.num_layers}")


@DRAFTERS.register("draft_model")
class DraftModelDrafter(Drafter):
    description = "A small independent Qwen3 (1-4 layers) on the target's tokenizer; vLLM `draft_model`."
    Config = DraftModelConfig
    method = "draft_model"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def build(cls, policy: nn.Module, settings: DraftModelConfig, token_counts=None) -> "DraftModelDrafter":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        s = target_shape(policy.config)
        settings.validate()
        config = Qwen3Config(
            vocab_size=s["vocab_size"],
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=settings.num_layers,
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"],
            head_dim=s["head_dim"],
            max_position_embeddings=s["max_position_embeddings"],
            rms_norm_eps=s["rms_norm_eps"],
            rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]},
            tie_word_embeddings=False,
            eos_token_id=policy.config.eos_token_id,
            pad_token_id=getattr(policy.config, "pad_token_id", None),
        )
        model = Qwen3ForCausalLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(policy.get_input_embeddings().weight)
            model.get_output_embeddings().weight.copy_(policy.get_output_embeddings().weight)
            model.model.norm.weight.copy_(policy.model.norm.weight)
        return cls(model)

    def check_fits(self, policy_config) -> None:
        mine, target = self.model.config.vocab_size, policy_config.vocab_size
        if mine != target:
            raise DrafterMismatch(f"draft model vocabulary {mine} does not fit the target's {target} (it must share the tokenizer)")

    def unroll(self, feats: Features, target: TargetParts, steps: int) -> list[tuple[torch.Tensor, int]]:
        logits = self.model(input_ids=feats.input_ids, attention_mask=feats.attention_mask).logits  # [B, T, V]
        return [(logits.float(), 0)]

    def hf_config(self) -> dict:
        config = self.model.config.to_dict()
        config["architectures"] = ["Qwen3ForCausalLM"]
        config["torch_dtype"] = "bfloat16"
        config.pop("dtype", None)
        return config

    def serving_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    @classmethod
    def from_checkpoint(cls, config: dict, weights: dict[str, torch.Tensor], policy: nn.Module) -> "DraftModelDrafter":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        fields = {k: v for k, v in config.items() if k not in ("architectures", "codraft_kind", "torch_dtype", "model_type", "transformers_version")}
        model = Qwen3ForCausalLM(Qwen3Config(**fields))
        try:
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise DrafterMismatch(f"draft model checkpoint does not match its config: {str(err).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise DrafterMismatch(f"draft model checkpoint does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return cls(model)

    def speculative_config(self, path, k: int) -> dict:
        return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k}
