"""The hybrid drafter's mixer (drafters/hybrid.py) without vLLM: which source drafts each row, the
evidence it keeps (the chosen draft's accepted tokens, the other's counterfactual match), padding of
a shorter suffix draft, the runner's rows read as after bookkeeping, decay and restore of the
evidence, and `set_drafting` putting the mixer back. vLLM serving it: tests/integration/test_speculative.py."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from codraft import vllm_compat
from codraft.configfile import to_dict
from drafters.hybrid import DraftMixer, HybridConfig, _new_tokens, _WithNew, mix_metrics

K = 3


def vllm_config(**mixer):
    settings = to_dict(HybridConfig(**mixer))
    hf = SimpleNamespace(codraft_mixer={"class": "drafters.hybrid.DraftMixer", **settings}, codraft_suffix=settings["suffix"])
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=K, num_speculative_tokens_per_batch_size=None, draft_sample_method="greedy"),
        model_config=SimpleNamespace(hf_config=hf, max_model_len=64),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
    )


class Runner:
    """The parts of vLLM's model runner the mixer reads: rows of tokens before this step's are written."""

    def __init__(self, rows: dict[str, list[int]]):
        self.req_ids = list(rows)
        ids = np.zeros((8, 64), dtype=np.int32)
        for i, tokens in enumerate(rows.values()):
            ids[i, : len(tokens)] = tokens
        self.input_batch = SimpleNamespace(req_ids=self.req_ids, num_reqs=len(rows), num_tokens_no_spec=np.array([len(t) for t in rows.values()] + [0] * (8 - len(rows))), token_ids_cpu=ids)
        self.discard_request_mask = SimpleNamespace(np=np.zeros(8, dtype=bool))

    def step(self, new: list[list[int]]) -> None:  # vLLM's bookkeeping after the proposal
        batch = self.input_batch
        for i, tokens in enumerate(new):
            n = batch.num_tokens_no_spec[i]
            batch.token_ids_cpu[i, n : n + len(tokens)] = tokens
            batch.num_tokens_no_spec[i] = n + len(tokens)


def sampled(rows: list[list[int]]) -> torch.Tensor:
    """vLLM's padded sampled tokens: -1 where a draft was rejected."""
    return torch.tensor([r + [-1] * (K + 1 - len(r)) for r in rows])


def metadata(verified: list[int]):
    return SimpleNamespace(num_draft_tokens=verified)


def fixed_suffix(mixer: DraftMixer, drafts: list[list[int]], prob: float = 1.0) -> None:
    def propose(new, lengths, ids):
        mixer.suffix.draft_probs = [prob] * len(drafts)
        return [list(d) for d in drafts]

    mixer.suffix.propose = propose


def test_evidence_counts_the_chosen_drafts_accepted_tokens_and_the_others_match():
    mixer, runner = DraftMixer(vllm_config()), Runner({"a": [1, 2, 3]})
    fixed_suffix(mixer, [[5, 8]])
    out = mixer.mix(torch.tensor([[5, 6, 7]]), sampled([[10]]), runner, None)  # after the prefill: no evidence yet
    assert out.tolist() == [[5, 6, 7]]  # priors: 3 learned tokens expected to beat 2 suffix ones
    runner.step([[10]])
    mixer.mix(torch.tensor([[4, 4, 4]]), sampled([[5, 6, 9]]), runner, metadata([3]))  # 2 of the learned draft accepted
    assert mixer.counts["learned"] == [1, 3, 2, 2] and mixer.counts["suffix"] == [0, 0, 0, 1] and mixer.rows == 1
    assert mixer.evidence["learned"][3][0] == [1.0, 2.0] and mixer.evidence["suffix"][2][3] == [1.0, 1.0]  # probability 1: the top bin
    metrics = mix_metrics(mixer.update({"stats": True})["mix"])
    assert metrics["spec/learned/share"] == 1.0 and metrics["spec/learned/accept_len"] == 3.0
    assert metrics["spec/learned/alone_accept_len"] == 3.0 and metrics["spec/suffix/alone_accept_len"] == 2.0


def test_confidence_bins_keep_evidence_apart():
    mixer, runner = DraftMixer(vllm_config()), Runner({"a": [1]})
    mixer.evidence["suffix"][K][0] = [100.0, 0.0]  # unsure suffix drafts were never right
    mixer.evidence["suffix"][K][3] = [100.0, 300.0]  # confident ones always
    fixed_suffix(mixer, [[3, 3, 3]], prob=0.3)
    assert mixer.mix(torch.tensor([[7, 7, 7]]), sampled([[0]]), runner, None).tolist() == [[7, 7, 7]]
    fixed_suffix(mixer, [[3, 3, 3]], prob=0.99)
    assert mixer.mix(torch.tensor([[7, 7, 7]]), sampled([[0]]), runner, None).tolist() == [[3, 3, 3]]


def test_the_source_with_more_expected_accepted_tokens_drafts_and_a_short_suffix_draft_is_padded():
    mixer, runner = DraftMixer(vllm_config()), Runner({"a": [1], "b": [2]})
    fixed_suffix(mixer, [[1, 2, 3], [1, 2]])
    choices = []
    new = [[0], [0]]
    for step in range(6):  # the learned drafter is always wrong, the suffix always right
        out = mixer.mix(torch.tensor([[7, 7, 7], [7, 7, 7]]), sampled(new), runner, metadata([K, K]) if step else None)
        choices.append(out.tolist())
        runner.step(new)
        new = [[1, 2, 3, 4], [1, 2, 9]]
    assert choices[0] == [[7, 7, 7], [7, 7, 7]]  # no evidence: the longer learned draft
    assert choices[-1] == [[1, 2, 3], [1, 2, 7]]  # the suffix drafts both rows; the short one keeps the learned tail
    assert mixer.counts["suffix"][0] > 0 and mixer.counts["learned"][2] == 0


def test_rows_without_a_suffix_draft_keep_the_learned_one_and_lists_pass_through():
    mixer, runner = DraftMixer(vllm_config()), Runner({"a": [1], "b": [2]})
    fixed_suffix(mixer, [[], [3, 3, 3, 3]])
    mixer.evidence["suffix"][K][3] = [100.0, 300.0]  # a confident suffix draft is always right
    assert mixer.mix([[7, 7], [7, 7]], [[0], [0]], runner, None) == [[7, 7], [3, 3, 3]]  # lists (unpadded batch): up to k
    assert mixer.mix(torch.zeros(2, 0, dtype=torch.int64), sampled([[0], [0]]), runner, None).shape == (2, 0)  # k = 0: nothing


def test_discarded_rows_give_no_tokens_and_the_rows_read_as_after_bookkeeping():
    assert _new_tokens(sampled([[4, 5], [6]]), 2, np.array([False, True])) == [[4, 5], []]
    ids = np.array([[1, 2, 3, 0, 0]])
    view = _WithNew(ids, np.array([3]), [[8, 9]])
    assert view[0, 1] == 2 and view[0, 3] == 8 and view[0, 4] == 9
    assert view[0, :5].tolist() == [1, 2, 3, 8, 9] and view[0, :4].tolist() == [1, 2, 3, 8]


def test_real_index_drafts_from_the_prompt_through_the_pending_rows():
    mixer = DraftMixer(vllm_config(suffix={"max_match": 3, "tokens_per_match": 0.0}))
    mixer.evidence["suffix"][K][3] = [100.0, 300.0]
    prompt = [5, 6, 7, 8, 5, 6]
    runner = Runner({"a": prompt})
    out = mixer.mix(torch.tensor([[1, 1, 1]]), sampled([[7]]), runner, None)  # the engine just sampled 7 after "5 6"
    assert out.tolist() == [[8, 5, 6]]  # the prompt continues "5 6 7" with "8 5 6"


def test_stats_reset_decays_the_evidence_and_a_push_restores_it():
    mixer = DraftMixer(vllm_config(memory=0.5))
    mixer.evidence["learned"][K][0] = [4.0, 6.0]
    reply = mixer.update({"stats": "reset"})
    assert reply["evidence"]["learned"][K][0] == [2.0, 3.0] and mixer.rows == 0
    other = DraftMixer(vllm_config())
    other.update({"reset": True, "evidence": reply["evidence"]})
    assert other.evidence == mixer.evidence
    other.update({"reset": True})
    assert other.evidence["learned"][K][0] == [0.0, 0.0]


def test_config_refuses_a_learned_kind_that_learns_nothing_and_bad_numbers():
    from codraft.config import ConfigError
    from codraft.drafter import DRAFTERS
    from codraft.plugins import plugin_settings

    for args, key in (({"learned": "suffix"}, "drafter.args.learned"), ({"memory": 0.0}, "drafter.args.memory"), ({"suffix": {"min_match": 0}}, "drafter.args.suffix.min_match")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            plugin_settings(DRAFTERS, "hybrid", args, "drafter.args.")


def test_set_drafting_puts_the_mixer_back():
    class FakeRunner:
        def propose_draft_token_ids(self, *args):
            return "vllm"

    runner = FakeRunner()
    runner.drafter, runner.device = object(), "cpu"
    runner.input_batch = SimpleNamespace(num_reqs=2)
    runner.propose_draft_token_ids = lambda *a: "mixed"
    worker = SimpleNamespace(model_runner=runner)
    assert vllm_compat.set_drafting(worker, False) and runner.propose_draft_token_ids().shape == (2, 0)
    assert vllm_compat.set_drafting(worker, False)  # twice off, still the mixer to come back
    assert vllm_compat.set_drafting(worker, True) and runner.propose_draft_token_ids() == "mixed"
    plain = FakeRunner()
    plain.drafter, plain.device, plain.input_batch = object(), "cpu", SimpleNamespace(num_reqs=1)
    worker = SimpleNamespace(model_runner=plain)
    assert vllm_compat.set_drafting(worker, False) and vllm_compat.set_drafting(worker, True) and plain.propose_draft_token_ids() == "vllm"


def test_suffix_first_refreshes_only_when_the_mix_cannot_cover_for_a_stale_learned_part():
    import math

    from codraft.refresh import Observation, make_refresh_policy

    def obs(step, since, mixed, learned):
        drafts = 1000
        return Observation(step=step, drafts=drafts, draft_tokens=K * drafts, accepted=round((mixed - 1) * drafts), k=K, steps_since_refresh=since, learned_alone_accept_len=learned)

    policy = make_refresh_policy("suffix_first", {"drop": 0.2, "ema": 1.0, "min_interval": 1})
    trace = [(3.0, 3.0), (3.0, 2.2), (2.9, 2.0), (2.2, 2.0)]  # level 3.0, floor 2.4: stale from step 1; the mix drops at step 3
    decisions = []
    for step, (mixed, learned) in enumerate(trace):
        policy.observe(obs(step, step, mixed, learned))
        decisions.append(policy.decide())
    assert [d.refresh for d in decisions] == [False, False, False, True]
    assert "mix covers" in decisions[1].reason and "both below" in decisions[3].reason
    plain = make_refresh_policy("suffix_first", {"drop": 0.2, "ema": 1.0, "min_interval": 1})  # no learned-alone signal: acceptance length
    for step, accept_len in enumerate([3.0, 2.2]):
        plain.observe(obs(step, step, accept_len, math.nan))
    assert plain.decide().refresh


def test_a_resumed_hybrid_restores_the_index_and_the_evidence():
    from codraft.drafter import DRAFTERS
    from codraft.plugins import plugin_settings
    from tests_helpers import tiny_policy

    class Engine:  # VLLMEngine.update_proposer reaches the worker's mixer the same way
        def __init__(self, mixer):
            self.worker = SimpleNamespace(model_runner=SimpleNamespace(_codraft_mixer=mixer, drafter=None))

        def update_proposer(self, update):
            return vllm_compat.update_proposer(self.worker, update)

    cls, settings = plugin_settings(DRAFTERS, "hybrid", {"suffix": {"history_tokens": 40}}, "drafter.args.")
    policy = tiny_policy()
    run, serving = cls.build(policy, settings), DraftMixer(vllm_config(suffix={"history_tokens": 40}))
    serving.evidence["suffix"][K][3] = [8.0, 20.0]
    prompts = [[1, 2, 3], [1, 2, 4]]
    for step in range(3):
        metrics = run.on_rollouts(Engine(serving), prompts, [[5 + step] * 9, [7] * (4 + step)], [0, 1])
    assert metrics["drafter/index_tokens"] == run.history.tokens <= 40 and run.evidence == serving.evidence
    assert serving.evidence["suffix"][K][3] == [1.0, 2.5]  # halved at each of the three steps
    resumed, fresh = cls.build(policy, settings), DraftMixer(vllm_config(suffix={"history_tokens": 40}))
    resumed.load_runtime_state(run.runtime_state(), Engine(fresh))
    assert fresh.evidence == serving.evidence and fresh.suffix.history.rows == serving.suffix.history.rows == resumed.history.rows
    assert fresh.suffix.groups.keys() == serving.suffix.groups.keys()
