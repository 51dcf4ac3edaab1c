"""The cost model: the Leviathan et al. closed form and its inverse, batch-time predictions computed
by hand, online calibration recovering known parameters, and the choice of k."""
import json
import math
import random

import pytest
from dataclasses import astuple

from codraft.costmodel import (
    CostModel,
    CostModelConfig,
    StepCosts,
    alpha_from_accept_len,
    batch_profile,
    k_at,
    tokens_per_verify,
)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_tokens_per_verify_is_the_geometric_sum(alpha, k):
    assert tokens_per_verify(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)))
    assert tokens_per_verify(alpha, k) == pytest.approx((1 - alpha ** (k + 1)) / (1 - alpha))


def test_tokens_per_verify_edges():
    assert tokens_per_verify(0.0, 3) == 1.0  # nothing accepted: the target's own token only
    assert tokens_per_verify(1.0, 3) == 4.0  # everything accepted: k + 1
    assert tokens_per_verify(0.9, 0) == 1.0  # plain decoding
    assert tokens_per_verify(1.0 - 1e-12, 3) == pytest.approx(4.0)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3, 0.62, 0.9, 0.999])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_alpha_from_accept_len_inverts_tokens_per_verify(alpha, k):
    assert alpha_from_accept_len(tokens_per_verify(alpha, k), k) == pytest.approx(alpha, abs=1e-9)


def test_alpha_from_accept_len_clamps_and_propagates_nan():
    assert alpha_from_accept_len(0.7, 3) == 0.0
    assert alpha_from_accept_len(4.5, 3) == 1.0
    assert math.isnan(alpha_from_accept_len(math.nan, 3))
    assert math.isnan(alpha_from_accept_len(2.0, 0))  # no drafting: alpha not identifiable


def test_k_schedule_lookup():
    schedule = ((1, 8, 3), (9, 64, 1))
    assert [k_at(schedule, b) for b in (1, 8, 9, 64, 65)] == [3, 3, 1, 1, 0]
    assert k_at(2, 1000) == 2


def test_prediction_matches_hand_computation_plain_decoding():
    # lengths 2, 4, 6 at k = 0: steps 1-2 run 3 sequences, steps 3-4 run 2, steps 5-6 run 1.
    costs = StepCosts(t0=0.01, t1=0.002, d0=0.005, d1=0.001)
    model = CostModel()
    model.costs = costs
    by_hand = 2 * (0.01 + 0.002 * 3) + 2 * (0.01 + 0.002 * 2) + 2 * (0.01 + 0.002 * 1)
    assert model.predict_gen_s([2, 4, 6], alpha=0.0, k_schedule=0) == pytest.approx(by_hand)
    assert batch_profile([6, 2, 4], 0.0, 0) == (6, 12, 0, 0, 0, 0)
    # alpha = 0 with k = 2 drafts but gains nothing: same steps, each dearer by the verify and 2 draft steps.
    spec = sum(2 * costs.step_s(b, 2) for b in (3, 2, 1))
    assert model.predict_gen_s([2, 4, 6], alpha=0.0, k_schedule=2) == pytest.approx(spec)


def test_drafting_pays_its_fixed_terms_on_drafting_steps_only():
    model = CostModel()
    model.costs = StepCosts(t0=0.01, t1=0.002, d0=0.005, d1=0.001, s0=0.004, s1=0.0005)
    assert model.step_s(3, 2) == pytest.approx(0.01 + 0.002 * 9 + 2 * (0.005 + 0.003) + 0.004 + 0.0015)
    assert model.step_s(3, 0) == pytest.approx(0.01 + 0.002 * 3)  # k = 0: plain decoding
    assert model.speedup(0.0, 1, 1) == pytest.approx((0.01 + 0.002) / (0.01 + 0.004 + 0.006 + 0.004 + 0.0005))
    # lengths 2, 4, 6, alpha 0, k = 1 only at batch 1: 2 k = 0 steps at b = 3, 2 at b = 2, then 2
    # drafting steps at b = 1 verifying 2 tokens each -> s0 twice, s1 on 2 sequence-steps. The
    # drafter runs once in each k = 0 step too (6 sequence-steps) and once in each drafting step.
    assert batch_profile([2, 4, 6], 0.0, ((1, 1, 1),)) == (6, 14, 6, 12, 2, 2)
    # 0 everywhere: the drafter is off, plain decoding
    assert batch_profile([2, 4, 6], 0.0, ((1, 256, 0),)) == batch_profile([2, 4, 6], 0.0, 0) == (6, 12, 0, 0, 0, 0)


def test_prediction_with_full_acceptance_and_a_schedule():
    # alpha = 1, k = 1 at batch <= 2: 2 tokens per step there; batch 3 decodes plainly (uncovered).
    model = CostModel()
    schedule = ((1, 2, 1),)
    # lengths 2, 4, 6: 2 k = 0 steps at b=3 (the drafter still runs once in each) -> remaining 2, 4
    # -> 1 step at b=2 (2 tokens each) -> 2 -> 1 step at b=1
    c = model.costs
    by_hand = 2 * (model.step_s(3, 0) + c.d0 + 3 * c.d1) + model.step_s(2, 1) + model.step_s(1, 1)
    assert model.predict_gen_s([2, 4, 6], alpha=1.0, k_schedule=schedule) == pytest.approx(by_hand)


def test_more_acceptance_predicts_less_time():
    model = CostModel()
    lengths = [50, 120, 80, 192, 30]
    times = [model.predict_gen_s(lengths, a, 3) for a in (0.2, 0.5, 0.8, 0.95)]
    assert times == sorted(times, reverse=True)


def _synthetic_batches(true: CostModel, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        lengths = [rng.randint(4, 160) for _ in range(rng.choice([4, 16, 64]))]
        alpha = rng.uniform(0.1, 0.95)
        speculative = rng.random() < 0.7
        schedule = rng.choice([3, 1, ((1, 8, 3), (9, 256, 0)), ((1, 16, 2), (17, 256, 1))])
        gen_s = true.predict_gen_s(lengths, alpha, schedule if speculative else 0)
        yield lengths, alpha, schedule, gen_s, speculative


def test_calibration_recovers_known_parameters():
    true = CostModel()
    true.costs = StepCosts(t0=3e-3, t1=1e-4, d0=1.5e-3, d1=1e-5, s0=4e-3, s1=5e-5)
    model = CostModel(CostModelConfig(window=64))  # priors differ from the truth
    for lengths, alpha, schedule, gen_s, speculative in _synthetic_batches(true, 40, seed=0):
        model.observe(lengths, alpha, schedule, gen_s, speculative)
    for name in ("t0", "t1", "d0", "d1", "s0", "s1"):
        assert getattr(model.costs, name) == pytest.approx(getattr(true.costs, name), rel=0.02), name


def test_calibration_keeps_priors_where_data_says_nothing():
    model = CostModel()
    assert model.costs == model.prior
    true = CostModel()
    true.costs = StepCosts(t0=8e-3, t1=3e-4, d0=2e-3, d1=2e-5)
    for lengths, alpha, schedule, gen_s, _ in _synthetic_batches(true, 10, seed=1):
        model.observe(lengths, alpha, schedule, true.predict_gen_s(lengths, 0.0, 0), speculative=False)
    assert model.costs.t0 == pytest.approx(8e-3, rel=0.02)  # plain decoding pins the target's costs
    assert model.costs.t1 == pytest.approx(3e-4, rel=0.02)
    assert model.costs.d0 == pytest.approx(model.prior.d0)  # ... and leaves the drafter's at the priors
    assert model.costs.d1 == pytest.approx(model.prior.d1)
    assert (model.costs.s0, model.costs.s1) == pytest.approx((model.prior.s0, model.prior.s1))


def test_calibration_never_goes_negative():
    model = CostModel()
    model.observe([10, 10], 0.5, 3, gen_seconds=1e-6, speculative=True)  # absurdly fast batch
    assert min(astuple(model.costs)) >= 0


def test_state_dict_round_trips():
    model = CostModel()
    model.observe([10, 40, 90], 0.7, ((1, 2, 3), (3, 256, 0)), 0.8, speculative=True)
    restored = CostModel()
    restored.load_state_dict(json.loads(json.dumps(model.state_dict())))
    assert restored.costs == model.costs and restored.records == model.records
    restored.observe([5, 7], 0.3, 1, 0.05, speculative=True)
    model.observe([5, 7], 0.3, 1, 0.05, speculative=True)
    assert restored.costs == model.costs


def test_state_saved_before_the_speculative_terms_loads_with_their_priors():
    model = CostModel()
    model.load_state_dict({"costs": [3e-3, 1e-4, 1.5e-3, 1e-5], "records": [[1.0, 2.0, 3.0, 4.0, 0.5]]})
    assert model.costs == StepCosts(3e-3, 1e-4, 1.5e-3, 1e-5, model.prior.s0, model.prior.s1)
    assert model.records == []  # rows without the new columns would bias the next fit


def test_best_k_drafts_at_small_batch_with_high_acceptance_and_not_when_compute_bound():
    model = CostModel()
    assert model.best_k(0.9, 1) > 0
    assert model.best_k(0.9, 256) == 0  # verifying k+1 tokens per sequence costs ~k+1 target steps
    assert model.best_k(0.0, 1) == 0  # nothing accepted: drafting is pure overhead
    assert model.best_k(0.999, 1, ks=(0, 1, 2, 3, 5)) == 5


def test_best_k_is_plain_decoding_when_drafting_is_expensive():
    model = CostModel(CostModelConfig(d0=5e-3, d1=2e-4))  # drafter step as dear as the target's
    assert model.best_k(0.8, 1) == 0
    assert model.speedup(0.8, 3, 1) < 1


def test_best_k_schedule_covers_every_batch_size_with_k_falling_as_batch_grows():
    model = CostModel()
    schedule = model.best_k_schedule(0.9, range(1, 257))
    assert schedule[0][0] == 1 and schedule[-1][1] == 256
    assert all(a[1] + 1 == b[0] for a, b in zip(schedule, schedule[1:]))  # contiguous, no overlap
    ks = [k_at(schedule, b) for b in range(1, 257)]
    assert ks == sorted(ks, reverse=True) and ks[0] > 0 and ks[-1] == 0
    # each size takes the k with the least time per token on an engine whose drafter is on
    for b in (1, 5, 17, 64, 256):
        per_token = {k: model._drafting_engine_time_per_token(0.9, k, b) for k in (0, 1, 2, 3, 5)}
        assert per_token[k_at(schedule, b)] == min(per_token.values())


def test_best_k_schedule_turns_the_drafter_off_when_the_crowded_start_costs_more_than_the_tail_saves():
    model = CostModel()
    model.costs = StepCosts(t0=0.01, t1=1e-3, d0=0.004, d1=1e-4, s0=0.001, s1=1e-5)
    tail = model.best_k_schedule(0.9, range(1, 129), ks=(0, 3))
    assert k_at(tail, 1) == 3 and k_at(tail, 128) == 0  # drafting pays only at small batch sizes
    never = ((1, 128, 0),)
    # 128 sequences of equal length: no tail, the drafter's k = 0 passes are pure cost
    crowded = [40] * 128
    assert model.predict_gen_s(crowded, 0.9, tail) > model.predict_gen_s(crowded, 0.9, never)
    assert model.best_k_schedule(0.9, range(1, 129), ks=(0, 3), lengths=crowded) == never
    # a long tail: a few sequences run on for hundreds of steps after the rest finish
    long_tail = [20] * 124 + [400] * 4
    assert model.predict_gen_s(long_tail, 0.9, tail) < model.predict_gen_s(long_tail, 0.9, never)
    assert model.best_k_schedule(0.9, range(1, 129), ks=(0, 3), lengths=long_tail) == tail


def test_speedup_matches_leviathan_when_verify_costs_one_step():
    # no per-token target compute: a verify of k+1 tokens costs one step, so speedup = E / (1 + k c)
    model = CostModel()
    model.costs = StepCosts(t0=1.0, t1=0.0, d0=0.25, d1=0.0)
    assert model.speedup(0.8, 3, 8) == pytest.approx(tokens_per_verify(0.8, 3) / (1 + 3 * 0.25))
