"""Speculative-decoding acceptance kept as raw counts; every rate is derived.

One verify step of a sequence with k drafted tokens is one *draft*; it accepts a prefix of 0..k of
them and then emits one more token from the target, so it yields (accepted + 1) tokens.

    stats = AcceptanceStats.empty(k=3)
    stats = stats + AcceptanceStats(drafts=10, draft_tokens=30, accepted=17, accepted_per_pos=(8, 6, 3))
    stats.accept_len   # 1 + 17/10 = 2.7 tokens per verify step
    stats.accept_rate  # 17/30 accepted draft tokens
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AcceptanceStats:
    drafts: int = 0
    """Verify steps that carried drafted tokens."""
    draft_tokens: int = 0
    """Drafted tokens proposed (sum of k over drafts)."""
    accepted: int = 0
    """Drafted tokens accepted."""
    accepted_per_pos: tuple[int, ...] = ()
    """Accepted count at draft position i (position i is reached only if 0..i-1 were accepted)."""

    @classmethod
    def empty(cls, k: int = 0) -> "AcceptanceStats":
        return cls(accepted_per_pos=(0,) * k)

    def __add__(self, other: "AcceptanceStats") -> "AcceptanceStats":
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + (0,) * (n - len(self.accepted_per_pos))
        b = other.accepted_per_pos + (0,) * (n - len(other.accepted_per_pos))
        return AcceptanceStats(
            self.drafts + other.drafts,
            self.draft_tokens + other.draft_tokens,
            self.accepted + other.accepted,
            tuple(x + y for x, y in zip(a, b)),
        )

    def __sub__(self, other: "AcceptanceStats") -> "AcceptanceStats":
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + (0,) * (n - len(self.accepted_per_pos))
        b = other.accepted_per_pos + (0,) * (n - len(other.accepted_per_pos))
        return AcceptanceStats(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted - other.accepted,
            tuple(x - y for x, y in zip(a, b)),
        )

    @property
    def accept_len(self) -> float:
        """Mean tokens emitted per verify step (1 + accepted / drafts); NaN when nothing was drafted
        (no verify step carried drafts, so there is nothing to average)."""
        return 1.0 + self.accepted / self.drafts if self.drafts else float("nan")

    @property
    def accept_len_stderr(self) -> float:
        """Standard error of `accept_len`, exact from the per-position counts.

        A draft's accepted count L is a prefix length, so P(L >= i) = accepted_per_pos[i-1] / drafts
        and E[L^2] = sum_i (2i - 1) P(L >= i) (i from 1); drafts are treated as independent.
        """
        if not self.drafts:
            return float("nan")
        p = [c / self.drafts for c in self.accepted_per_pos]
        mean = sum(p)
        second = sum((2 * i + 1) * q for i, q in enumerate(p))
        return max(second - mean * mean, 0.0) ** 0.5 / self.drafts**0.5

    @property
    def accept_rate(self) -> float:
        """Fraction of drafted tokens accepted."""
        return self.accepted / self.draft_tokens if self.draft_tokens else float("nan")

    def pos_rates(self) -> list[float]:
        """Per position: fraction of drafts whose i-th drafted token was accepted."""
        return [c / self.drafts if self.drafts else float("nan") for c in self.accepted_per_pos]

    def metrics(self, prefix: str = "spec/") -> dict[str, Any]:
        out: dict[str, Any] = {
            f"{prefix}drafts": self.drafts,
            f"{prefix}draft_tokens": self.draft_tokens,
            f"{prefix}accepted": self.accepted,
            f"{prefix}accept_len": self.accept_len,
            f"{prefix}accept_rate": self.accept_rate,
        }
        for i, (count, rate) in enumerate(zip(self.accepted_per_pos, self.pos_rates())):
            out[f"{prefix}accepted_pos_{i}"] = count
            out[f"{prefix}accept_pos_{i}"] = rate
        return out

    @classmethod
    def from_metrics(cls, record: dict[str, Any], prefix: str = "spec/") -> "AcceptanceStats":
        """Rebuild the counts from a metrics record written by `metrics()`."""
        pos, i = [], 0
        while f"{prefix}accepted_pos_{i}" in record:
            pos.append(int(record[f"{prefix}accepted_pos_{i}"]))
            i += 1
        get = lambda key: int(record.get(prefix + key) or 0)  # noqa: E731
        return cls(get("drafts"), get("draft_tokens"), get("accepted"), tuple(pos))


def read_vllm_counters(metrics: list[Any]) -> AcceptanceStats:
    """Cumulative speculative-decoding counters from `vllm.LLM.get_metrics()`."""
    values: dict[str, Any] = {}
    for m in metrics:
        if m.name.startswith("vllm:spec_decode_"):
            if hasattr(m, "values"):
                prev = values.get(m.name, [])
                values[m.name] = [a + b for a, b in zip(m.values, prev)] if prev else list(m.values)
            else:
                values[m.name] = values.get(m.name, 0) + m.value
    return AcceptanceStats(
        drafts=int(values.get("vllm:spec_decode_num_drafts", 0)),
        draft_tokens=int(values.get("vllm:spec_decode_num_draft_tokens", 0)),
        accepted=int(values.get("vllm:spec_decode_num_accepted_tokens", 0)),
        accepted_per_pos=tuple(int(v) for v in values.get("vllm:spec_decode_num_accepted_tokens_per_pos", [])),
    )
