"""The suffix drafter without vLLM: the index's counts against brute force (additions, exact
removals), drafts that follow the most frequent continuation and adapt their length, the history's
bound, and the proposer driven the way vLLM's runner drives a custom-class proposer (a token table
whose rows grow, move when others finish, and start over for a new generation): sibling matching,
refresh by pushed rollouts, eviction of the oldest, the k-by-batch-size table, determinism, and a
resumed drafter that drafts as the uninterrupted one."""
import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from codraft import vllm_compat
from codraft.config import ConfigError
from codraft.configfile import to_dict
from drafters._suffix_index import COUNT, History, SuffixIndex, draft_from, longest_match
from drafters.suffix import SuffixConfig, SuffixDrafter, SuffixProposer

K = 3


def proposer(k=K, table=None, max_num_seqs=8, **settings) -> SuffixProposer:
    """A proposer built as vLLM builds it: from a config whose target carries the settings."""
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k, num_speculative_tokens_per_batch_size=table),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(codraft_suffix=to_dict(SuffixConfig(**settings))), max_model_len=128),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
    )
    return SuffixProposer(config)


class Runner:
    """What vLLM's model runner hands the proposer each step: `token_ids_cpu` rows, their lengths
    (`num_tokens_no_spec`) and the tokens each row just sampled; a finished row's place is taken by
    the last row, as `InputBatch.condense` does."""

    def __init__(self, drafter: SuffixProposer, rows: int = 8, width: int = 128):
        self.drafter, self.ids, self.n = drafter, np.zeros((rows, width), np.int32), np.zeros(rows, np.int32)
        self.rows, self.sampled = 0, {}

    def admit(self, prompt, first: int) -> int:
        row, self.rows = self.rows, self.rows + 1
        self.ids[row, : len(prompt) + 1] = [*prompt, first]
        self.n[row], self.sampled[row] = len(prompt) + 1, [first]
        return row

    def grow(self, row: int, tokens) -> None:
        self.ids[row, self.n[row] : self.n[row] + len(tokens)] = tokens
        self.n[row] += len(tokens)
        self.sampled[row] = list(tokens)

    def finish(self, row: int) -> None:
        last = self.rows - 1
        self.ids[row], self.n[row] = self.ids[last], self.n[last]
        if last in self.sampled:
            self.sampled[row] = self.sampled.pop(last)
        self.rows = last

    def propose(self) -> list[list[int]]:
        sampled, self.sampled = [self.sampled.get(r, []) for r in range(self.rows)], {}
        return self.drafter.propose(sampled, self.n, self.ids)


def generate(drafter: SuffixProposer, prompt, completions) -> list[list[list[int]]]:
    """Sibling completions of `prompt` generated in lock step, one token a step; the drafts of each step."""
    runner, out = Runner(drafter), []
    rows = [runner.admit(prompt, c[0]) for c in completions]
    out.append(runner.propose())
    for t in range(1, max(map(len, completions))):
        for row, c in zip(rows, completions):
            runner.grow(row, c[t : t + 1] or [0])
        out.append(runner.propose())
    return out


def node(index: SuffixIndex, string):
    here = index.root
    for token in string:
        here = here.get(token)
        if here is None:
            return None
    return here


def brute_counts(sequences, depth: int) -> Counter:
    return Counter(tuple(s[i : i + n]) for s in sequences for n in range(1, depth + 1) for i in range(len(s) - n + 1))


def trie_counts(index: SuffixIndex) -> Counter:
    out, stack = Counter(), [((), index.root)]
    while stack:
        string, here = stack.pop()
        for token, child in here.items():
            if token != COUNT:
                assert child[COUNT] > 0, f"{string + (token,)} kept with count {child[COUNT]}"
                out[string + (token,)] = child[COUNT]
                stack.append((string + (token,), child))
    return out


# ------------------------------------------------------------------------------------------ index
def test_index_counts_every_substring_exactly():
    index = SuffixIndex(depth=3)
    index.add([1, 2, 1, 2, 3])
    assert node(index, [1])[COUNT] == 2 and node(index, [1, 2])[COUNT] == 2 and node(index, [2, 1])[COUNT] == 1
    assert node(index, [1, 2, 3])[COUNT] == 1 and node(index, [1, 2, 1, 2]) is None  # deeper than the index
    assert {t: c[COUNT] for t, c in node(index, [1, 2]).items() if t != COUNT} == {1: 1, 3: 1}
    assert trie_counts(index) == brute_counts([[1, 2, 1, 2, 3]], 3)


def test_removal_is_exact_whatever_the_order():
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(1, 30))] for _ in range(12)]
    index = SuffixIndex(depth=5)
    for s in seqs:
        index.add(s)
    for s in seqs[::2]:
        index.add(s, weight=-1)
    assert trie_counts(index) == brute_counts(seqs[1::2], 5)
    fresh = SuffixIndex(depth=5)
    for s in reversed(seqs[1::2]):
        fresh.add(s)
    assert index.root == fresh.root  # the same trie, node for node
    for s in seqs[1::2]:
        index.add(s, weight=-1)
    assert index.root == {COUNT: 0}


def test_draft_follows_the_most_frequent_continuation_until_it_is_unlikely():
    index = SuffixIndex(depth=6)
    for s in ([5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 9]):
        index.add(s)
    start = node(index, [5])
    assert draft_from(start, limit=3, min_prob=0.1) == [6, 7, 8]  # probabilities 1, 3/4, 1
    assert draft_from(start, limit=3, min_prob=0.8) == [6]  # 3/4 < 0.8: stop before 7
    assert draft_from(start, limit=2, min_prob=0.1) == [6, 7]
    tie = SuffixIndex(depth=3)
    tie.add([1, 4])
    tie.add([1, 3])
    assert draft_from(node(tie, [1]), 1, 0.1) == [3]  # ties go to the smaller id


def test_longest_match_needs_a_continuation():
    index = SuffixIndex(depth=6)
    index.add([1, 2, 3, 4])
    active = index.add([9, 2, 3], weight=0)  # suffixes [3], [2, 3]; [9, 2, 3] is unknown
    assert len(active) == 2
    assert longest_match(active, 1, 8) == (2, node(index, [2, 3]))
    assert longest_match(active, 3, 8) == (0, None)
    assert longest_match(index.add([3, 4], weight=0), 1, 8) == (0, None)  # seen, never followed


def test_history_drops_the_oldest_rollouts_first():
    history = History(limit=10)
    assert history.add([1], [1, 2, 3, 4]) == [] and history.add([2], [1, 2, 3, 4]) == []
    assert history.add([3], [5, 6, 7]) == [((1,), (1, 2, 3, 4))]
    assert history.tokens == 7 and [p for p, _ in history.rows] == [(2,), (3,)]
    assert len(history.add([4], list(range(11)))) == 3 and history.tokens == 0  # longer than the bound: kept by nobody


def test_settings_are_checked_with_their_key():
    with pytest.raises(ConfigError, match="'drafter.args.min_match' must be in 1..max_match"):
        SuffixConfig(min_match=9).validate()
    with pytest.raises(ConfigError, match="'drafter.args.sources' must name some of"):
        SuffixConfig(sources=("prompt", "web")).validate()


# --------------------------------------------------------------------------------------- proposer
PROMPT = [1, 2, 3, 4]
TEXT = [10, 11, 12, 13, 14, 15, 16, 17]


def test_a_sibling_drafts_what_its_group_already_wrote():
    drafter = proposer()
    runner = Runner(drafter)
    lead = runner.admit(PROMPT, TEXT[0])
    runner.propose()
    for t in TEXT[1:5]:
        runner.grow(lead, [t])
        runner.propose()
    follower = runner.admit(PROMPT, TEXT[0])  # same prompt, joins later: the same group, untold
    runner.grow(lead, [TEXT[5]])
    drafts = runner.propose()
    assert drafts[follower] == TEXT[1:4] and len(drafter.groups) == 1
    assert drafts[lead] == []  # nothing has followed the lead's own text yet


def first_draft(drafter: SuffixProposer, prompt, first: int = 10) -> list[int]:
    """The draft for a new request of `prompt` whose first sampled token is `first`."""
    runner = Runner(drafter)
    runner.admit(prompt, first)
    return runner.propose()[0]


def test_draft_length_adapts_to_the_match_and_its_confidence():
    def pushed(**settings):
        drafter = proposer(**settings)
        drafter.update({"rollouts": [[PROMPT, TEXT], [PROMPT, [10, 11, 99]]]})
        return drafter

    assert first_draft(pushed(), PROMPT) == [11, 12, 13]  # a 4-token match (prompt tail + 10): up to k; 12 beats 99 on the tie
    assert first_draft(pushed(), [7]) == [11]  # another prompt: a 1-token match in the global index drafts 1 token
    assert first_draft(pushed(tokens_per_match=0), [7]) == [11, 12, 13]
    assert first_draft(pushed(min_token_prob=0.6), PROMPT) == [11]  # 12 follows [10, 11] half the time
    assert first_draft(pushed(sources=("prompt", "siblings", "history")), [7]) == []  # no global index


def test_pushed_rollouts_refresh_the_index_and_the_oldest_are_evicted():
    drafter = proposer(history_tokens=10)
    assert first_draft(drafter, PROMPT) == []
    assert drafter.update({"rollouts": [[PROMPT, TEXT]]}) == {"rollouts": 1, "tokens": 8, "prompts": 1}
    assert first_draft(drafter, PROMPT) == [11, 12, 13]
    assert drafter.update({"rollouts": [[[5, 5], [20, 21, 22, 23]]]}) == {"rollouts": 1, "tokens": 4, "prompts": 1}
    assert first_draft(drafter, PROMPT) == [] and first_draft(drafter, [5, 5], 20) == [21, 22, 23]
    only = proposer(history_tokens=10)
    only.update({"rollouts": [[[5, 5], [20, 21, 22, 23]]]})
    assert drafter.outer.root == only.outer.root and drafter.groups.keys() == only.groups.keys()
    drafter.update({"reset": True})
    assert first_draft(drafter, [5, 5], 20) == [] and drafter.history.tokens == 0 and drafter.groups[(5, 5)].history == 0


def test_k_by_running_batch_size():
    drafter = proposer(table=[(1, 2, 3), (3, 8, 0)])
    drafter.update({"rollouts": [[PROMPT, TEXT]]})
    runner = Runner(drafter)
    for _ in range(3):
        runner.admit(PROMPT, 10)
    assert runner.propose() == [[], [], []]  # 3 running: k = 0
    runner.finish(2)
    runner.grow(0, [11])
    runner.grow(1, [11])
    assert runner.propose() == [[12, 13, 14]] * 2
    drafter.update({"k_schedule": [(1, 8, 1)]})
    runner.grow(0, [12])
    runner.grow(1, [12])
    assert runner.propose() == [[13], [13]]


def test_a_row_moved_by_vllm_is_still_the_same_request():
    drafter = proposer()
    runner = Runner(drafter)
    for first in (10, 20, 30):
        runner.admit(PROMPT, first)
    runner.propose()
    third = drafter.lives[2]
    runner.finish(0)  # the first request ends; the one in row 2 moves to row 0
    runner.grow(0, [31])
    runner.grow(1, [21])
    runner.propose()
    assert drafter.lives[0] is third and third.tokens[-2:] == [30, 31] and len(drafter.recent) == 1


def test_a_new_generation_starts_from_pushed_rollouts_and_prompts_only():
    drafter = proposer()
    generate(drafter, PROMPT, [TEXT, TEXT[:5]])  # never pushed
    assert len(drafter.lives) == 2 and len(drafter.groups) == 1
    assert first_draft(drafter, PROMPT) == []  # what the last generation wrote is gone
    assert len(drafter.lives) == 1 and not drafter.recent


class Engine:
    """An engine whose worker serves `drafter`: `update_proposer` as VLLMEngine's, whose
    `llm.collective_rpc(vllm_compat.update_proposer, args)` reaches the worker's proposer."""

    def __init__(self, drafter):
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(drafter=drafter))

    def update_proposer(self, update):
        return vllm_compat.update_proposer(self.worker, update)


def test_a_resumed_drafter_drafts_as_the_uninterrupted_one():
    rng = random.Random(1)
    prompts = [[1, 2, p] for p in range(4)]
    steps = [[[rng.randrange(10, 16) for _ in range(rng.randrange(3, 12))] for _ in range(8)] for _ in range(4)]
    run, serving = SuffixDrafter(SuffixConfig(history_tokens=60), vocab_size=64), proposer(history_tokens=60)
    for completions in steps[:3]:
        metrics = run.on_rollouts(Engine(serving), prompts, completions, [i % 4 for i in range(8)])
    assert metrics["drafter/index_tokens"] == run.history.tokens <= 60 < sum(map(len, sum(steps[:3], [])))
    assert "spec/proposer_ms_per_step" in metrics or serving.stats()["calls"] == 0
    resumed, fresh = SuffixDrafter(SuffixConfig(history_tokens=60), vocab_size=64), proposer(history_tokens=60)
    resumed.load_runtime_state(run.runtime_state(), Engine(fresh))
    assert resumed.history.rows == run.history.rows == serving.history.rows == fresh.history.rows
    assert fresh.groups.keys() == serving.groups.keys() and fresh.outer.root == serving.outer.root
    assert all(fresh.groups[p].index.root == serving.groups[p].index.root for p in fresh.groups)
    drafts = generate(serving, prompts[0], steps[3])
    assert drafts == generate(fresh, prompts[0], steps[3]) and any(d for step in drafts for d in step)


def test_drafting_is_deterministic():
    rng = random.Random(2)
    history = [[[1, 2, rng.randrange(3)], [rng.randrange(10, 14) for _ in range(20)]] for _ in range(12)]
    siblings = [[rng.randrange(10, 14) for _ in range(15)] for _ in range(6)]
    runs = []
    for _ in range(2):
        drafter = proposer()
        drafter.update({"rollouts": history})
        runs.append(generate(drafter, [1, 2, 0], siblings))
    assert runs[0] == runs[1] and sum(len(d) for step in runs[0] for d in step) > 20


def test_the_hook_reaches_only_a_proposer_that_takes_updates():
    class ModelDrafter:  # an EAGLE-style proposer: no `update`
        pass

    assert vllm_compat.update_proposer(SimpleNamespace(model_runner=SimpleNamespace(drafter=ModelDrafter())), {"rollouts": []}) is None
    assert vllm_compat.update_proposer(SimpleNamespace(model_runner=SimpleNamespace()), {}) is None  # no speculation at all
    drafter = proposer()
    worker = SimpleNamespace(model_runner=SimpleNamespace(drafter=drafter))
    assert vllm_compat.update_proposer(worker, {"rollouts": [[PROMPT, TEXT]]}) == {"rollouts": 1, "tokens": 8, "prompts": 1}
    first_draft(drafter, PROMPT)
    stats = vllm_compat.update_proposer(worker, {"stats": "reset"})["stats"]
    assert stats["calls"] == 1 and stats["drafts"] == 1 and stats["draft_tokens"] == 3 and stats["by_batch"][1][0] == 1
    assert vllm_compat.update_proposer(worker, {"stats": True})["stats"]["calls"] == 0


def test_drafter_without_a_vllm_engine_keeps_its_history():
    drafter = SuffixDrafter(SuffixConfig(history_tokens=5), vocab_size=64)
    out = drafter.on_rollouts(object(), [PROMPT], [[1, 2, 3], [4, 5, 6]], [0, 0])
    assert out == {"drafter/index_tokens": 3.0, "drafter/index_rollouts": 1.0}
    assert not drafter.learned and drafter.serving_weights() == {}
