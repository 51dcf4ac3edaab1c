"""`arith`: a chain of additions and subtractions on small values, solved one operation at a time.

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
from __future__ import annotations

import random
from dataclasses import dataclass

from codraft.config import ConfigError
from codraft.task import TASKS, SyntheticTask, num_ops


@dataclass(frozen=True)
class ArithConfig:
    min_ops: int = 2
    """Fewest operations in a problem."""
    max_ops: int = 12
    """Most operations in a problem (longer problems give longer worked solutions)."""
    ops_decay: float = 0.8
    """P(n ops) is proportional to ops_decay ** (n - min_ops), a long tail of long problems."""
    max_operand: int = 9
    """Largest operand."""
    max_value: int = 9
    """The running value stays within 0..max_value (operations are chosen to keep it there)."""
    careful_share: float = 0.1
    """Warm-start data: share of solutions in the careful, verbose style (the rest are terse)."""
    terse_error: float = 0.15
    """Warm-start data: chance that a terse step's result is off by one (careful steps: a tenth of it)."""

    def validate(self, prefix: str = "task.args.") -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ConfigError(f"config key '{prefix}min_ops' must be >= 1 and <= {prefix}max_ops")
        if not 0 < self.ops_decay <= 1:
            raise ConfigError(f"config key '{prefix}ops_decay' must be in (0, 1]")


@TASKS.register("arith")
class Arithmetic(SyntheticTask):
    description = "A chain of additions and subtractions, solved one operation per sentence (terse or careful style)."
    Config = ArithConfig

    def example(self, rng: random.Random) -> dict[str, str]:
        s = self.settings
        start = value = rng.randint(1, min(s.max_operand, s.max_value))
        ops = []
        for _ in range(num_ops(rng, s.min_ops, s.max_ops, s.ops_decay)):
            operand = rng.randint(1, max(1, min(s.max_operand, max(s.max_value - value, value))))
            allowed = [op for op, ok in (("+", value + operand <= s.max_value), ("-", value >= operand)) if ok]
            op = rng.choice(allowed)
            ops.append((op, operand))
            value = value + operand if op == "+" else value - operand
        careful = rng.random() < s.careful_share
        error = s.terse_error / 10 if careful else s.terse_error
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
