"""Rewards of a generation, and held-out evaluation.

    scores = Scorer(task, tokenizer).score(rows, gen)    # rewards, correct, formatted [N]; texts
    evaluate(engine, scorer, held_out, cfg)              # {"eval/accuracy": ..., ...}
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from codraft.config import Config
from codraft.engine import Generation, RolloutEngine, Sampling
from codraft.task import Task


@dataclass
class Scores:
    rewards: torch.Tensor  # [N] the task's reward per completion
    correct: torch.Tensor  # [N] 1.0 where the final answer is exactly right
    formatted: torch.Tensor  # [N] 1.0 where the completion is well formed
    texts: list[str]  # [N] the decoded completions


class Scorer:
    """Decodes completions and scores them with the task's verifier."""

    def __init__(self, task: Task, tokenizer):
        self.task, self.tokenizer = task, tokenizer

    def score(self, rows: list[dict[str, Any]], gen: Generation) -> Scores:
        texts = self.tokenizer.batch_decode([c.token_ids for c in gen.completions], skip_special_tokens=True)
        rewards, correct, formatted = [], [], []
        for c, text in zip(gen.completions, texts):
            row = rows[c.prompt_index]
            s = self.task.score(text, row, c.finished)
            rewards.append(self.task.reward(s))
            correct.append(float(s.correct))
            formatted.append(float(s.formatted))
        return Scores(torch.tensor(rewards), torch.tensor(correct), torch.tensor(formatted), texts)


def evaluate(engine: RolloutEngine, scorer: Scorer, rows: list[dict[str, Any]], cfg: Config, split: str = "eval") -> dict[str, Any]:
    """Accuracy on `rows`, `run.eval_samples` per row at `run.eval_temperature`, as `<split>/...` keys:
    `eval/` for the held-out rows (what settings are tuned on), `test/` for the test rows (never used
    to choose anything). Empty without rows."""
    if not rows:
        return {}
    t0 = time.perf_counter()
    sampling = Sampling(cfg.run.eval_temperature, 1.0, cfg.rollout.max_new_tokens)
    gen = engine.generate([p["ids"] for p in rows], n=cfg.run.eval_samples, sampling=sampling, seed=10**9 + cfg.run.seed)
    scores = scorer.score(rows, gen)
    out = {
        f"{split}/accuracy": scores.correct.mean().item(),
        f"{split}/format": scores.formatted.mean().item(),
        f"{split}/mean_len": gen.num_tokens / len(gen.completions),
        f"time/{split}_s": time.perf_counter() - t0,
    }
    if gen.acceptance is not None:
        out[f"{split}/accept_len"] = gen.acceptance.accept_len
    return out


def should_eval(cfg: Config, step: int) -> bool:
    every = cfg.run.eval_every
    return every > 0 and step % every == 0
