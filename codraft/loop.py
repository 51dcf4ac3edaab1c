"""One synchronous GRPO step, read top to bottom: prepare, gen, reward, logprob, train, control.

`codraft.build.build_parts` builds the components once; this file only says what a step does with
them. Under torchrun every rank runs this same function: the engines generate (rank 0's, or one
per group of ranks, codraft/rollouts.py), the main rank scores and broadcasts the batch, every rank
trains on it, and the main rank controls the drafter and logs.
"""
from __future__ import annotations

from typing import Any

import torch

from codraft.batch import TokenBatch, make_batch
from codraft.engine import Generation, Sampling
from codraft.grpo import group_advantages
from codraft.metrics import StageTimer
from codraft.parts import Parts
from codraft.scoring import Scores, evaluate, should_eval


def grpo_step(step: int, parts: Parts) -> dict[str, Any] | None:
    """The step's metrics record on the main rank, None on the others."""
    cfg, timer, main = parts.cfg, StageTimer(), parts.is_main
    with timer("prepare"):  # push the latest policy weights into every engine, in place
        parts.rollouts.sync_commands()  # the drafter changes of the last control stage reach every engine
        weights = parts.policy.full_weights()  # a collective under FSDP2; {} on ranks without an engine
        parts.rollouts.load_policy_weights(weights)
        if main:
            parts.controller.on_policy_weights(weights)
    record: dict[str, Any] = {"step": step}
    if main and should_eval(cfg, step):
        record.update(evaluate(parts.engine, parts.scorer, parts.prompts.held_out, cfg))
    if main and step == 0:  # the test prompts, before RL moves the policy (and again after the last step)
        record.update(evaluate(parts.engine, parts.scorer, parts.prompts.test, cfg, split="test"))
    scores = rollout = None
    rows = parts.prompts.for_step(step) if main else None  # [P] rows with token ids
    with timer("gen"):  # G completions per prompt, speculatively when a drafter serves
        sampling = Sampling(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens)
        gen = parts.rollouts.generate([p["ids"] for p in rows] if main else None, n=cfg.rollout.group_size, sampling=sampling, seed=seed_for(cfg, step))
    if main:
        with timer("reward"):  # verifiable rewards, then group-relative advantages
            scores = parts.scorer.score(rows, gen)
            adv = group_advantages(scores.rewards, cfg.rollout.group_size, cfg.grpo.scale_rewards)  # [P*G]

    with timer("logprob"):  # behaviour (+ reference) log-probs; the drafter taps this forward pass
        if main:
            batch = make_batch([rows[c.prompt_index]["ids"] for c in gen.completions], [c.token_ids for c in gen.completions], parts.prompts.pad_id)
            rollout = (batch, adv, engine_logprobs(batch, gen) if cfg.grpo.behavior_logprobs == "engine" else None)
        batch, adv, behaviour = parts.share(rollout)  # under torchrun every rank trains on the main rank's batch
        scored = parts.trainer.score(batch, on_forward=parts.controller.on_policy_forward(scores.rewards if scores else None))

    with timer("train"):  # clipped GRPO update of the policy
        parts.trainer.begin_step(step, cfg.run.steps)
        stats = parts.trainer.update(batch, scored, adv, behaviour_logp=behaviour)
        stats["lr"] = parts.trainer.optimizer.param_groups[0]["lr"]
    if not main:
        return None

    with timer("control"):  # the refresh policy sees this step's acceptance and costs; it may distil and swap
        record.update(parts.controller.after_step(step, [p["ids"] for p in rows], gen, timer))
    record.update(timer.metrics())
    record.update(step_metrics(gen, scores, stats, timer))
    if scored.old_logp is not None:  # engine (bf16) vs trainer (fp32) log-probs of the same tokens
        record["gen/logprob_gap"] = logprob_gap(batch, scored.old_logp, gen)
    parts.outputs.write_samples(step, rows, gen, scores)
    return record


def seed_for(cfg, step: int) -> int:
    """The rollout sampling seed of a step (a function of run.seed and the step, so resumes agree)."""
    return cfg.run.seed * 1_000_003 + step


def step_metrics(gen: Generation, scores: Scores, stats: dict[str, float], timer: StageTimer) -> dict[str, Any]:
    out = {
        "reward/mean": scores.rewards.mean().item(),
        "reward/accuracy": scores.correct.mean().item(),
        "reward/format": scores.formatted.mean().item(),
        "gen/tokens": gen.num_tokens,
        "gen/mean_len": gen.num_tokens / len(gen.completions),
        "gen/max_len": max(len(c.token_ids) for c in gen.completions),
        "gen/truncated": sum(not c.finished for c in gen.completions) / len(gen.completions),
        "gen/tokens_per_s": gen.num_tokens / max(timer.seconds["gen"], 1e-9),
        **{f"train/{k}": v for k, v in stats.items()},
    }
    if gen.acceptance is not None:
        out.update(gen.acceptance.metrics("spec/"))
    return out


def engine_logprobs(batch: TokenBatch, gen: Generation) -> torch.Tensor:
    """The engine's sampled-token log-probs laid out like `Scored.old_logp` [B, T-1]."""
    out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
    for i, c in enumerate(gen.completions):
        start = int(batch.completion_mask[i].nonzero()[0]) - 1 if c.token_ids else 0
        out[i, start : start + len(c.logprobs)] = torch.tensor(c.logprobs)
    return out


def logprob_gap(batch: TokenBatch, trainer_logp: torch.Tensor, gen: Generation) -> float:
    """Mean |engine log-prob - trainer log-prob| over completion tokens (bf16 engine vs fp32 trainer)."""
    mask = batch.target_mask.float()
    return float(((engine_logprobs(batch, gen) - trainer_logp).abs() * mask).sum() / mask.sum().clamp(min=1))
