"""Drafter contract, run over every registered kind: shapes, checkpoint round trip, fit checks,
distillation that raises teacher-forced acceptance, and clear errors on checkpoints that do not fit."""
import json

import pytest
import torch

from codraft.config import DrafterConfig
from codraft.distill import distill, distill_loss, teacher_forced_alpha
from codraft.drafter import DRAFTERS, DrafterMismatch, load_drafter, target_parts
from codraft.warmstart import record_examples
from tests_helpers import tiny_policy

KINDS = DRAFTERS.names()


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(0)
    # a deterministic pattern the policy can be taught: completion counts up from the prompt's last token
    out = []
    for i in range(48):
        start = int(torch.randint(3, 20, (1,), generator=g))
        out.append(([1, 2, start], [start + j for j in range(1, 12)]))
    return out


@pytest.fixture(scope="module")
def taught_policy(pairs):
    """A policy trained briefly on the counting pattern, so that it has something to distil."""
    from codraft.batch import make_batch, token_logprobs

    model = tiny_policy().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = make_batch([p for p, _ in pairs], [c for _, c in pairs], 0)
    for _ in range(60):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        loss = -(token_logprobs(logits, batch.targets) * batch.target_mask).sum() / batch.target_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_unroll_shapes(kind, policy, pairs):
    drafter = DRAFTERS.get(kind).build(policy, DrafterConfig(kind=kind))
    examples = record_examples(policy, pairs[:4], drafter, pad_id=0)
    from codraft.distill import collate

    batch = collate(examples, policy.config.vocab_size)
    outs = drafter.unroll(batch.feats, target_parts(policy), steps=3)
    assert len(outs) in (1, 3)
    for j, (logits, shift) in enumerate(outs):
        assert logits.shape == (*batch.feats.input_ids.shape, policy.config.vocab_size)
        assert shift == (0 if len(outs) == 1 else 1 + j)


@pytest.mark.parametrize("kind", KINDS)
def test_export_load_round_trip(kind, policy, pairs, tmp_path):
    drafter = DRAFTERS.get(kind).build(policy, DrafterConfig(kind=kind)).eval()
    drafter.export(tmp_path / "d", dtype=torch.float32)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["codraft_kind"] == kind and config["architectures"]
    again = load_drafter(tmp_path / "d", policy)
    for name, tensor in drafter.serving_weights().items():
        assert torch.equal(tensor.detach().float(), again.serving_weights()[name].detach().float()), name
    from codraft.distill import collate

    batch = collate(record_examples(policy, pairs[:2], drafter, 0), policy.config.vocab_size)
    a = drafter.unroll(batch.feats, target_parts(policy), 2)[0][0]
    b = again.unroll(batch.feats, target_parts(policy), 2)[0][0]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_raises_teacher_forced_acceptance(kind, taught_policy, pairs):
    drafter = DRAFTERS.get(kind).build(taught_policy, DrafterConfig(kind=kind))
    examples = record_examples(taught_policy, pairs, drafter, pad_id=0)
    train, held = examples[:40], examples[40:]
    parts, vocab = target_parts(taught_policy), taught_policy.config.vocab_size
    before = teacher_forced_alpha(drafter, held, parts, 3, vocab)
    stats = distill(drafter, train, parts, steps=40, k=3, loss="fkl", lr=3e-3, batch_size=16, vocab=vocab, autocast=False)
    after = teacher_forced_alpha(drafter, held, parts, 3, vocab)
    assert stats.loss_last < stats.loss_first
    assert after.accept_len_prob > before.accept_len_prob + 0.3
    assert after.accept_len >= before.accept_len
    assert all(0.0 <= a <= 1.0 for a in after.greedy + after.prob)


@pytest.mark.parametrize("kind", KINDS)
def test_drafter_that_does_not_fit_the_target_is_refused(kind, policy, tmp_path):
    drafter = DRAFTERS.get(kind).build(policy, DrafterConfig(kind=kind))
    drafter.export(tmp_path / "d")
    other = tiny_policy(vocab=48)
    with pytest.raises(DrafterMismatch, match="vocabulary|shape"):
        load_drafter(tmp_path / "d", other)
    if kind != "draft_model":
        wider = tiny_policy(hidden=96)
        with pytest.raises(DrafterMismatch, match="hidden size|shape"):
            load_drafter(tmp_path / "d", wider)


def test_corrupt_or_missing_checkpoint(policy, tmp_path):
    drafter = DRAFTERS.get("eagle3").build(policy, DrafterConfig(kind="eagle3"))
    drafter.export(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DrafterMismatch, match="cannot be read"):
        load_drafter(tmp_path / "d", policy)
    with pytest.raises(FileNotFoundError, match="needs config.json and model.safetensors"):
        load_drafter(tmp_path / "nowhere", policy)


def test_eagle3_layer_ids_are_checked(policy):
    with pytest.raises(DrafterMismatch, match="3 distinct aux layer ids"):
        DRAFTERS.get("eagle3").build(policy, DrafterConfig(kind="eagle3", aux_layers=(1, 1, 2)))
    with pytest.raises(DrafterMismatch, match=r"out of range for a 4-layer target \(valid: 0..3\)"):
        DRAFTERS.get("eagle3").build(policy, DrafterConfig(kind="eagle3", aux_layers=(1, 2, 4)))


def test_eagle3_reduced_vocabulary_maps_ids(policy):
    counts = torch.zeros(policy.config.vocab_size)
    counts[[5, 9, 17]] = torch.tensor([3.0, 2.0, 1.0])
    drafter = DRAFTERS.get("eagle3").build(policy, DrafterConfig(kind="eagle3", draft_vocab_size=3), token_counts=counts)
    assert drafter.draft_ids.tolist() == [5, 9, 17]
    d2t = drafter.serving_weights()["d2t"]
    assert (torch.arange(3) + d2t).tolist() == [5, 9, 17]  # target id = draft id + d2t[draft id]
    full = drafter.full_vocab(torch.tensor([[1.0, 2.0, 3.0]]))
    assert full[0, 9] == 2.0 and torch.isinf(full[0, 0])


def test_losses_vanish_at_the_target():
    p = torch.log_softmax(torch.randn(5, 7), -1)
    nxt = torch.zeros(5, dtype=torch.long)
    for kind in ("fkl", "rkl", "tv"):
        assert distill_loss(p.clone(), p, nxt, kind).abs().max() < 1e-5
        assert (distill_loss(torch.randn(5, 7), p, nxt, kind) > 0).all()
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_loss(p, p, nxt, "l2")
