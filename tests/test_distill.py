"""Sparse (top-k + tail) teachers against dense ones, and the loss against a reduced draft vocabulary.

Sparse losses and acceptance must equal the dense computation when the top-k covers the whole
vocabulary, and stay within the stated bounds of it for a truncated teacher:
    fkl_dense - fkl_sparse = m KL(p_tail / m || q_tail / q_m)   (>= 0)
    |tv_dense - tv_sparse| <= m,   alpha_dense - m <= alpha_sparse <= alpha_dense   (m: the tail mass)
"""
import math

import pytest
import torch

from codraft.distill import (
    AUTO_TOP_K, Teacher, acceptance_terms, collate, distill, distill_loss, distill_terms, examples_from_forward, resolve_top_k, teacher_forced_alpha,
    teacher_logprobs, teacher_record,
)
from codraft.drafter import DRAFTERS, Features, target_parts
from codraft.warmstart import record_examples
from tests_helpers import counting_pairs, taught_policy, tiny_policy

N, V = 12, 50


def case(seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(sharp * torch.randn(N, V, generator=g), -1)  # the teacher, exact
    q_logits = (sharp * torch.randn(N, V, generator=g)).requires_grad_(True)
    nxt = torch.randint(0, V, (N,), generator=g)
    return logp, q_logits, nxt


def sparse_of(logp: torch.Tensor, k: int) -> Teacher:
    values, ids = logp.topk(k, dim=-1)
    tail = (1 - values.exp().sum(-1)).clamp(min=0) if k < logp.shape[-1] else torch.zeros(len(logp))
    return Teacher(values, ids, tail)


def test_automatic_top_k_is_dense_on_small_vocabularies():
    assert resolve_top_k(-1, 384) == 0  # the testbed keeps today's dense teachers
    assert resolve_top_k(-1, 151936) == AUTO_TOP_K
    assert resolve_top_k(0, 151936) == 0 and resolve_top_k(16, 151936) == 16 and resolve_top_k(500, 384) == 0
    from codraft.config import ConfigError, ControllerConfig
    from codraft.configfile import load_config

    assert ControllerConfig().teacher_top_k == -1
    with pytest.raises(ConfigError, match="controller.teacher_top_k"):
        load_config("smoke", overrides=["controller.teacher_top_k=-2"])


@pytest.mark.parametrize("kind", ["fkl", "rkl", "tv", "ce"])
@pytest.mark.parametrize("reduced", [False, True])
def test_sparse_equals_dense_when_the_top_k_covers_the_vocabulary(kind, reduced):
    logp, q_logits, nxt = case()
    if reduced:  # a drafter over 30 of the 50 tokens (EAGLE-3 draft_vocab_size): -inf elsewhere
        off = torch.zeros(V, dtype=torch.bool)
        off[torch.randperm(V, generator=torch.Generator().manual_seed(1))[:20]] = True
        q_logits = q_logits.detach().masked_fill(off, float("-inf")).requires_grad_(True)
    dense, mass_d = distill_terms(q_logits, Teacher(logp), nxt, kind)
    (grad_d,) = torch.autograd.grad(dense.sum(), q_logits)
    sparse, mass_s = distill_terms(q_logits, sparse_of(logp, V), nxt, kind)
    (grad_s,) = torch.autograd.grad(sparse.sum(), q_logits)
    assert torch.allclose(dense, sparse, atol=1e-5), (dense - sparse).abs().max()
    assert torch.isfinite(grad_s).all() and torch.allclose(grad_d, grad_s, atol=1e-5)
    assert (mass_d is None) == (mass_s is None) == (not reduced)
    if reduced:
        assert torch.allclose(mass_d, mass_s, atol=1e-6)
    for a, b in zip(acceptance_terms(q_logits.detach(), Teacher(logp)), acceptance_terms(q_logits.detach(), sparse_of(logp, V))):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_truncated_teacher_stays_within_the_bounds(k):
    logp, q_logits, nxt = case(seed=k, sharp=2.0)
    q_logits = q_logits.detach()
    teacher = sparse_of(logp, k)
    m = teacher.tail  # [N]
    fkl_d, fkl_s = distill_loss(q_logits, logp, nxt, "fkl"), distill_loss(q_logits, teacher.logp, nxt, "fkl", teacher.ids, teacher.tail)
    tail = torch.ones(N, V, dtype=torch.bool).scatter(-1, teacher.ids, False)
    p, q = logp.exp(), torch.softmax(q_logits, -1)
    p_t, q_t = torch.where(tail, p, 0), torch.where(tail, q, 0)
    q_m = q_t.sum(-1)
    kl_tail = torch.where(tail, p_t / m[:, None] * ((p_t / m[:, None]).log() - (q_t / q_m[:, None]).log()), 0).sum(-1)
    assert (fkl_d - fkl_s >= -1e-5).all()
    assert torch.allclose(fkl_d - fkl_s, m * kl_tail, atol=1e-4)
    tv_d, tv_s = distill_loss(q_logits, logp, nxt, "tv"), distill_loss(q_logits, teacher.logp, nxt, "tv", teacher.ids, teacher.tail)
    assert ((tv_d - tv_s).abs() <= m + 1e-6).all()
    ce_d, ce_s = distill_loss(q_logits, logp, nxt, "ce"), distill_loss(q_logits, teacher.logp, nxt, "ce", teacher.ids, teacher.tail)
    assert torch.allclose(ce_d, ce_s, atol=1e-5)  # hard labels need no teacher
    for dense, sparse in zip(acceptance_terms(q_logits, Teacher(logp))[:2], acceptance_terms(q_logits, teacher)[:2]):
        assert (sparse <= dense + 1e-6).all() and (sparse >= dense - m - 1e-6).all()


def test_reduced_vocabulary_loss_is_the_divergence_to_the_renormalised_teacher():
    """Before the fix the loss carried 1e4 x the teacher's off-vocabulary mass: a drafter equal to
    the best it can be (the teacher renormalised on its vocabulary) reported a loss in the hundreds."""
    logp, _, nxt = case(seed=3, sharp=1.0)
    on = torch.zeros(V, dtype=torch.bool)
    on[:35] = True
    best = torch.where(on, logp, float("-inf"))  # q = p restricted to the draft vocabulary, renormalised by softmax
    for kind in ("fkl", "rkl", "tv"):
        for teacher in (Teacher(logp), sparse_of(logp, V)):
            loss, mass = distill_terms(best, teacher, nxt, kind)
            assert loss.abs().max() < 1e-4, (kind, loss)
            assert ((mass > 0) & (mass < 1)).all()
        truncated = sparse_of(logp, 45)  # its tail counts as inside the draft vocabulary: small, not 0
        assert (distill_terms(best, truncated, nxt, kind)[0] <= truncated.tail).all()
    p_off = (logp.exp() * ~on).sum(-1)
    worse = torch.where(on, torch.randn(N, V), float("-inf"))
    assert (distill_loss(worse, logp, nxt, "fkl") > 1e-3).all() and (distill_loss(worse, logp, nxt, "fkl") < 20).all()
    _, _, off = acceptance_terms(best, Teacher(logp))
    assert torch.allclose(off, p_off, atol=1e-6)
    broken = best.clone()
    broken[0, :5] = float("nan")  # a diverged drafter is not "off its vocabulary": its loss must be non-finite
    for teacher in (Teacher(logp), sparse_of(logp, 20)):
        assert not torch.isfinite(distill_terms(broken, teacher, nxt, "fkl")[0][0])


def test_collate_keeps_sparse_teachers_sparse_and_examples_in_host_memory():
    policy = tiny_policy()
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config())
    pairs = [([1, 2, 3 + i], list(range(4 + i, 14 + i))) for i in range(6)]
    examples = record_examples(policy, pairs, drafter, 0, top_k=8)
    assert all(e.teacher.shape[-1] == 8 and e.teacher_ids.dtype == torch.int32 and e.teacher.device.type == "cpu" for e in examples)
    kept = examples[0].teacher.float().exp().sum(-1)
    assert torch.allclose(kept + examples[0].teacher_tail, torch.ones_like(kept), atol=2e-2)
    batch = collate(examples, policy.config.vocab_size)
    assert batch.teacher.logp.shape == (6, batch.feats.input_ids.shape[1], 8) and batch.teacher.tail.shape == batch.target_mask.shape
    mass = teacher_record(examples)["drafter/teacher_mass"]
    assert 0 < mass <= 1
    dense = record_examples(policy, pairs, drafter, 0)
    assert teacher_record(dense) == {} and collate(dense, policy.config.vocab_size).teacher.logp.shape[-1] == policy.config.vocab_size
    assert dense[0].nbytes() > examples[0].nbytes()


def test_examples_from_forward_resolves_the_automatic_setting():
    B, T, H = 2, 5, 8
    feats = Features(torch.ones(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long), torch.randn(B, T, 3 * H), None)
    small = examples_from_forward(feats, torch.ones(B, T, dtype=torch.long), torch.randn(B, T, 384), top_k=-1)
    assert small[0].teacher_ids is None and small[0].teacher.shape == (T, 384)
    large = examples_from_forward(feats, torch.ones(B, T, dtype=torch.long), torch.randn(B, T, 5000), top_k=-1)
    assert large[0].teacher.shape == (T, AUTO_TOP_K) and large[0].teacher_tail.shape == (T,)
    logp = torch.log_softmax(torch.randn(3, 5000), -1)
    values, ids, tail = teacher_logprobs(logp, 64)
    assert torch.allclose(tail, 1 - logp.exp().topk(64, -1).values.sum(-1), atol=1e-5)


@pytest.fixture(scope="module")
def taught():
    """A tiny policy taught to count up (as in test_drafters), and its training pairs."""
    pairs = counting_pairs()
    return taught_policy(pairs), pairs


def test_distillation_on_sparse_teachers_raises_acceptance(taught):
    policy, pairs = taught
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config())
    examples = record_examples(policy, pairs, drafter, 0, top_k=6)
    parts, vocab = target_parts(policy), policy.config.vocab_size
    before = teacher_forced_alpha(drafter, examples[40:], parts, 3, vocab)
    stats = distill(drafter, examples[:40], parts, steps=40, k=3, loss="fkl", lr=3e-3, batch_size=16, vocab=vocab, autocast=False)
    after = teacher_forced_alpha(drafter, examples[40:], parts, 3, vocab)
    assert stats.loss_last < stats.loss_first and after.accept_len_prob > before.accept_len_prob + 0.3
    assert math.isnan(after.off_support)


def test_reduced_draft_vocabulary_reports_a_meaningful_loss(taught):
    policy, pairs = taught
    counts = torch.zeros(policy.config.vocab_size)
    counts[:24] = torch.arange(24, 0, -1).float()  # tokens 0..23 in the draft vocabulary, the counting runs past it
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config(draft_vocab_size=24), token_counts=counts)
    examples = record_examples(policy, pairs, drafter, 0)
    parts, vocab = target_parts(policy), policy.config.vocab_size
    stats = distill(drafter, examples, parts, steps=30, k=3, loss="fkl", lr=3e-3, batch_size=16, vocab=vocab, autocast=False)
    assert stats.loss_last < stats.loss_first < 20  # was ~1e4 x the off-vocabulary mass
    alpha = teacher_forced_alpha(drafter, examples, parts, 3, vocab)
    record = teacher_record(examples, alpha)
    assert 0.05 < record["drafter/teacher_off_vocab"] < 0.95
    assert "drafter/teacher_mass" not in record  # dense teachers


def test_distillation_trains_when_called_under_no_grad(taught):
    """A caller in a no-grad context (a test decorated with torch.no_grad that warm-starts a drafter)
    still gets a trained drafter: distill enables gradients itself (it raised 'element 0 of tensors
    does not require grad' before)."""
    policy, pairs = taught
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config())
    examples = record_examples(policy, pairs, drafter, 0)
    parts, vocab = target_parts(policy), policy.config.vocab_size
    with torch.no_grad():
        stats = distill(drafter, examples, parts, steps=10, k=3, loss="fkl", lr=3e-3, batch_size=16, vocab=vocab, autocast=False)
        assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert stats.steps == 10 and stats.loss_last < stats.loss_first
