"""One synchronous GRPO step, read top to bottom: prepare, gen, reward, logprob, train, control.

`Run` (codraft/runner.py) owns the objects; this file only says what a step does with them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codraft.batch import make_batch
from codraft.engine import Sampling
from codraft.grpo import group_advantages
from codraft.metrics import StageTimer

if TYPE_CHECKING:
    from codraft.runner import Run


def grpo_step(run: "Run", step: int) -> dict[str, Any]:
    cfg, timer = run.cfg, StageTimer()
    G = cfg.rollout.group_size
    prompts = run.prompts_for_step(step)  # [P] examples with token ids

    with timer("prepare"):  # push the latest policy weights into the engine, in place
        run.engine.load_policy_weights(run.policy_weights().items())
    record: dict[str, Any] = {"step": step}
    if run.should_eval(step):
        record.update(run.evaluate())

    with timer("gen"):  # G completions per prompt, speculatively when a drafter serves
        sampling = Sampling(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens)
        gen = run.engine.generate([p["ids"] for p in prompts], n=G, sampling=sampling, seed=run.seed_for(step))

    with timer("reward"):  # verifiable rewards, then group-relative advantages
        rewards, correct, formatted = run.score(prompts, gen)
        adv = group_advantages(rewards, G, cfg.grpo.scale_rewards)  # [P*G]

    with timer("logprob"):  # behaviour (+ reference) log-probs; drafters may tap this forward pass
        batch = make_batch([prompts[c.prompt_index]["ids"] for c in gen.completions], [c.token_ids for c in gen.completions], run.pad_id)
        behaviour = run.engine_logp(batch, gen) if cfg.grpo.behavior_logprobs == "engine" else None
        run.share((batch, adv, behaviour))  # under torchrun the other ranks train on this batch too
        scored = run.trainer.score(batch, on_forward=run.controller.on_policy_forward(batch, gen))

    with timer("train"):  # clipped GRPO update of the policy
        run.trainer.set_progress(step / cfg.run.steps)
        stats = run.trainer.update(batch, scored, adv, behaviour_logp=behaviour)
        stats["lr"] = run.trainer.optimizer.param_groups[0]["lr"]

    # control: the refresh policy sees this step's acceptance and costs; it may distil and swap
    record.update(run.controller.after_step(step, gen, timer))

    record.update(timer.metrics())
    record.update(
        {
            "reward/mean": rewards.mean().item(),
            "reward/accuracy": correct.mean().item(),
            "reward/format": formatted.mean().item(),
            "gen/tokens": gen.num_tokens,
            "gen/mean_len": gen.num_tokens / len(gen.completions),
            "gen/max_len": max(len(c.token_ids) for c in gen.completions),
            "gen/truncated": sum(not c.finished for c in gen.completions) / len(gen.completions),
            "gen/tokens_per_s": gen.num_tokens / max(timer.seconds["gen"], 1e-9),
            **{f"train/{k}": v for k, v in stats.items()},
        }
    )
    if scored.old_logp is not None:  # engine (bf16) vs trainer (fp32) log-probs of the same tokens
        record["gen/logprob_gap"] = run.logprob_gap(batch, scored, gen)
    if gen.acceptance is not None:
        record.update(gen.acceptance.metrics("spec/"))
    run.write_samples(step, prompts, gen, rewards, correct)
    return record


def follow_step(run: "Run", step: int) -> None:
    """A step on a rank other than the main one (torchrun): the same collectives, in the same order."""
    run.policy_weights()  # the main rank pushes them into the engine (a gather under FSDP2)
    batch, adv, behaviour = run.share(None)
    scored = run.trainer.score(batch)
    run.trainer.set_progress(step / run.cfg.run.steps)
    run.trainer.update(batch, scored, adv, behaviour_logp=behaviour)
