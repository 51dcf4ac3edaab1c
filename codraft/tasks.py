"""Verifiable tasks: prompts with gold answers, worked solutions for warm starts, and rewards.

Every task yields `datasets.Dataset`s with columns `prompt`, `answer` (the gold final answer as a
string) and `solution` (a worked solution ending in `#### <answer>`, used for supervised warm
starts). Training and held-out prompts are disjoint.

Rewards: `answer_reward` when the completion's final answer (`#### <number>`) is exactly right,
`format_reward` when the completion stops by itself and ends with `#### <number>`.

Tasks:
- `arith`: a chain of additions and subtractions, solved one operation per sentence.
- `countdown`: reach a target from a pool of numbers; every step must use available numbers and
  be correct arithmetic.
- `gsm8k`: a local JSONL/Parquet file in the GSM8K layout (`question`, `answer` ending in `#### n`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from codraft.config import TaskConfig
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


class Task:
    """A verifiable task. Subclasses produce the examples and check a completion."""

    name: str = "task"

    def __init__(self, cfg: TaskConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        """(train, eval) datasets with columns prompt, answer, solution."""
        raise NotImplementedError

    def owns(self, prompt: str) -> bool:
        """Whether a prompt belongs to this task (used to route prompts of task mixtures)."""
        return True

    def check(self, completion: str, prompt: str, answer: str) -> bool:
        """Whether the completion's final answer is exactly right."""
        got = final_answer(completion)
        return got is not None and same_number(got, answer)

    def score(self, completion: str, prompt: str, answer: str, finished: bool) -> Score:
        formatted = finished and final_answer(completion) is not None
        return Score(correct=self.check(completion, prompt, answer), formatted=formatted)

    def reward(self, score: Score) -> float:
        return self.cfg.answer_reward * score.correct + self.cfg.format_reward * score.formatted


TASKS: Registry[Task] = Registry("task")


class SyntheticTask(Task):
    """Generates problems from a seeded RNG; held-out prompts never appear in training."""

    def num_ops(self, rng: random.Random, most: int | None = None) -> int:
        """Operations in a problem: min_ops..max_ops with a geometric long tail (`task.ops_decay`)."""
        lo, hi = self.cfg.min_ops, most or self.cfg.max_ops
        sizes = list(range(lo, hi + 1))
        return rng.choices(sizes, weights=[self.cfg.ops_decay ** (n - lo) for n in sizes])[0]

    def example(self, rng: random.Random) -> dict[str, str]:
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
            raise ValueError(f"task {self.name!r} could only make {len(out)} distinct problems of {n}; widen task.max_operand or task.max_ops")
        return out

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        rng = random.Random(f"{self.name}-{self.seed}")
        held_out = self.generate(self.cfg.num_eval, rng)
        train = self.generate(self.cfg.num_train, rng, exclude={ex["prompt"] for ex in held_out})
        return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held_out)

    def sft_examples(self, n: int, exclude: set[str]) -> list[dict[str, str]]:
        """Fresh problems for the supervised warm start, disjoint from `exclude` (the held-out set)."""
        return self.generate(n, random.Random(f"{self.name}-sft-{self.seed}"), exclude=exclude)


@TASKS.register("arith")
class Arithmetic(SyntheticTask):
    """A chain of additions and subtractions on single-digit values, solved one operation at a time.

        Q: 7+5-3=? A:
        terse:   ` 7+5=12. 12-3=9. #### 9`
        careful: ` 7 left +5-3. 7+5=12 left -3. 12-3=9 left none. #### 9`

    The careful style tracks state: after each step it restates the operations still to do, so the
    next one is read from right before it instead of being located in the prompt. It is longer and,
    for a small model, far more reliable. The warm-start (SFT) data mixes the styles: mostly terse
    solutions whose steps slip by one with probability `terse_error` (the slip carries through the
    chain), and a `careful_share` of careful ones that slip ten times less often. The SFT policy
    therefore solves part of the task at temperature 1, and RL can sharpen its arithmetic or move it
    to the careful style; either changes the text a drafter sees, the drift codraft studies. On the
    default testbed RL sharpens the terse style: with a tenth of the warm-start data, the careful
    style is the one the policy executes worse, and RL drops it.
    """

    def owns(self, prompt: str) -> bool:
        return re.fullmatch(r"Q: [\d+\-]+=\? A:", prompt) is not None

    def example(self, rng: random.Random) -> dict[str, str]:
        cfg = self.cfg
        start = value = rng.randint(1, min(cfg.max_operand, cfg.max_value))
        ops = []
        for _ in range(self.num_ops(rng)):
            operand = rng.randint(1, max(1, min(cfg.max_operand, max(cfg.max_value - value, value))))
            allowed = [op for op, ok in (("+", value + operand <= cfg.max_value), ("-", value >= operand)) if ok]
            op = rng.choice(allowed)
            ops.append((op, operand))
            value = value + operand if op == "+" else value - operand
        careful = rng.random() < cfg.careful_share
        error = cfg.terse_error / 10 if careful else cfg.terse_error
        rest = lambda i: "".join(f"{o}{n}" for o, n in ops[i:]) or "none"  # noqa: E731
        steps, current = [f"{start} left {rest(0)}."] if careful else [], start
        for i, (op, operand) in enumerate(ops):
            result = current + operand if op == "+" else current - operand
            if rng.random() < error:  # an off-by-one slip that the rest of the chain carries
                result = result + 1 if result == 0 or rng.random() < 0.5 else result - 1
            steps.append(f"{current}{op}{operand}={result}" + (f" left {rest(i + 1)}." if careful else "."))
            current = result
        expr = str(start) + "".join(f"{op}{operand}" for op, operand in ops)
        return {"prompt": f"Q: {expr}=? A:", "answer": str(value), "solution": f" {' '.join(steps)} #### {current}"}


STEP = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)")


@TASKS.register("countdown")
class Countdown(SyntheticTask):
    """`Q: make 61 from 7 9 25 3 A:` -> ` 7*9=63. 63-3=60. ...` ; every step must be valid."""

    def owns(self, prompt: str) -> bool:
        return prompt.startswith("Q: make ")

    def example(self, rng: random.Random) -> dict[str, str]:
        n_ops = self.num_ops(rng, most=min(self.cfg.max_ops, 4))
        pool = [rng.randint(1, min(25, self.cfg.max_operand)) for _ in range(n_ops + 1)]
        live, steps = list(pool), []
        while len(live) > 1:
            a, b = live.pop(rng.randrange(len(live))), live.pop(rng.randrange(len(live)))
            a, b = max(a, b), min(a, b)
            op = rng.choice("+-*") if a * b <= 200 else rng.choice("+-")
            c = a + b if op == "+" else a - b if op == "-" else a * b
            steps.append(f"{a}{op}{b}={c}.")
            live.append(c)
        target = live[0]
        numbers = " ".join(map(str, pool))
        return {"prompt": f"Q: make {target} from {numbers} A:", "answer": str(target), "solution": " " + " ".join(steps) + f" #### {target}"}

    def check(self, completion: str, prompt: str, answer: str) -> bool:
        if not super().check(completion, prompt, answer):
            return False
        match = re.search(r"from ([\d ]+) A:", prompt)
        if not match:
            return False
        live = [int(x) for x in match.group(1).split()]
        body = completion.split("####")[0]
        steps = STEP.findall(body)
        if not steps:
            return False
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            if (a + b if op == "+" else a - b if op == "-" else a * b) != c:
                return False
            for x in (a, b):
                if x not in live:
                    return False
                live.remove(x)
            live.append(c)
        return int(steps[-1][3]) == int(answer)


@TASKS.register("reverse")
class Reverse(SyntheticTask):
    """`Q: reverse 7 3 9 1 A:` -> ` 1 9 3 7 #### 1937`: write the digits in reverse order.

    Easy for a small model and very different text from the arithmetic task: used as the second
    task of a data-mixture shift (`task.mix_task`), it changes what the policy generates without
    costing the main task much of the warm-start budget."""

    def owns(self, prompt: str) -> bool:
        return prompt.startswith("Q: reverse ")

    def example(self, rng: random.Random) -> dict[str, str]:
        digits = [str(rng.randint(1, 9)) for _ in range(rng.randint(3, 8))]
        back = digits[::-1]
        return {"prompt": f"Q: reverse {' '.join(digits)} A:", "answer": "".join(back), "solution": f" {' '.join(back)} #### {''.join(back)}"}


@TASKS.register("gsm8k")
class GSM8K(Task):
    """A local file in the GSM8K layout: `question`, `answer` = worked solution ending in `#### n`."""

    @staticmethod
    def load_file(path: str) -> datasets.Dataset:
        file = Path(path)
        if not path or not file.is_file():
            raise FileNotFoundError(f"task.path: GSM8K file not found: {path!r}")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(file.suffix)
        if kind is None:
            raise ValueError(f"task.path: {path} must end in .jsonl, .json or .parquet")
        if file.stat().st_size == 0:
            raise ValueError(f"task.path: {path} holds no rows")
        try:
            ds = datasets.load_dataset(kind, data_files=str(file), split="train")
        except Exception as err:  # datasets raises several types for unreadable files
            raise ValueError(f"task.path: cannot read {path} as {kind}: {str(err).strip() or type(err).__name__}") from None
        missing = {"question", "answer"} - set(ds.column_names)
        if missing:
            raise ValueError(f"task.path: {path} lacks column(s) {sorted(missing)} (GSM8K layout: question, answer)")
        if len(ds) == 0:
            raise ValueError(f"task.path: {path} holds no rows")

        def convert(row: dict, idx: int) -> dict:
            gold = final_answer(row["answer"])
            if gold is None:
                raise ValueError(f"task.path: {path} row {idx}: answer does not end in '#### <number>'")
            return {"prompt": f"Q: {row['question'].strip()} A:", "answer": gold, "solution": " " + row["answer"].strip()}

        return ds.map(convert, with_indices=True, remove_columns=ds.column_names)

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        data = self.load_file(self.cfg.path)
        if self.cfg.eval_path:
            held_out = self.load_file(self.cfg.eval_path)
        else:
            if len(data) <= self.cfg.num_eval:
                raise ValueError(f"task.path: {self.cfg.path} has {len(data)} rows, not more than task.num_eval={self.cfg.num_eval}")
            held_out = data.select(range(len(data) - self.cfg.num_eval, len(data)))
            data = data.select(range(len(data) - self.cfg.num_eval))
        seen = set(held_out["prompt"])
        train = data.filter(lambda row: row["prompt"] not in seen)
        return train, held_out.select(range(min(self.cfg.num_eval, len(held_out))))


class MixedTask(Task):
    """The main task plus a second task whose prompts join training from `mix_start` on, their share
    ramping to `mix_share` over `mix_ramp` steps: a shift of the RL data mixture, as curricula and
    staged data mixes produce. Held-out evaluation stays on the main task. Prompts are routed to
    their task by `Task.owns`."""

    def __init__(self, cfg: TaskConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.main = TASKS.get(cfg.name)(cfg, seed)
        self.extra = TASKS.get(cfg.mix_task)(cfg, seed)
        self.name = f"{cfg.name}+{cfg.mix_task}"

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        train, held_out = self.main.splits()
        extra_train, extra_held = self.extra.splits()
        tag = lambda ds, name: ds.add_column("task", [name] * len(ds))  # noqa: E731
        return datasets.concatenate_datasets([tag(train, self.cfg.name), tag(extra_train, self.cfg.mix_task)]), tag(held_out, self.cfg.name)

    def sft_examples(self, n: int, exclude: set[str]) -> list[dict[str, str]]:
        n_extra = int(n * self.cfg.mix_sft_share)
        out = self.main.sft_examples(n - n_extra, exclude) + self.extra.sft_examples(n_extra, exclude)
        random.Random(f"mix-{self.seed}").shuffle(out)
        return out

    def task_of(self, prompt: str) -> Task:
        return self.extra if self.extra.owns(prompt) and not self.main.owns(prompt) else self.main

    def check(self, completion: str, prompt: str, answer: str) -> bool:
        return self.task_of(prompt).check(completion, prompt, answer)

    def share_at(self, step: int) -> float:
        """Share of this step's training prompts drawn from the second task."""
        cfg = self.cfg
        if step < cfg.mix_start:
            return 0.0
        return cfg.mix_share * min(1.0, (step - cfg.mix_start + 1) / max(1, cfg.mix_ramp))


def make_task(cfg: TaskConfig, seed: int = 0) -> Task:
    if cfg.mix_task:
        return MixedTask(cfg, seed)
    return TASKS.get(cfg.name)(cfg, seed)
