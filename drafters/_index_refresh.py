"""Refresh without distillation, for the drafter kinds that hold a suffix index inside vLLM's worker
(drafters/suffix.py, drafters/hybrid.py): the step's rollouts join codraft's copy of the history and
are pushed into the live proposer; the proposer's reply gives its own cost per engine step."""
from __future__ import annotations

import math

from drafters._suffix_index import History


class IndexRefresh:
    """Refresh without distillation, for the kinds that hold a suffix index in the engine (suffix,
    hybrid): each step's rollouts join `history` (codraft's copy, to save and restore) and are pushed
    into the live proposer. A kind sets `history` and may extend `reply_metrics` and `restore_update`."""

    history: History

    def on_rollouts(self, engine, prompts: list[list[int]], completions: list[list[int]], prompt_index: list[int]) -> dict[str, float]:
        """Refresh: the step's rollouts join the history and the live proposer's index."""
        rows = [[list(prompts[i]), list(c)] for i, c in zip(prompt_index, completions)]
        for prompt, completion in rows:
            self.history.add(prompt, completion)
        out = {"drafter/index_tokens": float(self.history.tokens), "drafter/index_rollouts": float(len(self.history.rows))}
        reply = push(engine, {"rollouts": rows, "stats": "reset"})
        return {**out, **self.reply_metrics(reply)} if reply is not None else out

    def reply_metrics(self, reply: dict) -> dict[str, float]:
        """Metrics from the proposer's reply to a step's push."""
        return proposer_metrics(reply["stats"])

    def runtime_state(self) -> dict:
        return {"history": [[list(p), list(c)] for p, c in self.history.rows]}

    def restore_update(self, state: dict) -> dict:
        """The push that puts `state` (from `runtime_state`) back into a live proposer."""
        return {"reset": True, "rollouts": self.runtime_state()["history"]}

    def load_runtime_state(self, state: dict, engine) -> None:
        self.history = History(self.history.limit)
        for prompt, completion in state.get("history", ()):
            self.history.add(prompt, completion)
        push(engine, self.restore_update(state))


def push(engine, update: dict) -> dict | None:
    """Hand `update` to the proposer inside `engine`'s workers; None for an engine without one
    (the reference engine, or none at all)."""
    update_proposer = getattr(engine, "update_proposer", None)
    return update_proposer(update) if update_proposer is not None else None


def proposer_metrics(stats: dict) -> dict[str, float]:
    """The proposer's cost from its `stats`: ms per engine step, and that over the engine step's ms."""
    if not stats["calls"]:
        return {}
    own = stats["seconds"] / stats["calls"]
    step = stats["step_seconds"] / stats["steps_timed"] if stats["steps_timed"] else math.nan
    return {"spec/proposer_ms_per_step": 1e3 * own, "spec/proposer_share": own / step}
