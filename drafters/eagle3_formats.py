"""EAGLE-3 checkpoints in the two layouts vLLM reads, to and from codraft's `Eagle3Drafter`.

    ckpt = read_eagle3(config, weights, policy.config, policy.get_input_embeddings().weight)
    config, tensors = to_speculators(drafter.hf_config(), drafter.serving_weights(), verifier, k=3)

- classic (the EAGLE authors, SpecForge, AngelSlim; what codraft serves): config.json with
  `architectures: ["LlamaForCausalLMEagle3"]` (or `Eagle3LlamaForCausalLM`) and the Llama layer's
  fields at top level; tensors `fc`, `midlayer.*` (or `layers.0.*`), `norm`, `lm_head`, optional `d2t`
  (offsets: target id = draft id + d2t[draft id]), `t2d` (a bool mask over the target vocabulary,
  which vLLM skips) and `embed_tokens`.
- vLLM's `speculators` library (`speculators_model_type: "eagle3"`): the layer's fields under
  `transformer_layer_config`, the EAGLE-3 ones at top level, `speculators_config` with the proposal
  methods and the verifier (the target); tensors as above, the layer under `layers.0.*`.

An absent field means what vLLM makes of it (vllm/transformers_utils/configs/speculators/algos.py
`update_eagle3`, vllm/model_executor/models/llama_eagle3.py): `norm_before_residual` is False in the
classic layout and True in the speculators one, absent aux layer ids are vLLM's (2, L/2, L-3), layer
fields default as in LlamaConfig. A checkpoint whose computation codraft's head does not reproduce
(a qwen3 layer with q/k norms, norm_before_fc, fc_norm, norm_output, several layers, scaled rope, a
target hidden size of its own) is refused with the reason, as is one that does not fit the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from codraft.drafter import DrafterMismatch

SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config layout this writes
LAYER_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
              "rms_norm_eps", "max_position_embeddings", "hidden_act", "attention_bias", "tie_word_embeddings")


@dataclass
class Eagle3Checkpoint:
    """What codraft's EAGLE-3 head is built from, whatever layout it came in."""

    head: dict  # the layer's shape (target_shape keys: hidden_size, num_heads, ...) and attention_bias
    vocab_size: int  # the target vocabulary the head was made for
    aux_layers: tuple[int, ...]
    draft_ids: torch.Tensor | None  # [Vd] target id of each draft id; None: the draft vocabulary is the target's
    norm_before_residual: bool  # the residual around attention is hidden_norm(g) rather than g
    weights: dict[str, torch.Tensor]  # codraft's names (`midlayer.*`), without d2t / t2d (embed_tokens only when the head's own)
    embed: torch.Tensor | None  # [V, H] the head's own token embedding, when it differs from the target's


def read_eagle3(config: dict, weights: dict[str, torch.Tensor], target_config, target_embed: torch.Tensor | None) -> Eagle3Checkpoint:
    """A classic or speculators EAGLE-3 checkpoint, as codraft's head reads it (DrafterMismatch says why not)."""
    speculators = "speculators_model_type" in config
    layer = (config.get("transformer_layer_config") or {}) if speculators else config
    refuse_unsupported(config, layer, "speculators EAGLE-3 checkpoint" if speculators else "EAGLE-3 checkpoint")
    head = head_shape(layer)
    vocab = layer.get("vocab_size")
    if not vocab:
        raise DrafterMismatch("EAGLE-3 checkpoint config names no vocab_size (the target vocabulary it drafts for)")
    tensors = codraft_names(weights)
    draft_ids = draft_vocabulary(tensors, int(config.get("draft_vocab_size") or vocab), vocab)
    embed = own_embedding(tensors.pop("embed_tokens.weight", None), target_embed, vocab, head["hidden_size"])
    if embed is not None:
        tensors["embed_tokens.weight"] = embed
    return Eagle3Checkpoint(
        head=head, vocab_size=vocab, aux_layers=aux_layer_ids(config, target_config.num_hidden_layers), draft_ids=draft_ids,
        norm_before_residual=bool(config.get("norm_before_residual", speculators)), weights=tensors, embed=embed,
    )


def refuse_unsupported(config: dict, layer: dict, where: str) -> None:
    """DrafterMismatch for what vLLM would compute with this checkpoint and codraft's head does not."""
    layer_type = layer.get("model_type", "llama")
    if layer_type != "llama":
        raise DrafterMismatch(f"{where} has a {layer_type!r} decoder layer (vLLM serves it as Eagle3Qwen3ForCausalLM, with q/k norms); codraft's EAGLE-3 head is a Llama layer")
    eagle = config.get("eagle_config") or {}
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if config.get(flag) or eagle.get(flag):
            raise DrafterMismatch(f"{where} sets {flag}, which codraft's EAGLE-3 head does not compute")
    if eagle.get("use_aux_hidden_state") is False:
        raise DrafterMismatch(f"{where} sets use_aux_hidden_state=false (no fc over target layers); codraft's EAGLE-3 head fuses three target layers")
    if layer.get("num_hidden_layers", 1) != 1:
        raise DrafterMismatch(f"{where} has {layer['num_hidden_layers']} decoder layers; codraft's EAGLE-3 head has one")
    if layer.get("mlp_bias") or layer.get("hidden_act", "silu") != "silu":
        raise DrafterMismatch(f"{where} has an MLP with bias or activation {layer.get('hidden_act')!r}; codraft's EAGLE-3 head has a bias-free SwiGLU MLP")
    rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "nested"
    if rope_type != "default":
        raise DrafterMismatch(f"{where} uses {rope_type!r} rope scaling; codraft's EAGLE-3 head implements plain rotary embeddings")
    target_hidden = config.get("target_hidden_size") or layer.get("target_hidden_size")
    if target_hidden and target_hidden != layer.get("hidden_size"):
        raise DrafterMismatch(f"{where} projects a target hidden size {target_hidden} to its own {layer.get('hidden_size')}; codraft's EAGLE-3 head has the target's width")


def head_shape(layer: dict) -> dict:
    """The decoder layer's shape, absent fields as LlamaConfig's defaults (what vLLM builds)."""
    if "hidden_size" not in layer:
        raise DrafterMismatch("EAGLE-3 checkpoint config names no hidden_size")
    hidden, heads = layer["hidden_size"], layer.get("num_attention_heads", 32)
    rope = layer.get("rope_parameters") or {}
    return {
        "hidden_size": hidden,
        "num_heads": heads,
        "num_kv_heads": layer.get("num_key_value_heads") or heads,
        "head_dim": layer.get("head_dim") or hidden // heads,
        "intermediate_size": layer.get("intermediate_size", 11008),
        "rms_norm_eps": layer.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", layer.get("rope_theta", 10000.0))),
        "max_position_embeddings": layer.get("max_position_embeddings", 2048),
        "attention_bias": bool(layer.get("attention_bias", False)),
    }


def aux_layer_ids(config: dict, num_layers: int) -> tuple[int, ...]:
    """The checkpoint's aux layer ids (top level, else under eagle_config), else vLLM's default."""
    ids = config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids:
        return tuple(int(i) for i in ids)
    ids = (2, num_layers // 2, num_layers - 3)  # vLLM's get_eagle3_default_aux_hidden_state_layers, speculators' too
    if len(set(ids)) != 3 or min(ids) < 0:
        raise DrafterMismatch(f"EAGLE-3 checkpoint names no aux layer ids, and vLLM's default (2, L/2, L-3) = {list(ids)} for a {num_layers}-layer target is not 3 distinct layers")
    return ids


def codraft_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under codraft's names: the decoder layer as `midlayer.*` (vLLM maps it to layers.0.*)."""
    out = {}
    for name, tensor in weights.items():
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
        elif name.startswith("layers."):
            raise DrafterMismatch(f"EAGLE-3 checkpoint has more than one decoder layer ({name}); codraft's EAGLE-3 head has one")
        out[name] = tensor
    return out


def draft_vocabulary(tensors: dict[str, torch.Tensor], draft_vocab: int, vocab: int) -> torch.Tensor | None:
    """Target id of each draft id from d2t (checked against t2d when present); pops both from `tensors`."""
    d2t, t2d = tensors.pop("d2t", None), tensors.pop("t2d", None)
    if d2t is None:
        if t2d is not None:
            raise DrafterMismatch("EAGLE-3 checkpoint has t2d but no d2t; vLLM maps draft ids to target ids through d2t only")
        if draft_vocab != vocab:
            raise DrafterMismatch(f"EAGLE-3 draft vocabulary of {draft_vocab} tokens (target: {vocab}) needs d2t to map its ids")
        return None
    if d2t.dim() != 1 or d2t.is_floating_point() or len(d2t) != draft_vocab:
        raise DrafterMismatch(f"EAGLE-3 d2t must be a 1-D integer tensor over the {draft_vocab} draft ids (draft_vocab_size), got {d2t.dtype} {tuple(d2t.shape)}")
    ids = torch.arange(len(d2t)) + d2t.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise DrafterMismatch(f"EAGLE-3 d2t maps draft ids to token ids outside the target vocabulary of {vocab}")
    if len(ids.unique()) != len(ids):
        raise DrafterMismatch("EAGLE-3 d2t maps two draft ids to the same target id")
    if t2d is not None:
        check_t2d(t2d, ids, vocab)
    if len(ids) == vocab:
        if (d2t != 0).any():
            raise DrafterMismatch("EAGLE-3 d2t permutes a full-size draft vocabulary; vLLM ignores d2t when the draft vocabulary is the target's")
        return None
    return ids


def check_t2d(t2d: torch.Tensor, ids: torch.Tensor, vocab: int) -> None:
    """t2d[v] must be True exactly for the target ids that d2t maps to."""
    if t2d.dim() != 1 or len(t2d) != vocab:
        raise DrafterMismatch(f"EAGLE-3 t2d covers {tuple(t2d.shape)} tokens, the checkpoint's target vocabulary has {vocab}")
    marked = set(t2d.bool().nonzero().flatten().tolist())
    mapped = set(ids.tolist())
    if marked != mapped:
        raise DrafterMismatch(
            f"EAGLE-3 t2d disagrees with d2t: t2d marks {len(marked)} tokens, d2t maps {len(mapped)} "
            f"(marked, not mapped: {sorted(marked - mapped)[:4]}; mapped, not marked: {sorted(mapped - marked)[:4]})"
        )


def own_embedding(embed: torch.Tensor | None, target_embed: torch.Tensor | None, vocab: int, hidden: int) -> torch.Tensor | None:
    """The checkpoint's token embedding when it is the head's own; None when absent or the target's.

    vLLM shares the target's embedding when the checkpoint has none or an identical one, and keeps a
    distinct one (v1/spec_decode/llm_base_proposer.py `_maybe_share_embeddings`). Codraft shares one
    equal to the target's up to storage rounding (a copy kept in fp16 or bf16): its export then carries
    no embedding and vLLM shares too, so a hot swap never writes into the target's embedding."""
    if embed is None:
        return None
    if tuple(embed.shape) != (vocab, hidden):
        raise DrafterMismatch(f"EAGLE-3 embed_tokens has shape {tuple(embed.shape)}, the head needs ({vocab}, {hidden})")
    if target_embed is not None and not target_embed.is_meta and target_embed.shape == embed.shape:
        if torch.allclose(embed.float(), target_embed.detach().float().cpu(), rtol=2**-7, atol=1e-5):  # within about a bf16 step
            return None
    return embed.float()


def to_speculators(hf_config: dict, weights: dict[str, torch.Tensor], verifier: dict, k: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A codraft EAGLE-3 checkpoint (classic config and tensors) in the speculators layout.

    `verifier`: {"name_or_path": ..., "architectures": [...]}, the target vLLM loads with it;
    `k`: draft tokens per step, the proposal method's `speculative_tokens`."""
    if not verifier.get("name_or_path"):
        raise ValueError("a speculators checkpoint names its verifier (the target): give its name or path")
    layer = {key: hf_config[key] for key in LAYER_KEYS if key in hf_config}
    theta = float(hf_config["rope_theta"])
    layer.update(model_type="llama", mlp_bias=False, rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta}, torch_dtype="bfloat16")
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer,
        "draft_vocab_size": hf_config["draft_vocab_size"],
        "target_hidden_size": hf_config.get("target_hidden_size", hf_config["hidden_size"]),
        "eagle_aux_hidden_state_layer_ids": list(hf_config["eagle_aux_hidden_state_layer_ids"]),
        "norm_before_residual": bool(hf_config.get("norm_before_residual", False)),  # explicit: vLLM's default here is True
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(k), "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(verifier["name_or_path"]), "architectures": list(verifier.get("architectures") or [])},
        },
        "torch_dtype": "bfloat16",
    }
    tensors = {("layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name): t for name, t in weights.items()}
    if "d2t" in tensors:  # speculators stores both maps (and refuses one without the other)
        t2d = torch.zeros(hf_config["vocab_size"], dtype=torch.bool)
        t2d[torch.arange(len(tensors["d2t"])) + tensors["d2t"].long()] = True
        tensors["t2d"] = t2d
    return config, tensors
