"""The suffix drafter's index (drafters/suffix.py): substring counts in a trie, drafts read from them,
and the bounded history of rollouts. Plain Python, deterministic, no vLLM.

    index = SuffixIndex(depth=11)
    index.add(tokens)                       # every substring of up to 11 tokens counted once more
    active = index.add(context, weight=0)   # the context's suffix nodes (lengths 1, 2, ..), not counted
    length, node = longest_match(active, 1, 8)
    draft = draft_from(node, limit=3, min_prob=0.1)
    index.add(tokens, weight=-1)            # exact removal

A node is a dict: next token -> child node, and COUNT -> how often its string occurs. A string's
continuations are its children; the probability of one is its count over the sum of the children's
counts. Nodes are plain dicts because the index is updated for every token every request
generates, and a dict update is the cheapest thing Python has.
"""
from __future__ import annotations

from collections import deque

COUNT = -1  # the key of a node's own count (token ids are >= 0)


class SuffixIndex:
    """Counts of every substring (up to `depth` tokens) of the sequences added, as a trie. Removing a
    sequence replays its addition with weight -1, so counts are exact whatever the order of arrival,
    and a string whose count drops to 0 leaves the trie."""

    def __init__(self, depth: int):
        self.depth = depth
        self.root: dict = {COUNT: 0}

    def extend(self, active: list[dict], token: int, weight: int, keep: int) -> list[dict]:
        """The nodes of a sequence's suffixes of lengths 1, 2, .. (at most `keep`) after appending
        `token`, given `active`, those before it (at most `keep` of them). weight +1 / -1 adds /
        removes this occurrence of each suffix; 0 only looks (suffixes the index lacks end the list)."""
        out: list[dict] = []
        if weight > 0:  # the hot path: every token every request generates
            for parent in (self.root, *active):
                child = parent.get(token)
                if child is None:
                    child = parent[token] = {COUNT: 1}
                else:
                    child[COUNT] += 1
                out.append(child)
        elif weight == 0:
            for parent in (self.root, *active):
                child = parent.get(token)
                if child is None:
                    break
                out.append(child)
        else:
            for parent in (self.root, *active):
                child = parent.get(token)
                if child is None:  # not in the index: it was never added
                    break
                child[COUNT] -= 1
                if child[COUNT] <= 0:  # every occurrence went with this sequence, so do its continuations
                    del parent[token]
                out.append(child)
        return out[:keep] if len(out) > keep else out

    def add(self, tokens, weight: int = 1) -> list[dict]:
        """Count (weight 1), uncount (-1) or only look up (0) a sequence; returns its last suffix nodes."""
        active: list[dict] = []
        for token in tokens:
            active = self.extend(active, token, weight, self.depth - 1)
        return active


def longest_match(active: list[dict], lo: int, hi: int) -> tuple[int, dict | None]:
    """The longest suffix (lo..hi tokens) in `active` that was followed by something: (length, node)."""
    for length in range(min(len(active), hi), lo - 1, -1):
        if len(active[length - 1]) > 1:
            return length, active[length - 1]
    return 0, None


def best_next(node: dict) -> tuple[int, float]:
    """The most frequent continuation of `node` (ties: the smaller id) and its empirical probability."""
    best, best_count, total = -1, 0, 0
    for token, child in node.items():
        if token != COUNT:
            count = child[COUNT]
            total += count
            if count > best_count or (count == best_count and token < best):
                best, best_count = token, count
    return best, best_count / total if total else 0.0


def draft_from(node: dict, limit: int, min_prob: float) -> list[int]:
    """Follow the most frequent continuation while the draft's empirical probability (the product of
    the next-token probabilities along it) is >= min_prob, for at most `limit` tokens."""
    return draft_with_prob(node, limit, min_prob)[0]


def draft_with_prob(node: dict, limit: int, min_prob: float) -> tuple[list[int], float]:
    """`draft_from`'s draft and its empirical probability (1.0 for an empty draft)."""
    out: list[int] = []
    prob = 1.0
    while len(out) < limit and len(node) > 1:
        token, p = best_next(node)
        if prob * p < min_prob:
            break
        prob *= p
        out.append(token)
        node = node[token]
    return out, prob


class History:
    """Earlier rollouts (prompt, completion), at most `limit` completion tokens, oldest dropped first."""

    def __init__(self, limit: int):
        self.limit, self.tokens = limit, 0
        self.rows: deque[tuple[tuple[int, ...], tuple[int, ...]]] = deque()

    def add(self, prompt, completion) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Append a rollout; returns the rollouts dropped to stay within the limit (it may be one)."""
        self.rows.append((tuple(prompt), tuple(completion)))
        self.tokens += len(completion)
        dropped = []
        while self.tokens > self.limit:
            dropped.append(self.rows.popleft())
            self.tokens -= len(dropped[-1][1])
        return dropped
