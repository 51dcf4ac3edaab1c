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

import contextlib
import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from codraft.acceptance import AcceptanceStats
from codraft.config import Config
from scipy.optimize import brentq

from codraft.costmodel import CostModel, alpha_from_accept_len, drafts_anywhere, format_k_schedule, tokens_per_verify
from codraft.distill import distill, teacher_forced_alpha, teacher_record
from codraft.distill_data import DistillData
from codraft.drafter import Drafter, DrafterMismatch, TargetParts, check_finite
from codraft.engine import Generation, RolloutEngine
from codraft.metrics import StageTimer
from codraft.policy_drift import PolicyDrift
from codraft.refresh import Observation, RefreshLog, make_refresh_policy
from codraft.watchdog import Watchdog

logger = logging.getLogger(__name__)


def source_signals(indexed: dict[str, float]) -> dict[str, float]:
    """The hybrid drafter's per-source signals for `Observation`, from its step metrics (drafters/hybrid.py); none for other kinds."""
    keys = {"learned_alone_accept_len": "spec/learned/alone_accept_len", "suffix_alone_accept_len": "spec/suffix/alone_accept_len", "suffix_share": "spec/suffix/share"}
    return {field: float(indexed[key]) for field, key in keys.items() if key in indexed}


def live_alpha(acc: AcceptanceStats, ks: tuple[int, ...] = ()) -> float:
    """Per-token acceptance of a generation, from its counts (NaN without drafts): the alpha whose
    expected accepted tokens match the measured ones, given how many tokens each draft proposed.

    Under a k schedule drafts differ in k (inverting with the largest k, as before, underestimates
    alpha). With the schedule's positive k values `ks`: one value -> the exact inversion at it; two
    -> the share of drafts at each follows from drafts and draft_tokens, and the inversion is exact
    for that mixture; otherwise (or without `ks`) the inversion at the drafts' mean k."""
    if not acc.drafts:
        return math.nan
    ks = tuple(sorted({k for k in ks if k > 0}))
    mean_k = acc.draft_tokens / acc.drafts
    if len(ks) == 2 and ks[0] <= mean_k <= ks[1]:
        lo, hi = ks
        share_hi = (mean_k - lo) / (hi - lo)  # drafts at k = hi, from drafts and draft_tokens
        target = acc.accepted / acc.drafts

        def gap(a: float) -> float:
            return (1 - share_hi) * (tokens_per_verify(a, lo) - 1) + share_hi * (tokens_per_verify(a, hi) - 1) - target

        if gap(0.0) >= 0:
            return 0.0
        if gap(1.0) <= 0:
            return 1.0
        return float(brentq(gap, 0.0, 1.0, xtol=1e-12))
    return alpha_from_accept_len(acc.accept_len, ks[0] if len(ks) == 1 else mean_k)


class TargetView(Protocol):
    """What the controller needs of the policy: its config and the parts drafters share with it."""

    config: Any

    def target_parts(self) -> TargetParts: ...


class Controller:
    """Built once per run with what it works on: the serving drafter (already exported at
    `drafter_dir` and served by `engine`), the engine, and a view of the trained policy."""

    def __init__(self, cfg: Config, serving: Drafter, engine: RolloutEngine, policy: TargetView, drafter_dir: Path, k_schedule: list[tuple[int, int, int]],
                 cost: CostModel | None = None):
        """`cost`: the cost model to start from (codraft.costprofile.calibrated_cost_model); default priors if None."""
        self.cfg = cfg
        self.k = cfg.drafter.num_speculative_tokens
        self.serving = serving.eval()
        self.engine, self.policy, self.dir = engine, policy, Path(drafter_dir)
        self.version = 0
        self.refresh_policy = make_refresh_policy(cfg.controller.policy, cfg.controller.args, seed=cfg.run.seed)
        self.data = DistillData(cfg)
        """Distillation examples of recent steps, and this step's held-out gate / report groups."""
        self.log = RefreshLog()
        self.cost = cost if cost is not None else CostModel()
        self.k_schedule = [tuple(r) for r in k_schedule]
        self.steps_since_refresh = 0
        self.last_distill_s = math.nan
        self.last_swap_s = math.nan
        self.outcome = ""
        """What became of the last step's refresh request: "swap", "refuse", or "" (none asked)."""
        self.fresh_alpha = math.nan
        """Live per-token acceptance on the first drafted step of the serving drafter (what a refresh restores)."""
        self.live_alpha = math.nan
        """Live per-token acceptance of this step."""
        self.base_schedule = list(self.k_schedule)
        self.drift = PolicyDrift(policy.config, cfg.rollout.temperature) if cfg.controller.policy_kl else None
        self.watchdog = Watchdog(cfg.controller.watchdog, cfg.controller.watchdog_patience)
        self._last_batch: tuple[tuple[int, ...], float] | None = None

    @property
    def vocab(self) -> int:
        return self.policy.config.vocab_size

    # ------------------------------------------------------------------ logprob stage
    def on_policy_forward(self, rewards: torch.Tensor | None) -> Callable:
        """A hook for `GRPOTrainer.score` that turns each policy forward into distillation examples
        (built in codraft/distill_data.py, `DistillData.hook`); None for a drafter that learns nothing."""
        return self.data.hook(self.serving, rewards) if self.serving.learned else None

    def on_policy_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Prepare stage: the policy about to generate this step (for `drafter/policy_kl`)."""
        if self.drift is not None:
            self.drift.note(weights)

    # ------------------------------------------------------------------ control stage
    def after_step(self, step: int, prompts: list[list[int]], gen: Generation, timer: StageTimer) -> dict[str, Any]:
        """The control stage: measure the serving drafter, ask the refresh policy, carry out its decision.
        `prompts`: the step's prompt token ids (`gen.completions[i].prompt_index` points into them)."""
        with timer("index"):  # a drafter that learns from rollouts directly (suffix) takes them here
            indexed = self.serving.on_rollouts(self.engine, prompts, [c.token_ids for c in gen.completions], [c.prompt_index for c in gen.completions])
        self.data.close_step(step)
        parts = self.policy.target_parts()
        held = self.data.held_out
        alpha = teacher_forced_alpha(self.serving, held, parts, self.k, self.vocab) if held else None
        obs = self._observe(step, gen, timer, alpha, indexed)
        self.refresh_policy.observe(obs)
        decision = self.refresh_policy.decide()
        record: dict[str, Any] = {
            "controller/decision": "keep",
            "controller/reason": decision.reason,
            "drafter/alpha_serving": obs.alpha_serving,
            "drafter/accept_len_serving": obs.accept_len_serving,
            "drafter/tv_serving": obs.tv_serving,
            "drafter/policy_kl": self.drift.kl(held) if self.drift is not None and held else math.nan,
            "controller/watchdog": self._watch(obs),
            **self.data.metrics(),
            **teacher_record(held, alpha),  # drafter/teacher_mass (sparse teachers), drafter/teacher_off_vocab (reduced draft vocabulary)
            **indexed,
        }
        self.steps_since_refresh += 1
        if not self.watchdog.off and (decision.k_schedule is not None or self.cfg.drafter.k_schedule == "auto"):
            self._set_schedule(decision.k_schedule or self._auto_schedule(obs))
        record["spec/k_schedule"] = format_k_schedule(self.k_schedule)
        self.outcome = ""
        if decision.refresh and not self.serving.learned:  # its refresh is the index update every step already made
            record["controller/reason"] = f"{decision.reason} (the {self.serving.name} drafter learns nothing: its index was updated)"
        elif decision.refresh:
            record.update(self._refresh(timer, decision.budget_steps or self.cfg.controller.distill_steps, parts))
            self.outcome = record["controller/decision"]
        record["drafter/version"] = self.version
        return record

    def _observe(self, step: int, gen: Generation, timer: StageTimer, alpha, indexed: dict[str, float]) -> Observation:
        """This step's observation for the refresh policy; feeds the cost model the step's timing.
        `indexed`: what the drafter reported taking the step's rollouts (a hybrid's per-source counts)."""
        acc = gen.acceptance or AcceptanceStats()
        lengths = tuple(len(c.token_ids) for c in gen.completions)
        gen_s = timer.seconds.get("gen", 0.0)
        if "engine_lengths" in gen.extra:  # several engines (codraft/rollouts.py): the batch and seconds of rank 0's
            lengths, gen_s = gen.extra["engine_lengths"][0], gen.extra["engine_seconds"][0]
        a_now = live_alpha(acc, tuple(k for _, _, k in self.k_schedule))
        self.live_alpha = a_now
        if acc.drafts:
            self.cost.observe(lengths, a_now, tuple(self.k_schedule), gen_s, True)
            self._last_batch = (lengths, a_now)
            if self.steps_since_refresh == 0 or math.isnan(self.fresh_alpha):
                self.fresh_alpha = a_now  # the first drafted step of this drafter
        elif not drafts_anywhere(self.k_schedule):  # the drafter is off: a plain-decoding timing
            self.cost.observe(lengths, math.nan, 0, gen_s, False)
        predict = lambda a: self.cost.predict_gen_s(lengths, a, tuple(self.k_schedule)) if not math.isnan(a) else math.nan  # noqa: E731
        return Observation(
            step=step, drafts=acc.drafts, draft_tokens=acc.draft_tokens, accepted=acc.accepted, k=self.k,
            alpha_serving=sum(alpha.greedy) / len(alpha.greedy) if alpha else math.nan,
            accept_len_serving=alpha.accept_len if alpha else math.nan,
            tv_serving=1 - sum(alpha.prob) / len(alpha.prob) if alpha else math.nan,
            gen_s=gen_s, gen_tokens=gen.num_tokens, step_s=sum(timer.seconds.values()),
            last_distill_s=self.last_distill_s, last_swap_s=self.last_swap_s, steps_since_refresh=self.steps_since_refresh,
            predicted_gen_s_now=predict(a_now), predicted_gen_s_fresh=predict(self.fresh_alpha),
            completion_lengths=lengths, refresh_outcome=self.outcome, **source_signals(indexed),
        )

    def _watch(self, obs: Observation) -> str:
        """Live acceptance against the serving drafter's teacher-forced prediction (codraft/watchdog.py)."""
        verdict = self.watchdog.check(self.live_alpha, obs.alpha_serving)
        if verdict == "republished":
            logger.warning("watchdog: live acceptance %.3f is far below the predicted %.3f; loading the drafter into the engine again", self.live_alpha, obs.alpha_serving)
            self.engine.load_drafter_weights(self.serving.serving_weights())
        elif verdict == "drafting_off":
            logger.warning("watchdog: live acceptance %.3f stayed far below the predicted %.3f after republishing; drafting is OFF until the next swap", self.live_alpha, obs.alpha_serving)
            self._set_schedule([(1, self.cfg.rollout.max_num_seqs, 0)])
        return verdict

    def _auto_schedule(self, obs: Observation) -> list[tuple[int, int, int]]:
        alpha = obs.alpha_serving if not math.isnan(obs.alpha_serving) else alpha_from_accept_len(obs.accept_len, obs.k_effective)
        if math.isnan(alpha):
            return self.k_schedule
        ks = tuple(range(0, self.k + 1))
        return list(self.cost.best_k_schedule(alpha, range(1, self.cfg.rollout.max_num_seqs + 1), ks=ks, lengths=obs.completion_lengths))

    def _set_schedule(self, schedule) -> None:
        schedule = [tuple(r) for r in schedule]
        if schedule != self.k_schedule and hasattr(self.engine, "set_k_schedule"):
            self.engine.set_k_schedule(schedule)
        self.k_schedule = schedule

    def _refresh(self, timer: StageTimer, steps: int, parts: TargetParts) -> dict[str, Any]:
        cfg = self.cfg
        data = self.data.training()
        candidate: Drafter = copy.deepcopy(self.serving)
        with timer("distill"):
            try:
                stats = distill(
                    candidate, data, parts, steps=steps, k=self.k, loss=cfg.drafter.loss, lr=cfg.controller.distill_lr or cfg.drafter.lr,
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
        return {**out, **self.consider(candidate, timer)}

    def consider(self, candidate: Drafter, timer: StageTimer | None = None) -> dict[str, Any]:
        """Gate `candidate` on the held-out gate groups of the last `controller.gate_steps` steps
        (teacher-forced acceptance against the serving drafter); swap it in if its acceptance length
        exceeds (1 - `controller.gate_margin`) x the serving drafter's. Both are reported on this step's report groups."""
        tf = lambda d, ex: teacher_forced_alpha(d, ex, self.policy.target_parts(), self.k, self.vocab) if ex else None  # noqa: E731
        pool = self.data.gate_pool
        gate_before, gate_after = tf(self.serving, pool), tf(candidate, pool)
        before, after = tf(self.serving, self.data.report), tf(candidate, self.data.report)
        length = lambda s: s.accept_len if s else math.nan  # noqa: E731
        out: dict[str, Any] = {
            "drafter/alpha_before": length(before),
            "drafter/alpha_after": length(after),
            "drafter/gate_before": length(gate_before),
            "drafter/gate_after": length(gate_after),
        }
        margin = self.cfg.controller.gate_margin
        better = gate_after is not None and (gate_before is None or gate_after.accept_len > (1 - margin) * gate_before.accept_len)
        if self.cfg.controller.gate and not better:
            self.log.refused += 1
            bar = f"{1 - margin:g} x serving" if margin else "serving"
            reason = f"candidate acceptance {length(gate_after):.3f} <= {bar} {length(gate_before):.3f} on the gate groups"
            return {**out, "controller/decision": "refuse", "controller/reason": reason}
        t0 = time.perf_counter()
        with timer("swap") if timer is not None else contextlib.nullcontext():
            self.swap(candidate)
        self.last_swap_s = time.perf_counter() - t0
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
        self.fresh_alpha = math.nan  # measured again on the new drafter's first drafted step
        if self.drift is not None:
            self.drift.adopt()
        if self.watchdog.off:  # a new drafter: drafting resumes
            self._set_schedule(self.base_schedule)
        self.watchdog.reset()
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
            "data": self.data.state_dict(),
            "outcome": self.outcome,
            "fresh_alpha": self.fresh_alpha,
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "watchdog": self.watchdog.state_dict(),
            "runtime": self.serving.runtime_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.serving.learned:  # a drafter without weights (suffix) restores its runtime state below
            self.serving.load_serving_weights(state["serving"])
            self.engine.load_drafter_weights(self.serving.serving_weights())
        self.serving.load_runtime_state(state["runtime"], self.engine)
        self.serving.export(self.dir)
        self.version, self.steps_since_refresh = state["version"], state["steps_since_refresh"]
        self.last_distill_s, self.last_swap_s = state["last_distill_s"], state["last_swap_s"]
        self._set_schedule([tuple(r) for r in state["k_schedule"]])
        self.log = RefreshLog(**state["log"])
        self.refresh_policy.load_state_dict(state["refresh_policy"])
        self.cost.load_state_dict(state["cost"])
        self.data.load_state_dict(state["data"])
        self.outcome, self.fresh_alpha = state["outcome"], state["fresh_alpha"]
        if self.drift is not None and state["drift"] is not None:
            self.drift.load_state_dict(state["drift"])
        self.watchdog.load_state_dict(state["watchdog"])

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

    def on_policy_weights(self, weights) -> None:
        pass

    def on_policy_forward(self, rewards) -> None:
        return None

    def after_step(self, step, prompts, gen, timer) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
