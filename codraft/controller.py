"""The co-training controller: tracks the serving drafter against the drifting policy and carries
out the refresh policy's decisions (distil a candidate, gate it, hot-swap it into the live engine).

Per GRPO step:
  logprob stage  `on_policy_forward` records, from the policy forward the loop already runs, what
                 the drafter distils on (hidden features + next-token distributions) into a buffer
                 of the last `buffer_steps` steps; a held-out share of each step is kept apart.
  control stage  `after_step` measures the serving drafter's teacher-forced acceptance on the
                 held-out rollouts, hands the refresh policy an `Observation`, and on "refresh":
                 distils a copy of the serving drafter on the buffer (time/distill_s), compares the
                 candidate with the serving drafter on the held-out rollouts, and swaps it in place
                 (time/swap_s) only if it is better. RUN_DIR/drafter always holds the serving drafter.

The policy's distributions come from the forward pass of the logprob stage, i.e. the policy that
generated this step's rollouts; the optimizer step that follows moves it once more, so a refreshed
drafter lags the policy it serves by one update (as in NeMo-RL's in-backward drafter training).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from codraft.acceptance import AcceptanceStats
from codraft.config import Config
from codraft.costmodel import CostModel, alpha_from_accept_len, drafts_anywhere, format_k_schedule
from codraft.distill import DistillExample, distill, examples_from_forward, teacher_forced_alpha
from codraft.drafter import Drafter, DrafterMismatch, TargetParts, check_finite, features_from_forward
from codraft.engine import Generation, RolloutEngine
from codraft.metrics import StageTimer
from codraft.refresh import Observation, RefreshLog, make_refresh_policy


class TargetView(Protocol):
    """What the controller needs of the policy: its config and the parts drafters share with it."""

    config: Any

    def target_parts(self) -> TargetParts: ...


class Controller:
    """Built once per run with what it works on: the serving drafter (already exported at
    `drafter_dir` and served by `engine`), the engine, and a view of the trained policy."""

    def __init__(self, cfg: Config, serving: Drafter, engine: RolloutEngine, policy: TargetView, drafter_dir: Path, k_schedule: list[tuple[int, int, int]]):
        self.cfg = cfg
        self.k = cfg.drafter.num_speculative_tokens
        self.serving = serving.eval()
        self.engine, self.policy, self.dir = engine, policy, Path(drafter_dir)
        self.version = 0
        self.refresh_policy = make_refresh_policy(cfg.controller.policy, cfg.controller.args, seed=cfg.run.seed)
        self.buffer: deque[list[DistillExample]] = deque(maxlen=cfg.controller.buffer_steps)
        self.holdout: list[DistillExample] = []
        self.pending: list[DistillExample] = []
        """This step's distillation examples, recorded in the logprob stage, consumed by `after_step`."""
        self.log = RefreshLog()
        self.cost = CostModel()
        self.k_schedule = [tuple(r) for r in k_schedule]
        self.steps_since_refresh = 0
        self.last_distill_s = math.nan
        self.last_swap_s = math.nan
        self._last_batch: tuple[tuple[int, ...], float] | None = None

    @property
    def vocab(self) -> int:
        return self.policy.config.vocab_size

    # ------------------------------------------------------------------ logprob stage
    def on_policy_forward(self, rewards: torch.Tensor | None) -> Callable:
        """A hook for `GRPOTrainer.score` that turns each policy forward into distillation examples
        (weighted by the rows' `rewards` when `controller.reward_weighting` is set)."""
        self.pending = []
        temperature = max(self.cfg.rollout.temperature, 1e-6)

        def record(rows, mb, out, logits) -> None:
            feats = features_from_forward(mb.input_ids, mb.attention_mask, out.hidden_states, self.serving.aux_layers, self.serving.needs_last)
            target_mask = torch.zeros_like(mb.completion_mask)
            target_mask[:, :-1] = mb.completion_mask[:, 1:]
            weights = None
            if self.cfg.controller.reward_weighting and rewards is not None:
                weights = [math.exp(self.cfg.controller.reward_weighting * float(rewards[r])) for r in rows]
            self.pending += examples_from_forward(feats, target_mask, out.logits.float() / temperature, self.cfg.controller.teacher_top_k, weights)

        return record

    # ------------------------------------------------------------------ control stage
    def after_step(self, step: int, gen: Generation, timer: StageTimer) -> dict[str, Any]:
        """The control stage: measure the serving drafter, ask the refresh policy, carry out its decision."""
        examples, self.pending = self.pending, []
        rng = random.Random(f"{self.cfg.run.seed}-holdout-{step}")
        rng.shuffle(examples)
        n_hold = max(1, int(len(examples) * self.cfg.controller.holdout_fraction)) if examples else 0
        self.holdout, train = examples[:n_hold], examples[n_hold:]
        self.buffer.append(train)
        parts = self.policy.target_parts()
        alpha = teacher_forced_alpha(self.serving, self.holdout, parts, self.k, self.vocab) if self.holdout else None
        obs = self._observe(step, gen, timer, alpha)
        self.refresh_policy.observe(obs)
        decision = self.refresh_policy.decide()
        record: dict[str, Any] = {
            "controller/decision": "keep",
            "controller/reason": decision.reason,
            "drafter/alpha_serving": obs.alpha_serving,
            "drafter/accept_len_serving": obs.accept_len_serving,
            "drafter/tv_serving": obs.tv_serving,
            "buffer/examples": sum(len(b) for b in self.buffer),
            "buffer/mb": sum(e.nbytes() for b in self.buffer for e in b) / 2**20,
        }
        self.steps_since_refresh += 1
        if decision.k_schedule is not None or self.cfg.drafter.k_schedule == "auto":
            self._set_schedule(decision.k_schedule or self._auto_schedule(obs))
        record["spec/k_schedule"] = format_k_schedule(self.k_schedule)
        if decision.refresh:
            record.update(self._refresh(timer, decision.budget_steps or self.cfg.controller.distill_steps, parts, alpha))
        record["drafter/version"] = self.version
        return record

    def _observe(self, step: int, gen: Generation, timer: StageTimer, alpha) -> Observation:
        """This step's observation for the refresh policy; feeds the cost model the step's timing."""
        acc = gen.acceptance or AcceptanceStats()
        lengths = tuple(len(c.token_ids) for c in gen.completions)
        gen_s = timer.seconds.get("gen", 0.0)
        a_now = alpha_from_accept_len(acc.accept_len, self.k) if acc.drafts else math.nan
        if acc.drafts:
            self.cost.observe(lengths, a_now, tuple(self.k_schedule), gen_s, True)
            self._last_batch = (lengths, a_now)
        elif not drafts_anywhere(self.k_schedule):  # the drafter is off: a plain-decoding timing
            self.cost.observe(lengths, math.nan, 0, gen_s, False)
        return Observation(
            step=step, drafts=acc.drafts, draft_tokens=acc.draft_tokens, accepted=acc.accepted, k=self.k,
            alpha_serving=sum(alpha.greedy) / len(alpha.greedy) if alpha else math.nan,
            accept_len_serving=alpha.accept_len if alpha else math.nan,
            tv_serving=1 - sum(alpha.prob) / len(alpha.prob) if alpha else math.nan,
            gen_s=gen_s, gen_tokens=gen.num_tokens, step_s=sum(timer.seconds.values()),
            last_distill_s=self.last_distill_s, last_swap_s=self.last_swap_s, steps_since_refresh=self.steps_since_refresh,
            predicted_gen_s_now=self.cost.predict_gen_s(lengths, a_now, tuple(self.k_schedule)) if acc.drafts else math.nan,
            completion_lengths=lengths,
        )

    def _auto_schedule(self, obs: Observation) -> list[tuple[int, int, int]]:
        alpha = obs.alpha_serving if not math.isnan(obs.alpha_serving) else alpha_from_accept_len(obs.accept_len, self.k)
        if math.isnan(alpha):
            return self.k_schedule
        ks = tuple(range(0, self.k + 1))
        return list(self.cost.best_k_schedule(alpha, range(1, self.cfg.rollout.max_num_seqs + 1), ks=ks, lengths=obs.completion_lengths))

    def _set_schedule(self, schedule) -> None:
        schedule = [tuple(r) for r in schedule]
        if schedule != self.k_schedule and hasattr(self.engine, "set_k_schedule"):
            self.engine.set_k_schedule(schedule)
        self.k_schedule = schedule

    def _refresh(self, timer: StageTimer, steps: int, parts: TargetParts, alpha_before) -> dict[str, Any]:
        cfg = self.cfg
        data = [e for b in self.buffer for e in b]
        candidate: Drafter = copy.deepcopy(self.serving)
        with timer("distill"):
            try:
                stats = distill(
                    candidate, data, parts, steps=steps, k=self.k, loss=cfg.drafter.loss, lr=cfg.drafter.lr,
                    batch_size=cfg.drafter.batch_size, vocab=self.vocab, seed=cfg.run.seed + self.version, max_tokens=cfg.controller.distill_tokens,
                )
            except FloatingPointError as err:  # a non-finite loss never reaches the engine
                stats, candidate = None, None
                failure = str(err)
        self.last_distill_s = timer.seconds["distill"]
        self.log.distill_s += self.last_distill_s
        out: dict[str, Any] = {"drafter/distill_loss": stats.loss_last if stats else math.nan, "drafter/distill_steps": stats.steps if stats else 0}
        if candidate is None:
            self.log.refused += 1
            return {**out, "controller/decision": "refuse", "controller/reason": failure}
        return {**out, **self.consider(candidate, alpha_before, timer)}

    def consider(self, candidate: Drafter, alpha_before=None, timer=None) -> dict[str, Any]:
        """Gate `candidate` on held-out teacher-forced acceptance; swap it in if it is better."""
        parts, vocab = self.policy.target_parts(), self.vocab
        if alpha_before is None and self.holdout:
            alpha_before = teacher_forced_alpha(self.serving, self.holdout, parts, self.k, vocab)
        after = teacher_forced_alpha(candidate, self.holdout, parts, self.k, vocab) if self.holdout else None
        out: dict[str, Any] = {
            "drafter/alpha_before": alpha_before.accept_len if alpha_before else math.nan,
            "drafter/alpha_after": after.accept_len if after else math.nan,
        }
        better = after is not None and (alpha_before is None or after.accept_len > alpha_before.accept_len)
        if self.cfg.controller.gate and not better:
            self.log.refused += 1
            reason = f"candidate acceptance {out['drafter/alpha_after']:.3f} <= serving {out['drafter/alpha_before']:.3f}"
            return {**out, "controller/decision": "refuse", "controller/reason": reason}
        t0 = time.perf_counter()
        self.swap(candidate)
        self.last_swap_s = time.perf_counter() - t0
        if timer is not None:
            timer.seconds["swap"] = timer.seconds.get("swap", 0.0) + self.last_swap_s
        self.log.swap_s += self.last_swap_s
        self.log.refreshes += 1
        return {**out, "controller/decision": "swap"}

    def swap(self, candidate: Drafter) -> None:
        """Install `candidate` in the engine in place; on any failure the old drafter keeps serving."""
        new, old = candidate.serving_weights(), self.serving.serving_weights()
        if set(new) != set(old) or any(tuple(new[n].shape) != tuple(old[n].shape) for n in new):
            bad = sorted(n for n in set(new) | set(old) if n not in new or n not in old or tuple(new[n].shape) != tuple(old[n].shape))
            raise DrafterMismatch(f"candidate drafter does not fit the serving one (names/shapes differ: {bad[:4]}); the engine was not touched")
        candidate.check_fits(self.policy.config)
        check_finite(new, "candidate drafter")
        try:
            self.engine.load_drafter_weights(new)
        except Exception:
            self.engine.load_drafter_weights(old)  # restore the serving drafter, then report
            raise
        self.serving = candidate
        self.version += 1
        self.steps_since_refresh = 0
        candidate.export(self.dir)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "serving": {name: t.detach().clone() for name, t in self.serving.serving_weights().items()},
            "version": self.version,
            "steps_since_refresh": self.steps_since_refresh,
            "last_distill_s": self.last_distill_s,
            "last_swap_s": self.last_swap_s,
            "k_schedule": [list(r) for r in self.k_schedule],
            "log": dataclasses.asdict(self.log),
            "refresh_policy": self.refresh_policy.state_dict(),
            "cost": self.cost.state_dict(),
            "buffer": [list(b) for b in self.buffer],
            "holdout": self.holdout,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.serving.load_serving_weights(state["serving"])
        self.engine.load_drafter_weights(self.serving.serving_weights())
        self.serving.export(self.dir)
        self.version, self.steps_since_refresh = state["version"], state["steps_since_refresh"]
        self.last_distill_s, self.last_swap_s = state["last_distill_s"], state["last_swap_s"]
        self._set_schedule([tuple(r) for r in state["k_schedule"]])
        self.log = RefreshLog(**state["log"])
        self.refresh_policy.load_state_dict(state["refresh_policy"])
        self.cost.load_state_dict(state["cost"])
        self.buffer = deque(state["buffer"], maxlen=self.cfg.controller.buffer_steps)
        self.holdout = state["holdout"]

    def summary(self) -> dict[str, Any]:
        out = {
            "drafter refreshes (swapped / refused)": f"{self.log.refreshes} / {self.log.refused}",
            "distill + swap seconds": f"{self.log.distill_s:.1f} + {self.log.swap_s:.1f}",
        }
        last = getattr(self, "_last_batch", None)
        if last is not None:  # the cost model's estimate, not a measurement (analysis/bench_rollout.py measures)
            lengths, alpha = last
            plain = self.cost.predict_gen_s(lengths, alpha, 0)
            spec = self.cost.predict_gen_s(lengths, alpha, tuple(self.k_schedule))
            out["gen speedup vs no speculation (cost-model estimate, last step)"] = f"{plain / spec:.2f}x"
        return out

    def close(self) -> None:
        pass


class NoController:
    """No speculation: nothing to observe, nothing to refresh (also the controller of non-main ranks)."""

    def on_policy_forward(self, rewards) -> None:
        return None

    def after_step(self, step, gen, timer) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
