"""The drafter interface: a draft head that is distilled in PyTorch and served by vLLM.

A drafter kind is one module under `drafters/`, registered by name:

    @DRAFTERS.register("eagle3")
    class Eagle3Drafter(Drafter): ...

    drafter = build_drafter(policy, cfg.drafter)                      # fits the target's shapes
    outs = drafter.unroll(features, target_parts(policy), steps=3)   # teacher-forced draft logits
    drafter.export(run_dir / "drafter")                               # config.json + model.safetensors
    drafter = load_drafter(path, policy)   # codraft's export, or a published checkpoint a kind `reads`
    engine_kwargs = drafter.speculative_config(run_dir / "drafter", k=3)

`unroll` returns, per draft step j, draft logits over the target vocabulary [B, T, V] and the shift
s_j that aligns them with the target: the draft distribution at position i competes with the
policy's next-token distribution at position i + s_j (its logits row i + s_j).

Checkpoint names are the ones vLLM's loader reads, so the same tensors also hot-swap in place.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from codraft.config import DrafterConfig
from codraft.io import atomic_dir
from codraft.registry import Registry


class DrafterMismatch(ValueError):
    """A drafter checkpoint that does not fit the target (shapes, vocabulary, layer ids)."""


@dataclass(frozen=True)
class NoSettings:
    """A drafter kind without settings of its own."""


@dataclass
class Features:
    """What a drafter reads from one policy forward pass over a batch of sequences."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    aux: torch.Tensor | None = None  # [B, T, n_aux * H] residual stream entering the chosen layers (EAGLE-3)
    last: torch.Tensor | None = None  # [B, T, H] final hidden state after the final norm (MTP)


@dataclass
class TargetParts:
    """The target's live input embedding and output head, which some drafters share at serving time."""

    embed: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H]


def target_parts(policy: nn.Module) -> TargetParts:
    return TargetParts(policy.get_input_embeddings().weight.detach(), policy.get_output_embeddings().weight.detach())


def features_from_forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_states: tuple, aux_layers: tuple[int, ...], need_last: bool) -> Features:
    """Features from a Hugging Face forward with `output_hidden_states=True`.

    `hidden_states[L]` (L < num_layers) is the residual stream entering layer L, which is what vLLM
    hands EAGLE-3 for aux layer id L; `hidden_states[-1]` is after the final norm, which is what
    vLLM hands an MTP head.
    """
    aux = torch.cat([hidden_states[layer] for layer in aux_layers], dim=-1).float() if aux_layers else None
    last = hidden_states[-1].float() if need_last else None
    return Features(input_ids, attention_mask, aux, last)


def shifted(ids: torch.Tensor, shift: int, pad: int = 0) -> torch.Tensor:
    """ids[:, i + shift] at position i, `pad` past the end. [B, T] -> [B, T]."""
    out = torch.full_like(ids, pad)
    if shift < ids.shape[1]:
        out[:, : ids.shape[1] - shift] = ids[:, shift:]
    return out


def target_shape(config) -> dict:
    """The facts about a Hugging Face target config that drafters must fit."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    return {
        "hidden_size": hidden,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", heads) or heads,
        "head_dim": getattr(config, "head_dim", None) or hidden // heads,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": getattr(config, "rms_norm_eps", 1e-6),
        "rope_theta": _rope_theta(config),
        "max_position_embeddings": config.max_position_embeddings,
    }


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


class Drafter(nn.Module):
    """Base class of draft heads. Subclasses define the architecture, export and serving route."""

    name: ClassVar[str] = "drafter"
    description: ClassVar[str] = ""  # one line for `codraft drafters`
    Config: ClassVar[type] = NoSettings  # the kind's own settings (`drafter.args.<field>`), a frozen dataclass
    method: ClassVar[str] = ""  # vLLM speculative method that serves this kind
    aux_layers: tuple[int, ...] = ()  # target layers whose entering residual stream the head reads
    needs_last: bool = False  # whether the head reads the target's final hidden state
    learned: ClassVar[bool] = True  # False: nothing to distil (no `unroll`); refreshed through `on_rollouts`
    drafts_in_vllm_only: ClassVar[bool] = False  # True: drafts (or part of them) only inside vLLM's worker, not from `unroll`
    reads: ClassVar[tuple[str, ...]] = ()  # published formats `load_drafter` hands this kind: "architectures:<name>", "speculators:<type>"

    @classmethod
    def build(cls, policy: nn.Module, settings: Any, token_counts: torch.Tensor | None = None) -> "Drafter":
        """A new drafter that fits `policy`. `settings`: an instance of `cls.Config`; `token_counts`
        [V]: token frequencies in the policy's own samples (for kinds that reduce their vocabulary)."""
        raise NotImplementedError

    def unroll(self, feats: Features, target: TargetParts, steps: int) -> list[tuple[torch.Tensor, int]]:
        raise NotImplementedError

    def hf_config(self) -> dict:
        """config.json of the exported checkpoint."""
        raise NotImplementedError

    def serving_weights(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors, named as vLLM's loader for this kind reads them."""
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, config: dict, weights: dict[str, torch.Tensor], policy: nn.Module) -> "Drafter":
        raise NotImplementedError

    def check_fits(self, policy_config) -> None:
        """Raise DrafterMismatch if this drafter cannot serve next to `policy_config`."""

    def load_serving_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy checkpoint-named tensors into this drafter, checking names and shapes first."""
        mine = {k: v for k, v in self.serving_weights().items() if k != "d2t"}
        missing = sorted(set(mine) - set(weights))
        if missing:
            raise DrafterMismatch(f"{self.name} checkpoint lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
        for name, tensor in mine.items():
            if tuple(weights[name].shape) != tuple(tensor.shape):
                raise DrafterMismatch(f"{self.name} weight {name} has shape {tuple(weights[name].shape)}, this drafter needs {tuple(tensor.shape)}")
        with torch.no_grad():
            for name, tensor in mine.items():
                tensor.copy_(weights[name].to(tensor.dtype))

    def speculators_checkpoint(self, verifier: dict, k: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """config.json and tensors in the layout of vLLM's `speculators` library (`speculators_model_type`),
        naming `verifier` ({"name_or_path", "architectures"}) and `k` draft tokens; kinds that have one."""
        raise ValueError(f"drafter kind {self.name!r} has no speculators format; export it with format 'vllm'")

    def speculative_config(self, path: Path, k: int) -> dict:
        return {"method": self.method, "model": str(path), "num_speculative_tokens": k}

    def target_overrides(self) -> dict:
        """Config fields the engine must add to the target's config to serve this drafter."""
        return {}

    # ------------------------------------------------------------------ refresh without distillation
    def on_rollouts(self, engine, prompts: list[list[int]], completions: list[list[int]], prompt_index: list[int]) -> dict[str, float]:
        """After each GRPO step: the step's rollouts (completion i answers `prompts[prompt_index[i]]`),
        for kinds that refresh from them without distillation (and push that into the drafter live in
        `engine`). Returns metrics to log (`drafter/...`); a learned kind does nothing here."""
        return {}

    def runtime_state(self) -> dict:
        """What the drafter gathered while serving, beyond its checkpoint (plain data), for a resume."""
        return {}

    def load_runtime_state(self, state: dict, engine) -> None:
        """Restore `runtime_state()` into this drafter and the one live in `engine`."""

    # ------------------------------------------------------------------ files
    def export(self, path: Path, dtype: torch.dtype = torch.bfloat16, fmt: str = "vllm", verifier: dict | None = None, k: int = 3) -> None:
        """Write config.json + model.safetensors atomically (the old checkpoint stays until done): in the
        format codraft serves (`fmt="vllm"`), or in vLLM's `speculators` one (`speculators_checkpoint`)."""
        from safetensors.torch import save_file

        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(f"unknown drafter checkpoint format {fmt!r} (known: {', '.join(CHECKPOINT_FORMATS)})")
        config, tensors = (self.hf_config(), self.serving_weights()) if fmt == "vllm" else self.speculators_checkpoint(verifier or {}, k)
        weights = {name: t.detach().to(dtype).contiguous().cpu() if t.is_floating_point() else t.detach().contiguous().cpu() for name, t in tensors.items()}
        check_finite(weights, path)
        with atomic_dir(path) as tmp:
            (tmp / "config.json").write_text(json.dumps({**config, "codraft_kind": self.name}, indent=2))
            save_file(weights, str(tmp / "model.safetensors"))


def check_finite(weights: dict[str, torch.Tensor], where) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"drafter weight {name} holds non-finite values; refusing to write or serve it ({where})")


DRAFTERS: Registry[Drafter] = Registry("drafter kind", plugin_package="drafters")
CHECKPOINT_FORMATS = ("vllm", "speculators")  # codraft's own (vLLM's plain speculative_config route), vLLM's speculators library


def drafter_settings(cfg: DrafterConfig) -> tuple[type[Drafter], Any]:
    """The configured kind's class and its settings from `drafter.args` (errors name the key)."""
    from codraft.plugins import plugin_settings

    return plugin_settings(DRAFTERS, cfg.kind, cfg.args, "drafter.args.")


def build_drafter(policy: nn.Module, cfg: DrafterConfig, token_counts: torch.Tensor | None = None) -> Drafter:
    """A new drafter of the configured kind, fitted to `policy`."""
    cls, settings = drafter_settings(cfg)
    return cls.build(policy, settings, token_counts=token_counts)


def describe_drafters() -> str:
    from codraft.plugins import describe_plugins

    return describe_plugins(DRAFTERS, "codraft run --set drafter.kind=<name> --set drafter.args.<field>=<value>")


def load_drafter(path: Path, policy: nn.Module) -> Drafter:
    """Read a drafter checkpoint, checking it fits `policy`: one codraft wrote (`codraft_kind`), or a
    published one in a format a registered kind reads (`Drafter.reads`): vLLM's speculators layout
    (`speculators_model_type`) or a classic one by its `architectures` (say `LlamaForCausalLMEagle3`)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"drafter checkpoint {path} needs config.json and model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise DrafterMismatch(f"drafter config {config_file} is not valid JSON: {err}") from None
    kind = checkpoint_kind(config, config_file)
    drafter = DRAFTERS.get(kind).from_checkpoint(config, read_weights(path), policy)
    drafter.check_fits(policy.config)
    return drafter


def checkpoint_kind(config: dict, where) -> str:
    """The kind that reads a checkpoint: `codraft_kind`, else the kind declaring its format in `reads`
    itself (a subclass inherits its parent's reader, not its claim)."""
    if config.get("codraft_kind"):
        return config["codraft_kind"]
    if "speculators_model_type" in config:
        formats = [f"speculators:{config['speculators_model_type']}"]
    else:
        formats = [f"architectures:{name}" for name in config.get("architectures") or []]
    for name in DRAFTERS.names():
        if set(formats) & set(vars(DRAFTERS.get(name)).get("reads", ())):
            return name
    known = sorted(f for name in DRAFTERS.names() for f in vars(DRAFTERS.get(name)).get("reads", ()))
    raise DrafterMismatch(f"drafter config {where} is in no format codraft reads: no codraft_kind, and {formats or 'no architectures'} is none of {known}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: model.safetensors, else its *.safetensors shards, else pytorch_model.bin."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors"))
    if not files and not (path / "pytorch_model.bin").is_file():
        raise FileNotFoundError(f"drafter checkpoint {path} needs config.json and model.safetensors (or pytorch_model.bin)")
    weights: dict[str, torch.Tensor] = {}
    for file in files or [path / "pytorch_model.bin"]:
        try:
            weights.update(load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise DrafterMismatch(f"drafter weights {file} cannot be read (corrupt safetensors?): {err}") from None
    return weights
