"""`suffix`: a model-free drafter that continues what the same prompt's text already holds.

Nothing is distilled (`learned = False`). vLLM serves it with its own proposer interface:
`{"method": "custom_class", "model": "drafters.suffix.SuffixProposer", "num_speculative_tokens": k}`.
After every engine step `SuffixProposer.propose` sees each running request's tokens and returns up
to k draft tokens per request (fewer, or none, where it is unsure).

Index: `SuffixIndex` (drafters/_suffix_index.py) counts every substring (up to `max_match + k`
tokens) of its sequences in a trie. Each prompt has one (a `Group`, keyed by the prompt's tokens)
holding the prompt, earlier steps' rollouts of it, and the completions of its GRPO group in flight,
the request's own included (a sequence enters with the prompt's last `max_match + k - 1` tokens as
context); an optional `global` index holds earlier rollouts of every prompt. Requests are known by
content: a new row's prompt is its tokens less the one just sampled (vLLM proposes right after a
prefill), so a prompt's samples share a group untold; a row is the same request next step if its
length and three tokens agree. A wrong guess (a request re-prefilled after preemption) costs
drafts, never correctness.

Draft: from the longest suffix of the request (`min_match`..`max_match` tokens) that the index saw
followed by something (its prompt's index; the global one only if longer), follow the most
frequent continuation (ties: the smaller id) while the product of the frequencies along the draft
stays >= `min_token_prob`, for at most ceil(`tokens_per_match` x match length) tokens and k (or the
k of the k-by-batch-size table). It is a deterministic function of tokens already generated, a
point mass, so vLLM's rejection sampler keeps the target's distribution exactly.

Refresh: `SuffixDrafter.on_rollouts` adds a step's rollouts to a history of at most
`history_tokens` completion tokens (oldest dropped first, by one `History` here and in the
proposer) and pushes them into the live proposer (`engine.update_proposer`, through vLLM's `collective_rpc`; plain
lists). A push, or the first step of a new `generate`, drops the in-flight sequences: the index is
history + prompts + this generation's sequences, with exact counts (removal replays addition), so
a resumed run that pushes its saved history (`load_runtime_state`) drafts as the uninterrupted one.
The proposer times itself per running batch size (`stats`, in the reply to a push that asks).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from codraft.config import ConfigError
from codraft.configfile import from_dict, to_dict
from codraft.drafter import DRAFTERS, Drafter, DrafterMismatch
from drafters._index_refresh import IndexRefresh
from drafters._suffix_index import History, SuffixIndex, draft_with_prob, longest_match

PROPOSER = "drafters.suffix.SuffixProposer"
SOURCES = ("prompt", "siblings", "history", "global")


@dataclass(frozen=True)
class SuffixConfig:
    history_tokens: int = 32768
    """Completion tokens of earlier steps' rollouts kept in the index; the oldest rollouts are dropped first."""
    max_match: int = 4
    """Longest context (tokens) matched against the index; the index is max_match + k tokens deep."""
    min_match: int = 1
    """Shortest matched context that may draft."""
    min_token_prob: float = 0.1
    """Stop a draft once its empirical probability (product of next-token frequencies along it) is below this."""
    tokens_per_match: float = 1.0
    """Draft at most ceil(tokens_per_match x match length) tokens (and at most k); 0: only k limits."""
    sources: tuple[str, ...] = SOURCES
    """What the index holds: `prompt`, `siblings` (in-flight completions of the same prompt, the request's
    own included), `history` (earlier rollouts of the same prompt), `global` (earlier rollouts of every prompt)."""

    def validate(self, prefix: str = "drafter.args.") -> None:
        for key, ok, why in (
            ("history_tokens", self.history_tokens >= 0, "must be >= 0"),
            ("min_match", 1 <= self.min_match <= self.max_match, f"must be in 1..max_match ({self.max_match})"),
            ("min_token_prob", 0.0 <= self.min_token_prob <= 1.0, "must be in [0, 1]"),
            ("tokens_per_match", self.tokens_per_match >= 0, "must be >= 0"),
            ("sources", set(self.sources) <= set(SOURCES), f"must name some of {', '.join(SOURCES)}"),
        ):
            if not ok:
                raise ConfigError(f"config key '{prefix}{key}' {why}, got {getattr(self, key)!r}")


@dataclass(slots=True, eq=False)
class Group:
    """One prompt's index (the prompt, its earlier rollouts, its sequences in flight) and how many
    rollouts and requests of this generation it holds (it goes when both are 0)."""

    prompt: tuple[int, ...]
    index: SuffixIndex
    history: int = 0
    lives: int = 0


@dataclass(slots=True, eq=False)
class Live:
    """A request of this generation: its group, the tokens it put in the group's index (the prompt's
    tail, the completion so far), its length in the engine's row, the position and value of its first
    completion token, and the nodes of its suffixes (lengths 1, 2, ..) in the group's index."""

    group: Group
    first: int
    first_token: int
    tokens: list = field(default_factory=list)
    length: int = 0
    active: list = field(default_factory=list)

    def continues(self, ids, row: int, n: int, new: int) -> bool:
        return self.length + new == n and ids[row, self.length - 1] == self.tokens[-1] and ids[row, self.first] == self.first_token


# ------------------------------------------------------------------------------------- proposer
class SuffixProposer:
    """vLLM's `custom_class` proposer over the suffix index, built by vLLM in the worker from its
    config; its settings come in the target's config (`codraft_suffix`, `SuffixDrafter.target_overrides`)."""

    def __init__(self, vllm_config):
        spec, model = vllm_config.speculative_config, vllm_config.model_config
        args = dict(getattr(model.hf_config, "codraft_suffix", None) or {})
        self.settings = SuffixConfig(**{key: tuple(v) if key == "sources" else v for key, v in args.items()})
        self.settings.validate("codraft_suffix.")
        self.k, self.max_model_len = spec.num_speculative_tokens, model.max_model_len
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.depth = self.settings.max_match + self.k
        self.sources = frozenset(self.settings.sources)
        self.weight = 1 if "siblings" in self.sources else 0  # in-flight sequences counted in the index, or only looked up
        self.set_k_schedule(spec.num_speculative_tokens_per_batch_size)
        self._clear()
        self.stats(reset=True)

    def load_model(self, *args, **kwargs) -> None:
        """No weights."""

    def set_k_schedule(self, schedule) -> None:
        """k by running batch size: inclusive (lo, hi, k) ranges, a gap or the tail carrying the k
        before it, as vLLM's scheduler reads its table; empty: always k."""
        ranges = sorted(tuple(int(x) for x in r) for r in schedule or ())
        self.k_by_batch = [min(self.k, [k for lo, _, k in ranges if lo <= b][-1]) for b in range(1, self.max_num_seqs + 1)] if ranges else None

    def _clear(self) -> None:
        self.history = History(self.settings.history_tokens)
        self.groups: dict[tuple[int, ...], Group] = {}
        self.outer = SuffixIndex(self.depth) if "global" in self.sources else None
        self.lives: dict[int, Live] = {}  # engine row -> request in flight
        self.recent: deque[Live] = deque()  # requests of this generation that finished
        self.recent_tokens = 0

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        """vLLM calls this after every engine step: draft tokens for each running request (row)."""
        start = time.perf_counter()
        n_reqs = len(sampled_token_ids)
        k = self.k if self.k_by_batch is None else self.k_by_batch[min(n_reqs, self.max_num_seqs) - 1]
        lengths = num_tokens_no_spec[:n_reqs].tolist()
        if (self.lives or self.recent) and self._new_generation(sampled_token_ids, lengths, token_ids_cpu):
            self._drop_in_flight()
        before, self.lives = self.lives, {}
        drafts, continued = [], False
        self.draft_probs: list[float] = []  # each row's draft's empirical probability (drafters/hybrid.py reads it)
        for row, new in enumerate(sampled_token_ids):
            if not new:  # a partial prefill: nothing sampled, nothing to draft
                if row in before:
                    self.lives[row] = before.pop(row)
                drafts.append([])
                self.draft_probs.append(1.0)
                continue
            n = lengths[row]
            live = self._find(before, token_ids_cpu, row, n, len(new))
            if live is not None:
                self._append(live, new)
                continued = True
            else:
                live = self._start(token_ids_cpu[row, :n].tolist(), len(new))
            self.lives[row] = live
            draft, prob = self._draft(live, k, n) if k > 0 else ([], 1.0)
            drafts.append(draft)
            self.draft_probs.append(prob)
        for live in before.values():
            self._retire(live)
        self._account(start, n_reqs, continued, drafts)
        return drafts

    def _new_generation(self, sampled, lengths, ids) -> bool:
        """Whether no request in flight before this step is still running (a new `generate`)."""
        lives = self.lives
        for row, new in enumerate(sampled):  # usually row 0 answers
            live = lives.get(row)
            if new and live is not None and live.continues(ids, row, lengths[row], len(new)):
                return False
        by_end: dict[tuple[int, int], list[Live]] = {}
        for live in lives.values():
            by_end.setdefault((live.length, live.tokens[-1]), []).append(live)
        for row, new in enumerate(sampled):
            start = lengths[row] - len(new)
            if new and any(live.continues(ids, row, lengths[row], len(new)) for live in by_end.get((start, int(ids[row, start - 1])), ())):
                return False
        return True

    @staticmethod
    def _find(before: dict[int, Live], ids, row: int, n: int, new: int) -> Live | None:
        """The request now in `row`: the one there before, or one vLLM moved (it compacts rows)."""
        live = before.get(row)
        if live is not None and live.continues(ids, row, n, new):
            return before.pop(row)
        old = next((old for old, live in before.items() if live.continues(ids, row, n, new)), None)
        return None if old is None else before.pop(old)

    def _start(self, tokens: list[int], new: int) -> Live:
        prompt = tuple(tokens[: len(tokens) - new])
        group = self.groups.get(prompt) or self._group(prompt)
        group.lives += 1
        live = Live(group, len(prompt), tokens[len(prompt)])
        self._append(live, list(prompt[1 - self.depth :]) + tokens[len(prompt) :])
        live.length = len(tokens)
        return live

    def _append(self, live: Live, new: list[int]) -> None:
        index, weight = live.group.index, self.weight
        keep = self.depth - 1 if weight else self.settings.max_match
        for token in new:
            live.active = index.extend(live.active, token, weight, keep)
        live.tokens.extend(new)
        live.length += len(new)

    def _draft(self, live: Live, k: int, n: int) -> tuple[list[int], float]:
        s = self.settings
        length, node = longest_match(live.active, s.min_match, s.max_match)
        if self.outer is not None and length < s.max_match:  # the global index where it matches longer
            for longer in range(min(s.max_match, len(live.tokens)), max(s.min_match, length + 1) - 1, -1):
                other = self.outer.root
                for token in live.tokens[-longer:]:
                    other = other.get(token)
                    if other is None:
                        break
                if other is not None and len(other) > 1:
                    length, node = longer, other
                    break
        if node is None:
            return [], 1.0
        limit = min(k, self.max_model_len - n - 1)
        if s.tokens_per_match > 0:
            limit = min(limit, math.ceil(s.tokens_per_match * length))
        return draft_with_prob(node, limit, s.min_token_prob)

    # ------------------------------------------------------------------ index upkeep
    def _group(self, prompt: tuple[int, ...]) -> Group:
        group = self.groups[prompt] = Group(prompt, SuffixIndex(self.depth))
        if "prompt" in self.sources:
            group.index.add(prompt)
        return group

    def _retire(self, live: Live) -> None:
        """A finished request stays in its group's index, for its siblings, until the generation ends."""
        self.recent.append(live)
        self.recent_tokens += len(live.tokens)
        while self.recent_tokens > self.settings.history_tokens:
            self.recent_tokens -= len(self.recent[0].tokens)
            self._drop(self.recent.popleft())

    def _drop(self, live: Live) -> None:
        group = live.group
        if "siblings" in self.sources:
            group.index.add(live.tokens, -1)
        group.lives -= 1
        if group.lives == 0 and group.history == 0:
            self.groups.pop(group.prompt, None)

    def _drop_in_flight(self) -> None:
        for live in [*self.lives.values(), *self.recent]:
            if live.group.history:  # a prompt with earlier rollouts: take the sequence out
                self._drop(live)
            else:  # a prompt seen only in this generation: its whole index goes
                self.groups.pop(live.group.prompt, None)
        self.lives, self.recent, self.recent_tokens = {}, deque(), 0

    def _index_rollout(self, prompt: tuple[int, ...], completion, weight: int) -> None:
        sequence = list(prompt[1 - self.depth :]) + list(completion)
        if "history" in self.sources:
            group = self.groups.get(prompt) or self._group(prompt)
            group.index.add(sequence, weight)
            group.history += weight
            if group.history == 0 and group.lives == 0:
                del self.groups[prompt]
        if self.outer is not None:
            self.outer.add(sequence, weight)

    def update(self, update: dict[str, Any]) -> dict[str, Any]:
        """A push from codraft (plain data): `rollouts` ([[prompt ids], [completion ids]], ..) to
        remember, `reset` (forget every rollout first), `k_schedule` (k by running batch size),
        `stats` (True: reply with them too; "reset": and start counting again)."""
        reply: dict[str, Any] = {"stats": self.stats(reset=update["stats"] == "reset")} if update.get("stats") else {}
        if "k_schedule" in update:
            self.set_k_schedule(update["k_schedule"])
        if update.get("reset") or "rollouts" in update:
            self._drop_in_flight()  # those sequences come back as rollouts
            if update.get("reset"):
                self._clear()
            for prompt, completion in update.get("rollouts", ()):
                self._index_rollout(tuple(prompt), completion, 1)
                for old in self.history.add(prompt, completion):
                    self._index_rollout(*old, -1)
        return {**reply, "rollouts": len(self.history.rows), "tokens": self.history.tokens, "prompts": len(self.groups)}

    # ------------------------------------------------------------------ cost
    def _account(self, start: float, n_reqs: int, continued: bool, drafts: list[list[int]]) -> None:
        row = self.by_batch.setdefault(n_reqs, [0, 0.0, 0.0, 0, 0, 0])
        if continued and self.last_start is not None:  # the engine step between the last call and this one
            row[2] += start - self.last_start
            row[3] += 1
        row[4] += sum(1 for d in drafts if d)
        row[5] += sum(map(len, drafts))
        self.last_start = start
        row[0] += 1
        row[1] += time.perf_counter() - start

    STATS = ("calls", "seconds", "step_seconds", "steps_timed", "drafts", "draft_tokens")

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counters since the last reset, in total and `by_batch` (running batch size -> one value per
        name in STATS): own seconds, and engine-step seconds (one call's start to the next one's,
        within a generation). Plain numbers, so they pickle."""
        by_batch = getattr(self, "by_batch", {})
        out: dict[str, Any] = {name: sum(r[i] for r in by_batch.values()) for i, name in enumerate(self.STATS)}
        out["by_batch"] = {b: list(r) for b, r in by_batch.items()}
        if reset:
            self.by_batch: dict[int, list] = {}
            self.last_start: float | None = None
        return out


# -------------------------------------------------------------------------------------- drafter
@DRAFTERS.register("suffix")
class SuffixDrafter(IndexRefresh, Drafter):
    description = "Model-free: continues the same prompt's text (prompt, siblings in flight, earlier rollouts); refreshed by indexing each step's rollouts; vLLM `custom_class`."
    Config = SuffixConfig
    method = "custom_class"
    learned = False
    drafts_in_vllm_only = True

    def __init__(self, settings: SuffixConfig, vocab_size: int):
        super().__init__()
        self.settings, self.vocab_size = settings, vocab_size
        self.history = History(settings.history_tokens)  # what the proposer's index holds, to save and restore

    @classmethod
    def build(cls, policy, settings: SuffixConfig, token_counts=None) -> "SuffixDrafter":
        return cls(settings, policy.config.vocab_size)

    def hf_config(self) -> dict:
        return {"architectures": [PROPOSER], "vocab_size": self.vocab_size, "codraft_suffix": to_dict(self.settings)}

    def serving_weights(self) -> dict:
        return {}  # nothing learned: the checkpoint is its config.json (and an empty model.safetensors)

    @classmethod
    def from_checkpoint(cls, config: dict, weights: dict, policy) -> "SuffixDrafter":
        settings = from_dict(SuffixConfig, config.get("codraft_suffix", {}), prefix="codraft_suffix.")
        settings.validate("codraft_suffix.")
        return cls(settings, int(config["vocab_size"]))

    def check_fits(self, policy_config) -> None:
        if self.vocab_size != policy_config.vocab_size:
            raise DrafterMismatch(f"suffix drafter vocabulary {self.vocab_size} does not fit the target's {policy_config.vocab_size}")

    def speculative_config(self, path, k: int) -> dict:
        return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": k}

    def target_overrides(self) -> dict:
        """The proposer's settings travel in the target's config (vLLM builds it from its config alone)."""
        return {"codraft_suffix": self.hf_config()["codraft_suffix"]}
