"""LoRA on the policy through peft, and the merged weights the rollout engine serves.

    policy = apply_lora(policy, LoRAConfig(rank=16))     # peft model; only adapter weights train
    trainer = GRPOTrainer(policy, cfg.grpo, ...)          # the optimizer sees the adapters only
    engine.load_policy_weights(merged_state_dict(policy).items())   # W + scaling * B @ A, HF names

Why the engine gets merged weights instead of serving the adapter with vLLM's LoRA support:
- One code path: the engine's in-place reload of its base weights (`load_policy_weights`) already
  works on CPU and GPU; merged weights are just new base weights, with no adapter manager, no
  adapter files written per step, and no `LoRARequest` threaded through generation.
- The drafter is distilled against the policy the engine samples from, i.e. the merged policy;
  serving the adapter separately would leave the engine's base-plus-adapter path as a second
  definition of "the policy" for the drafter and the losslessness check.
- vLLM's LoRA path costs per request: punica kernels add the adapter's matmuls to every LoRA'd
  layer at each step, and on CPU (vLLM 0.32, `platforms/cpu.py`) enabling LoRA turns torch.compile
  off (`CompilationMode.NONE`), which DESIGN.md measured at ~3x the per-step floor.
- LoRA with speculative decoding is recent and partial in vLLM. What the installed vLLM 0.32 source
  shows: the target applies the adapter to all k + 1 verified tokens (`gpu_model_runner` sizes the
  LoRA mapping with `num_draft_tokens + 1`), the drafter never uses the target's adapter (model
  runner v2 strips it from the shared embedding: `spec_decode/eagle/utils.py`), engine arguments
  require `max_num_batched_tokens >= max_num_seqs * (k + 1)` with both on, and adaptive
  verification refuses LoRA. Support arrived in the V1 engine in mid-2025 (vllm PR #21068, GPU
  only); V0 failed with shape errors (issue #4872), and vLLM's feature matrix listed
  LoRA x speculative decoding as incompatible until it was marked partial (EAGLE-3 tested).
  Merging sidesteps all of it: the engine serves a plain model.

The merge never touches the training model: per wrapped layer it computes W + scaling * B @ A
into a new tensor (other tensors are returned as they are, sharing storage like `state_dict()`).
"""
from __future__ import annotations

import torch

from codraft.config import LoRAConfig


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """`model` with LoRA adapters (a peft model; only adapter weights require grad), or `model` itself at rank 0.

    peft injects the adapters into `model` in place; its original weights are frozen, not copied.
    """
    if cfg.rank <= 0:
        return model
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (carries adapters)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the optimizer updates."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def base_name(key: str) -> str:
    """A peft state-dict key in the base model's Hugging Face name:
    `base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


def merged_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The base model's weights with the active adapters merged (W + scaling * B @ A), in HF names.

    `weights` is the peft model's state dict (default: `model.state_dict()`); pass a gathered one
    (FSDP2's full state dict) to merge weights this process does not hold. Scalings and active
    adapters are read from `model`'s LoRA layers. Supports plain LoRA on linear layers.
    """
    from peft.tuners.lora import LoraLayer

    weights = model.state_dict() if weights is None else weights
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if any(part in key for part in ("lora_magnitude_vector", "modules_to_save", "lora_embedding")):
            raise NotImplementedError(f"merged_state_dict handles plain LoRA on linear layers only, not {key!r}")
        if ".lora_A." in key or ".lora_B." in key:
            continue
        layer_name = key.removesuffix(".base_layer.weight")
        layer = layers.get(layer_name) if key.endswith(".base_layer.weight") else None
        if layer is None:
            out[base_name(key)] = value
            continue
        merged = value.float()  # [out, in]
        for adapter in layer.active_adapters:
            a = weights[f"{layer_name}.lora_A.{adapter}.weight"].float()  # [r, in]
            b = weights[f"{layer_name}.lora_B.{adapter}.weight"].float()  # [out, r]
            delta = b @ a
            merged = merged + layer.scaling[adapter] * (delta.T if layer.fan_in_fan_out else delta)
        out[base_name(key)] = merged.to(value.dtype)
    return out
