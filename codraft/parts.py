"""The components a GRPO step works with, built once per run (`codraft.build.build_parts`).

    parts.prompts      training / held-out rows and the rows of each step
    parts.engine       the rollout engine (main rank only; None on the other torchrun ranks)
    parts.rollouts     every engine of the job (`rollout.engines`: rank 0's, or one per group of ranks)
    parts.scorer       rewards of a generation
    parts.trainer      the GRPO trainer (policy + optimizer)
    parts.policy       the trained policy as the engine and the drafters see it
    parts.controller   the drafter controller (NoController without speculation, and off the main rank)
    parts.outputs      metrics.jsonl, samples.jsonl and policy/ of the run directory (main rank only)

Each component is handed what it uses; none reads another's private state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codraft.config import Config
from codraft.controller import Controller, NoController
from codraft.distributed import DistState, broadcast_object, full_state_dict, is_fsdp, unwrap
from codraft.drafter import TargetParts, target_parts
from codraft.engine import Generation, RolloutEngine
from codraft.grpo import GRPOTrainer
from codraft.io import append_jsonl, atomic_dir
from codraft.lora import is_lora
from codraft.metrics import MetricsSink
from codraft.prompts import Prompts
from codraft.rollouts import RolloutGroup
from codraft.scoring import Scorer, Scores


class PolicyView:
    """The trained policy as the rollout engine and the drafters see it: full Hugging Face-named
    weights (LoRA merged) and the token embedding / output head drafters share."""

    def __init__(self, trainer: GRPOTrainer, dist: DistState, config, parts: TargetParts, owners: tuple[int, ...] = (0,)):
        """`parts`: the embedding and head of the policy before any FSDP2 wrapping (kept up to date
        from the gathered weights under FSDP2, where the live parameters are shards). `owners`: the
        ranks that own a rollout engine, each of which gets the full weights."""
        self.trainer, self.dist, self.config, self._parts, self.owners = trainer, dist, config, parts, tuple(owners)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The full policy on the ranks that own an engine, {} on the others. A collective under
        FSDP2: every rank calls it at the same point of a step."""
        weights = full_state_dict(self.trainer.policy, self.dist, self.owners)
        if weights and is_fsdp(unwrap(self.trainer.policy)):  # sharded model: keep gathered copies for the drafters
            embed = weights["model.embed_tokens.weight"]
            self._parts = TargetParts(embed, weights.get("lm_head.weight", embed))
        return weights

    def target_parts(self) -> TargetParts:
        local = unwrap(self.trainer.policy)
        return self._parts if is_fsdp(local) else target_parts(local)


class RunOutputs:
    """What a run writes besides checkpoints: metrics.jsonl, samples.jsonl, policy/."""

    def __init__(self, run_dir: Path, sink: MetricsSink, tokenizer, samples_per_step: int, group_size: int):
        self.dir, self.sink, self.tokenizer = Path(run_dir), sink, tokenizer
        self.samples_per_step, self.group_size = samples_per_step, group_size

    def write(self, record: dict[str, Any]) -> None:
        self.sink.write(record)

    def close(self) -> None:
        self.sink.close()

    def write_samples(self, step: int, rows: list[dict[str, Any]], gen: Generation, scores: Scores) -> None:
        G = self.group_size
        for k in range(min(self.samples_per_step, len(gen.completions))):
            i = (k * G + k) % len(gen.completions)  # spread over groups
            c = gen.completions[i]
            append_jsonl(
                self.dir / "samples.jsonl",
                {"step": step, "prompt": rows[c.prompt_index]["prompt"], "completion": scores.texts[i], "reward": scores.rewards[i].item(), "correct": bool(scores.correct[i])},
            )

    def save_policy(self, trainer: GRPOTrainer, weights: dict[str, torch.Tensor]) -> None:
        """`RUN_DIR/policy/`: the policy (LoRA merged) as a plain Hugging Face checkpoint with its tokenizer."""
        model = unwrap(trainer.policy)
        model = model.get_base_model() if is_lora(model) else model
        with atomic_dir(self.dir / "policy") as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            self.tokenizer.save_pretrained(tmp)


@dataclass
class Parts:
    cfg: Config
    dist: DistState
    policy_dir: Path
    """The initial policy's checkpoint (`model.path`, or the built testbed)."""
    prompts: Prompts
    scorer: Scorer
    trainer: GRPOTrainer
    policy: PolicyView
    controller: Controller | NoController
    engine: RolloutEngine | None = None
    rollouts: RolloutGroup | None = None
    outputs: RunOutputs | None = None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def share(self, payload: Any) -> Any:
        """The main rank's `payload` on every rank (a broadcast under torchrun)."""
        return broadcast_object(payload, self.dist) if self.dist.distributed else payload

    def stateful(self) -> dict[str, Any]:
        """The components a checkpoint saves, by name (see codraft.checkpoint)."""
        from codraft.checkpoint import RNGState

        return {"trainer": self.trainer, "rng": RNGState(), "controller": self.controller}

    def close(self) -> None:
        self.controller.close()
        if self.outputs is not None:
            self.outputs.close()
        if self.rollouts is not None:
            self.rollouts.close()
        elif self.engine is not None:
            self.engine.close()
