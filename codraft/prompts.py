"""The run's prompts: tokenized training and held-out rows, and which rows each GRPO step draws.

    prompts = Prompts.load(cfg, task, splits, policy_dir)
    rows = prompts.for_step(step)      # [P] dicts: prompt, answer, (task), ids
    prompts.held_out                   # evaluation rows, never trained on

Each row keeps every column of the task's dataset (`prompt`, `answer`, `solution`, and `task` in a
mixture) plus `ids`, the prompt's token ids.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from codraft.config import Config, ConfigError
from codraft.task import MixedTask, Task


def load_tokenizer(policy_dir: Path):
    """The policy's tokenizer; errors name `model.path`."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.path: cannot load the tokenizer from {policy_dir}: {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model.path: the tokenizer in {policy_dir} has no end-of-sequence token")
    return tokenizer


def check_prompt_lengths(lengths: list[int], max_len: int, max_new_tokens: int, split: str) -> None:
    limit = max_len - max_new_tokens
    for i, n in enumerate(lengths):
        if n > limit:
            raise ConfigError(
                f"{split} prompt {i} has {n} tokens; with rollout.max_new_tokens={max_new_tokens} it does not fit "
                f"model.max_len={max_len} (raise model.max_len, lower rollout.max_new_tokens or shorten the prompts)"
            )


class Prompts:
    """Training and held-out rows with token ids, and the seeded stream of rows per step."""

    def __init__(self, cfg: Config, task: Task, tokenizer, train: list[dict[str, Any]], held_out: list[dict[str, Any]], test: list[dict[str, Any]] = ()):
        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.train, self.held_out, self.test = train, held_out, list(test)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def load(cls, cfg: Config, task: Task, splits, policy_dir: Path) -> "Prompts":
        tokenizer = load_tokenizer(policy_dir)
        train, held_out = (encode(tokenizer, ds, cfg, name) for ds, name in zip(splits, ("train", "held-out")))
        test = task.test_split(cfg.task.num_test, exclude=warm_start_prompts(cfg, task, splits)) if cfg.task.num_test else None
        return cls(cfg, task, tokenizer, train, held_out, encode(tokenizer, test, cfg, "test") if test is not None else [])

    def for_step(self, step: int) -> list[dict[str, Any]]:
        """P rows for this step: an epoch-wise shuffle of the training rows (seeded). With a task
        mixture, a step's share of second-task rows follows `MixedTask.share_at`."""
        P = self.cfg.rollout.prompts_per_step
        if not isinstance(self.task, MixedTask):
            return [self._draw(self.train, "all", k) for k in range(step * P, (step + 1) * P)]
        main = [p for p in self.train if p["task"] == self.cfg.task.name]
        extra = [p for p in self.train if p["task"] != self.cfg.task.name]
        n_extra = round(self.task.share_at(step) * P)
        drawn_extra = sum(round(self.task.share_at(s) * P) for s in range(step))
        return [self._draw(main, "main", step * P - drawn_extra + i) for i in range(P - n_extra)] + [self._draw(extra, "extra", drawn_extra + i) for i in range(n_extra)]

    def _draw(self, pool: list[dict[str, Any]], name: str, k: int) -> dict[str, Any]:
        """The k-th row of an endless, epoch-wise shuffled stream over `pool`."""
        epoch, pos = divmod(k, len(pool))
        order = list(range(len(pool)))
        random.Random(f"{self.cfg.run.seed}-{name}-{epoch}").shuffle(order)
        return pool[order[pos]]

    def warm_start(self) -> list[list[int]]:
        """Prompt ids of the main task's training rows: the drafter's warm start samples on these."""
        return [p["ids"] for p in self.train if p.get("task", self.cfg.task.name) == self.cfg.task.name]


def warm_start_prompts(cfg: Config, task: Task, splits) -> set[str]:
    """Prompts the built testbed was warm-started on (kept out of the test split); none for a real checkpoint."""
    if cfg.model.path:
        return set()
    from codraft.testbed import sft_rows

    rows = sft_rows(cfg, task, *splits)
    return {r["prompt"] for r in rows} if rows is not None else set()


def encode(tokenizer, ds, cfg: Config, split: str) -> list[dict[str, Any]]:
    """Rows of `ds` with their prompt's token ids added as `ids` (prompts that cannot fit are refused)."""
    ids = tokenizer(list(ds["prompt"]), add_special_tokens=False).input_ids
    check_prompt_lengths([len(x) for x in ids], cfg.model.max_len, cfg.rollout.max_new_tokens, split)
    return [{**row, "ids": prompt_ids} for row, prompt_ids in zip(ds, ids)]
