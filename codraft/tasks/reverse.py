"""`reverse`: write the digits in reverse order.

    Q: reverse 7 3 9 1 A:  ->  ` 1 9 3 7 #### 1937`

Easy for a small model and very different text from the arithmetic task: used as the second task
of a data-mixture shift (`task.mix_task`), it changes what the policy generates without costing
the main task much of the warm-start budget.
"""
from __future__ import annotations

import random

from codraft.task import TASKS, SyntheticTask


@TASKS.register("reverse")
class Reverse(SyntheticTask):
    description = "Write 3 to 8 digits in reverse order (a second task for data-mixture shifts)."

    def example(self, rng: random.Random) -> dict[str, str]:
        digits = [str(rng.randint(1, 9)) for _ in range(rng.randint(3, 8))]
        back = digits[::-1]
        return {"prompt": f"Q: reverse {' '.join(digits)} A:", "answer": "".join(back), "solution": f" {' '.join(back)} #### {''.join(back)}"}
