"""`countdown`: reach a target from a pool of numbers.

    Q: make 61 from 7 9 25 3 A:  ->  ` 7*9=63. 63-3=60. ... #### 61`

A completion is right only if its final answer is the target and every step is correct arithmetic
on numbers still available (each pool number, and each intermediate result, used at most once).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from codraft.config import ConfigError
from codraft.task import TASKS, SyntheticTask, num_ops

STEP = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)")


@dataclass(frozen=True)
class CountdownConfig:
    min_ops: int = 2
    """Fewest operations in a problem."""
    max_ops: int = 12
    """Most operations in a problem (capped at 4: a pool of at most five numbers)."""
    ops_decay: float = 0.8
    """P(n ops) is proportional to ops_decay ** (n - min_ops), a long tail of long problems."""
    max_operand: int = 9
    """Largest number in the pool (capped at 25)."""

    def validate(self, prefix: str = "task.args.") -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ConfigError(f"config key '{prefix}min_ops' must be >= 1 and <= {prefix}max_ops")
        if not 0 < self.ops_decay <= 1:
            raise ConfigError(f"config key '{prefix}ops_decay' must be in (0, 1]")


@TASKS.register("countdown")
class Countdown(SyntheticTask):
    description = "Reach a target from a pool of numbers; every step must use available numbers and be correct."
    Config = CountdownConfig

    def example(self, rng: random.Random) -> dict[str, str]:
        s = self.settings
        n_ops = num_ops(rng, s.min_ops, min(s.max_ops, 4), s.ops_decay)
        pool = [rng.randint(1, min(25, s.max_operand)) for _ in range(n_ops + 1)]
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

    def check(self, completion: str, row: dict[str, Any]) -> bool:
        if not super().check(completion, row):
            return False
        match = re.search(r"from ([\d ]+) A:", row["prompt"])
        if not match:
            return False
        live = [int(x) for x in match.group(1).split()]
        steps = STEP.findall(completion.split("####")[0])
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
        return int(steps[-1][3]) == int(row["answer"])
