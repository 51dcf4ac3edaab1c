"""Rollouts split over several engines (codraft/rollouts.py): owners, prompt slices, per-request
seeds that do not depend on the split, merged generations and replayed drafter changes."""
import pytest

from codraft.acceptance import AcceptanceStats
from codraft.config import ConfigError
from codraft.distributed import DistState
from codraft.engine import Completion, Generation, Sampling, request_seeds
from codraft.rollouts import CommandLog, RolloutGroup, merge, owners, slices


class SeedEcho:
    """An engine whose completion is the request's seed: shows which seed each request got."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, sampling, seed, seeds=None):
        seeds = seeds if seeds is not None else request_seeds(seed, len(prompts) * n)
        comps = [Completion(i // n, [seeds[i]], [0.0], True) for i in range(len(prompts) * n)]
        return Generation(comps, AcceptanceStats(drafts=len(comps), draft_tokens=3 * len(comps), accepted=len(comps)))

    def set_k_schedule(self, schedule):
        self.calls.append(("set_k_schedule", schedule))

    def load_policy_weights(self, weights):
        self.calls.append(("load_policy_weights", dict(weights)))

    def load_drafter_weights(self, weights):
        if "bad" in weights:
            raise RuntimeError("refused")
        self.calls.append(("load_drafter_weights", weights))


def test_owners_are_equal_groups_of_ranks_and_a_bad_count_is_refused():
    assert owners(8, 1) == [0] and owners(8, 2) == [0, 4] and owners(32, 8) == [0, 4, 8, 12, 16, 20, 24, 28]
    with pytest.raises(ConfigError, match="'rollout.engines' is 3, which does not divide the job's 8 ranks"):
        owners(8, 3)
    with pytest.raises(ConfigError, match="rollout.engines"):
        owners(1, 2)  # one process cannot own two engines


def test_slices_cover_every_prompt_once_in_order():
    for n, e in [(8, 2), (7, 3), (2, 4), (0, 2)]:
        parts = slices(n, e)
        assert len(parts) == e and [i for s in parts for i in s] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_split_generations_merge_into_what_one_engine_returns():
    """Each slice generated with its share of the batch's seeds, merged: the one-engine generation."""
    prompts, n, seed = [[1], [2], [3], [4], [5]], 3, 11
    engine = SeedEcho()
    whole = engine.generate(prompts, n, Sampling(), seed)
    seeds = request_seeds(seed, len(prompts) * n)
    parts = []
    for s in slices(len(prompts), 2):
        gen = engine.generate([prompts[i] for i in s], n, Sampling(), seed, seeds=seeds[s.start * n : s.stop * n])
        parts.append((s.start, gen, 0.5))
    merged = merge(parts[::-1])  # in any order of arrival
    assert [(c.prompt_index, c.token_ids) for c in merged.completions] == [(c.prompt_index, c.token_ids) for c in whole.completions]
    assert merged.acceptance.drafts == whole.acceptance.drafts == 15 and merged.extra["engine_seconds"] == [0.5, 0.5]


def test_the_command_log_records_only_what_changes_the_served_drafter():
    engine = SeedEcho()
    log = CommandLog(engine)
    log.set_k_schedule([(1, 8, 2)])
    log.load_policy_weights({"w": 1}.items())  # every owner loads the policy itself: not replayed
    assert engine.calls[0] == ("set_k_schedule", [(1, 8, 2)]) and len(engine.calls) == 2
    assert log.take() == [("set_k_schedule", ([(1, 8, 2)],), {})] and log.take() == []
    assert log.generate is not None and not hasattr(log, "update_proposer")  # reads pass through; absent stays absent


def test_one_process_with_one_engine_generates_as_the_engine_does():
    engine = SeedEcho()
    group = RolloutGroup(DistState(), engines=1, engine=engine)
    assert group.engine is engine and group.owns_engine
    gen = group.generate([[1], [2]], 2, Sampling(), 5)
    assert [c.token_ids[0] for c in gen.completions] == request_seeds(5, 4)
    group.sync_commands()  # nothing to replay
    group.load_policy_weights({"w": 2})
    assert engine.calls == [("load_policy_weights", {"w": 2})]


def test_replayed_commands_are_host_copies_of_what_succeeded():
    import torch

    engine = SeedEcho()
    log = CommandLog(engine)
    weights = {"w": torch.ones(2)}
    log.load_drafter_weights(weights)
    with pytest.raises(RuntimeError, match="refused"):
        log.load_drafter_weights({"bad": torch.zeros(1)})  # failed here: not replayed on the other engines
    (name, (sent,), _), = log.take()
    assert name == "load_drafter_weights" and sent["w"] is not weights["w"] and sent["w"].device.type == "cpu"
    weights["w"].add_(1)  # the recorded copy is what was loaded, not a view of the trainer's tensor
    assert torch.equal(sent["w"], torch.ones(2))
