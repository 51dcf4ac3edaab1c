"""The task interface: verifiable prompts with gold answers, worked solutions, and rewards.

A task is one module under `codraft/tasks/`, registered by name, with a frozen `Config` of its own
settings (`task.args.<field>`; the mixture task's: `task.mix_args.<field>`):

    @TASKS.register("arith")
    class Arithmetic(SyntheticTask):
        Config = ArithConfig
        def example(self, rng) -> dict[str, str]: ...

    task = make_task(cfg.task, seed=cfg.task.seed)
    train, held_out = task.splits()                    # datasets: prompt, answer, solution (+ task)
    score = task.score(completion, row, finished)      # row: a dataset row dict
    reward = task.reward(score)

Every task yields `datasets.Dataset`s with columns `prompt`, `answer` (the gold final answer as a
string) and `solution` (a worked solution ending in `#### <answer>`, used for supervised warm
starts). Training and held-out prompts are disjoint. In a mixture (`MixedTask`) every row also
carries `task`, the name of the task it came from, and is checked by that task.

Rewards: `answer_reward` when the completion's final answer (`#### <number>`) is exactly right,
`format_reward` when the completion stops by itself and ends with `#### <number>`.
How to add a task: codraft/tasks/README.md.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets

from codraft.config import TaskConfig
from codraft.plugins import describe_plugins, plugin_settings
from codraft.registry import Registry

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


@dataclass(frozen=True)
class Score:
    correct: bool
    formatted: bool


def final_answer(text: str) -> str | None:
    """The number after the last `####` if the text ends with it, normalised (no commas)."""
    match = FINAL_ANSWER.search(text.strip())
    return match.group(1).replace(",", "") if match else None


def same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


@dataclass(frozen=True)
class NoSettings:
    """A task without settings of its own."""


class Task:
    """A verifiable task. Subclasses produce the examples and may check a completion more strictly."""

    name: ClassVar[str] = "task"
    description: ClassVar[str] = ""  # one line for `describe_tasks`
    Config: ClassVar[type] = NoSettings  # the task's own settings (`task.args.<field>`), a frozen dataclass

    def __init__(self, cfg: TaskConfig, settings: Any = None, seed: int = 0, prefix: str = "task.args."):
        self.cfg = cfg  # the generic settings: sizes of the splits, rewards, the mixture
        self.settings = settings if settings is not None else self.Config()
        self.seed = seed
        self.prefix = prefix  # how error messages name this task's settings

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        """(train, eval) datasets with columns prompt, answer, solution."""
        raise NotImplementedError

    def sft_examples(self, n: int, exclude: set[str]) -> list[dict[str, str]] | None:
        """Rows for the supervised warm start (prompt, solution), disjoint from `exclude`; None = warm
        start on the training rows themselves."""
        return None

    def test_split(self, n: int, exclude: set[str] = frozenset()) -> datasets.Dataset | None:
        """`n` test rows, disjoint from the training and held-out rows and from `exclude` (the warm
        start's prompts): never trained on, never used to choose a setting. None if the task has none."""
        return None

    def check(self, completion: str, row: dict[str, Any]) -> bool:
        """Whether the completion's final answer is exactly right for this row."""
        got = final_answer(completion)
        return got is not None and same_number(got, row["answer"])

    def score(self, completion: str, row: dict[str, Any], finished: bool) -> Score:
        formatted = finished and final_answer(completion) is not None
        return Score(correct=self.check(completion, row), formatted=formatted)

    def reward(self, score: Score) -> float:
        return self.cfg.answer_reward * score.correct + self.cfg.format_reward * score.formatted

    def data_key(self) -> dict[str, Any]:
        """What identifies this task's data (prompts, solutions, splits, warm-start rows), as plain
        JSON types: the testbed's cache key hashes it. Rewards are not part of it."""
        sizes = {"num_train": self.cfg.num_train, "num_eval": self.cfg.num_eval}
        return {"name": self.name, "seed": self.seed, **sizes, "settings": dataclasses.asdict(self.settings)}


TASKS: Registry[Task] = Registry("task", plugin_package="codraft.tasks")


class SyntheticTask(Task):
    """Generates problems from a seeded RNG (`example`); held-out prompts never appear in training,
    and the warm start gets fresh problems disjoint from both."""

    def example(self, rng: random.Random) -> dict[str, str]:
        """One problem: prompt, answer, solution."""
        raise NotImplementedError

    def generate(self, n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
        out, seen = [], set(exclude)
        for _ in range(50 * n):
            if len(out) == n:
                break
            ex = self.example(rng)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                out.append(ex)
        if len(out) < n:
            raise ValueError(f"task {self.name!r} could only make {len(out)} distinct problems of {n}; widen its settings ({self.prefix}<field>) or ask for fewer (task.num_train, task.num_eval)")
        return out

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        rng = random.Random(f"{self.name}-{self.seed}")
        held_out = self.generate(self.cfg.num_eval, rng)
        train = self.generate(self.cfg.num_train, rng, exclude={ex["prompt"] for ex in held_out})
        return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held_out)

    def test_split(self, n: int, exclude: set[str] = frozenset()) -> datasets.Dataset:
        """Fresh problems drawn after the training ones from the same seeded stream (so the training and
        held-out prompts stay what they were), disjoint from both and from `exclude`."""
        rng = random.Random(f"{self.name}-{self.seed}")
        held_out = self.generate(self.cfg.num_eval, rng)
        train = self.generate(self.cfg.num_train, rng, exclude={ex["prompt"] for ex in held_out})
        seen = {ex["prompt"] for ex in held_out + train} | set(exclude)
        return datasets.Dataset.from_list(self.generate(n, rng, exclude=seen))

    def sft_examples(self, n: int, exclude: set[str]) -> list[dict[str, str]]:
        """Fresh problems for the supervised warm start, disjoint from `exclude` (the held-out set)."""
        return self.generate(n, random.Random(f"{self.name}-sft-{self.seed}"), exclude=exclude)


def num_ops(rng: random.Random, lo: int, hi: int, decay: float) -> int:
    """Operations in a problem: lo..hi with a geometric long tail, P(n) proportional to decay ** (n - lo)."""
    sizes = list(range(lo, hi + 1))
    return rng.choices(sizes, weights=[decay ** (n - lo) for n in sizes])[0]


def task_settings(name: str, args: dict[str, Any] | None, prefix: str = "task.args.") -> tuple[type[Task], Any]:
    """The registered task `name` and its settings from `args` (errors name `<prefix><field>`)."""
    return plugin_settings(TASKS, name, args, prefix)


class MixedTask(Task):
    """The main task plus a second task whose prompts join training from `mix_start` on, their share
    ramping to `mix_share` over `mix_ramp` steps: a shift of the RL data mixture, as curricula and
    staged data mixes produce. Held-out evaluation stays on the main task. Every row carries its
    task's name (`task`), and each row is checked by that task."""

    def __init__(self, cfg: TaskConfig, seed: int = 0):
        super().__init__(cfg, None, seed)
        main_cls, main_settings = task_settings(cfg.name, cfg.args, "task.args.")
        extra_cls, extra_settings = task_settings(cfg.mix_task, cfg.mix_args, "task.mix_args.")
        self.main = main_cls(cfg, main_settings, seed, "task.args.")
        self.extra = extra_cls(cfg, extra_settings, seed, "task.mix_args.")
        self.parts = {cfg.name: self.main, cfg.mix_task: self.extra}
        self.name = f"{cfg.name}+{cfg.mix_task}"

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        train, held_out = self.main.splits()
        extra_train, _ = self.extra.splits()
        tag = lambda ds, name: ds.add_column("task", [name] * len(ds))  # noqa: E731
        return datasets.concatenate_datasets([tag(train, self.cfg.name), tag(extra_train, self.cfg.mix_task)]), tag(held_out, self.cfg.name)

    def test_split(self, n: int, exclude: set[str] = frozenset()) -> datasets.Dataset | None:
        """The main task's test rows (evaluation stays on the main task), tagged with its name."""
        test = self.main.test_split(n, exclude)
        return None if test is None else test.add_column("task", [self.cfg.name] * len(test))

    def sft_examples(self, n: int, exclude: set[str]) -> list[dict[str, str]] | None:
        """`mix_sft_share` of the rows from the second task, shuffled, each tagged with its task. If
        either task warm-starts on its training rows, so does the mixture (on both tasks' rows)."""
        n_extra = int(n * self.cfg.mix_sft_share)
        main, extra = self.main.sft_examples(n - n_extra, exclude), self.extra.sft_examples(n_extra, exclude)
        if main is None or extra is None:
            return None
        out = [{**ex, "task": self.cfg.name} for ex in main] + [{**ex, "task": self.cfg.mix_task} for ex in extra]
        random.Random(f"mix-{self.seed}").shuffle(out)
        return out

    def task_of(self, row: dict[str, Any]) -> Task:
        """The task that made this row, by the row's `task` column."""
        name = row.get("task")
        if name not in self.parts:
            raise ValueError(f"row's task {name!r} is not part of the mixture {self.name!r} (rows of a mixture carry a `task` column)")
        return self.parts[name]

    def check(self, completion: str, row: dict[str, Any]) -> bool:
        return self.task_of(row).check(completion, row)

    def data_key(self) -> dict[str, Any]:
        return {"main": self.main.data_key(), "mix": self.extra.data_key(), "mix_sft_share": self.cfg.mix_sft_share}

    def share_at(self, step: int) -> float:
        """Share of this step's training prompts drawn from the second task."""
        cfg = self.cfg
        if step < cfg.mix_start:
            return 0.0
        return cfg.mix_share * min(1.0, (step - cfg.mix_start + 1) / max(1, cfg.mix_ramp))


def make_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """The configured task (a `MixedTask` when `task.mix_task` is set), its settings validated."""
    if cfg.mix_task:
        return MixedTask(cfg, seed)
    cls, settings = task_settings(cfg.name, cfg.args)
    return cls(cfg, settings, seed)


def describe_tasks() -> str:
    """Every registered task: name, one-line description, settings with type, default and help."""
    return describe_plugins(TASKS, "codraft run --set task.name=<name> --set task.args.<field>=<value>")
