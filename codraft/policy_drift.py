"""How far the policy has moved from the one the serving drafter was distilled against.

    drift = PolicyDrift(policy_config, temperature)
    drift.note(weights)        # prepare stage: the policy about to generate (a CPU copy)
    drift.adopt()              # after a swap: the drafter was distilled against the noted policy
    drift.kl(examples)         # KL(current || reference), token mean over completion positions

`drafter/policy_kl` is KL(p_now || p_ref) at the sampling temperature, averaged over the completion
tokens of the step's held-out rollouts: p_now is the policy that generated them (its distributions
come with the distillation examples, from the logprob stage), p_ref the policy the serving drafter
was last distilled against (the warm-started drafter's: the initial policy). A frozen drafter sees
it grow with RL drift; a refresh resets it. It costs one forward of a reference copy of the policy
over the held-out rollouts per step, and a CPU copy of the policy's weights: meant for testbed-scale
studies (`controller.policy_kl`), off for real checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch

from codraft.distill import DistillExample, dense_teacher


class PolicyDrift:
    def __init__(self, config, temperature: float):
        from transformers import AutoModelForCausalLM

        self.temperature = max(temperature, 1e-6)
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        self.model.requires_grad_(False)
        self.noted: dict[str, torch.Tensor] | None = None
        self.reference: dict[str, torch.Tensor] | None = None

    def note(self, weights: dict[str, torch.Tensor]) -> None:
        """The policy that generates this step (copied: training moves the live weights)."""
        self.noted = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in weights.items()}
        if self.reference is None:  # the warm-started drafter was distilled against the initial policy
            self.adopt()

    def adopt(self) -> None:
        """The serving drafter now is the one distilled this step: its reference is the noted policy."""
        if self.noted is not None:
            self.reference = self.noted
            self.model.load_state_dict(self.reference, strict=False)

    @torch.no_grad()
    def kl(self, examples: list[DistillExample], batch_size: int = 16) -> float:
        """Token-mean KL(current || reference) over the examples' completion positions (NaN without any)."""
        if self.reference is None:
            return float("nan")
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            T = max(len(e.input_ids) for e in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, : len(e.input_ids)], mask[i, : len(e.input_ids)] = e.input_ids, 1
            ref = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float() / self.temperature, -1)  # [B, T, V]
            for i, e in enumerate(chunk):
                n = len(e.input_ids)
                now = dense_teacher(e.teacher, e.teacher_ids, ref.shape[-1])  # [n, V] log-probs (-inf off a top-k support)
                keep = e.target_mask.bool()
                p = now[keep].exp()
                terms = torch.where(p > 0, p * (now[keep] - ref[i, :n][keep]), torch.zeros_like(p))
                total += float(terms.sum())
                count += int(keep.sum())
        return total / count if count else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]
        if self.reference is not None:
            self.model.load_state_dict(self.reference, strict=False)
