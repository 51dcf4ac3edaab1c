"""What the drafter distils on and is measured against, split by prompt group.

Each GRPO step's logprob-stage forward is turned into one `DistillExample` per rollout (`hook`).
At the control stage (`close_step`) the step's prompt groups are shuffled (seeded by the step) and
a `controller.holdout_fraction` of the GROUPS is held out: GRPO siblings share their prompt and
often their completion, so holding out single sequences would leak the held-out text into the
candidate's training data. The held-out groups are split in two halves:

    gate     the candidate drafter is compared with the serving one here (the swap decision)
    report   `drafter/alpha_before` / `drafter/alpha_after` are measured here, on sequences the
             decision did not look at (measuring the winner where it was picked inflates it)

The swap gate may pool the gate halves of the last `controller.gate_steps` steps (`gate_pool`):
held-out groups never join the training buffer, so no candidate has seen any of them. Both halves
of this step together measure the serving drafter each step (`drafter/alpha_serving`, the drift
signal: no selection is involved there). The other groups join the training buffer of the last
`controller.buffer_steps` steps. With fewer than three groups in a step the two halves are the
same group (and with one group nothing is held out).
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Any, Callable

import torch

from codraft.config import Config
from codraft.distill import DistillExample, examples_from_forward
from codraft.drafter import Drafter, features_from_forward


class DistillData:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.buffer: deque[list[DistillExample]] = deque(maxlen=cfg.controller.buffer_steps)
        self.gates: deque[list[DistillExample]] = deque(maxlen=cfg.controller.gate_steps)
        """The gate halves of the last `controller.gate_steps` steps (this step's last)."""
        self.report: list[DistillExample] = []
        self.pending: list[tuple[int, DistillExample]] = []
        """This step's (prompt group, example) pairs, recorded in the logprob stage."""

    # ------------------------------------------------------------------ logprob stage
    def hook(self, serving: Drafter, rewards: torch.Tensor | None) -> Callable:
        """A hook for `GRPOTrainer.score` that turns each policy forward into examples (weighted by
        the rows' `rewards` when `controller.reward_weighting` is set)."""
        self.pending = []
        temperature = max(self.cfg.rollout.temperature, 1e-6)
        group_size = self.cfg.rollout.group_size
        weighting = self.cfg.controller.reward_weighting

        def record(rows, mb, out, logits) -> None:
            feats = features_from_forward(mb.input_ids, mb.attention_mask, out.hidden_states, serving.aux_layers, serving.needs_last)
            target_mask = torch.zeros_like(mb.completion_mask)
            target_mask[:, :-1] = mb.completion_mask[:, 1:]
            weights = [math.exp(weighting * float(rewards[r])) for r in rows] if weighting and rewards is not None else None
            examples = examples_from_forward(feats, target_mask, out.logits.float() / temperature, self.cfg.controller.teacher_top_k, weights)
            self.pending += [(r // group_size, e) for r, e in zip(rows, examples)]  # rows are prompt-major

        return record

    # ------------------------------------------------------------------ control stage
    def close_step(self, step: int) -> None:
        """Split the step's examples by prompt group into training, gate and report sets."""
        pending, self.pending = self.pending, []
        groups = sorted({g for g, _ in pending})
        random.Random(f"{self.cfg.run.seed}-holdout-{step}").shuffle(groups)
        n_hold = held_out_groups(len(groups), self.cfg.controller.holdout_fraction)
        gate_groups = set(groups[: (n_hold + 1) // 2])
        report_groups = set(groups[(n_hold + 1) // 2 : n_hold]) or gate_groups
        held = gate_groups | report_groups
        self.gates.append([e for g, e in pending if g in gate_groups])
        self.report = [e for g, e in pending if g in report_groups]
        self.buffer.append([e for g, e in pending if g not in held])

    @property
    def gate(self) -> list[DistillExample]:
        """This step's gate half."""
        return self.gates[-1] if self.gates else []

    @property
    def gate_pool(self) -> list[DistillExample]:
        """What the swap gate decides on: the gate halves of the last `controller.gate_steps` steps."""
        return [e for g in self.gates for e in g]

    @property
    def held_out(self) -> list[DistillExample]:
        """Every held-out example (gate and report halves, each once)."""
        return self.gate + [e for e in self.report if all(e is not x for x in self.gate)]

    def training(self) -> list[DistillExample]:
        return [e for b in self.buffer for e in b]

    def metrics(self) -> dict[str, Any]:
        return {
            "buffer/examples": sum(len(b) for b in self.buffer),
            "buffer/mb": sum(e.nbytes() for b in self.buffer for e in b) / 2**20,
            "buffer/held_out": len(self.held_out),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [list(b) for b in self.buffer], "gates": [list(g) for g in self.gates], "report": self.report}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = deque(state["buffer"], maxlen=self.cfg.controller.buffer_steps)
        gates = state["gates"] if "gates" in state else [state["gate"]]  # checkpoints before gate_steps held one step's
        self.gates = deque(gates, maxlen=self.cfg.controller.gate_steps)
        self.report = state["report"]


def held_out_groups(n_groups: int, fraction: float) -> int:
    """Prompt groups held out of `n_groups`: the fraction, at least two (a gate and a report half)
    while at least one group is left for training."""
    if n_groups <= 1:
        return 0
    return min(n_groups - 1, max(2, round(fraction * n_groups)))
