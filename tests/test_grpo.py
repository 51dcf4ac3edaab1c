"""GRPO: group advantages, the clipped token loss on hand-computed cases, token-level aggregation."""
import math

import pytest
import torch

from codraft.batch import make_batch, micro_batches
from codraft.config import GRPOConfig
from codraft.grpo import GRPOTrainer, group_advantages, grpo_token_loss


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(group_advantages(rewards, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_clipped_loss_hand_computed():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.5, 0.5]]))  # ratios 1.0 and 0.5
    loss, info = grpo_token_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.0, -0.5]]))  # positive advantage: ratio below 1-eps is not clipped
    assert info["clipped"].tolist() == [[0.0, 0.0]]
    loss, info = grpo_token_loss(logp, old, torch.tensor([-1.0]), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[1.0, 0.8]]))  # negative advantage: ratio clipped at 0.8
    assert info["clipped"].tolist() == [[0.0, 1.0]]
    high = torch.log(torch.tensor([[0.9]]))
    loss, _ = grpo_token_loss(high, torch.log(torch.tensor([[0.5]])), torch.tensor([2.0]), 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-2.0 * 1.28]]))  # ratio 1.8 clipped at 1.28


def test_kl_term_is_k3():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, info = grpo_token_loss(logp, logp, torch.tensor([0.0]), 0.2, 0.2, ref_logp=ref, kl_coef=0.5)
    expected = 0.5 - math.log(0.5) - 1  # exp(log r) - log r - 1 with r = 0.25 / 0.5
    assert info["kl"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-5)


class Toy(torch.nn.Module):
    """A bigram model with the HF call signature, enough for the trainer."""

    def __init__(self, vocab=7):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        return type("Out", (), {"logits": self.table[input_ids], "hidden_states": None})()


def test_token_level_aggregation_and_update():
    model = Toy()
    trainer = GRPOTrainer(model, GRPOConfig(lr=0.1, mini_batches=1, autocast_bf16=False))
    prompts = [[1, 2], [1, 3]]
    completions = [[4, 5, 6, 0], [5]]  # 4 tokens and 1 token
    batch = make_batch(prompts, completions, pad_id=0)
    assert trainer.score(batch).old_logp is None  # one on-policy update: the update supplies them
    scored = trainer.score(batch, force=True)
    adv = torch.tensor([1.0, -1.0])
    before = model.table.detach().clone()
    stats = trainer.update(batch, scored, adv)
    # ratio is 1 at the first step, so the loss is -(sum over tokens of A) / tokens = -(4 - 1) / 5
    assert stats["loss"] == pytest.approx(-3 / 5, abs=1e-5)
    assert stats["clip_frac"] == 0.0
    assert not torch.equal(before, model.table)
    # the update raised the log-prob of the positive sequence's tokens
    assert trainer.score(batch, force=True).old_logp[0].sum() > scored.old_logp[0].sum()


def test_zero_advantage_sequences_are_not_trained_but_count_in_the_mean():
    model = Toy()
    trainer = GRPOTrainer(model, GRPOConfig(lr=0.1, mini_batches=1, autocast_bf16=False))
    batch = make_batch([[1, 2], [1, 3]], [[4, 5, 6, 0], [5]], pad_id=0)
    stats = trainer.update(batch, trainer.score(batch), torch.tensor([0.0, 1.0]))
    assert stats["loss"] == pytest.approx(-1 / 5, abs=1e-5)  # one positive token over all five
    assert stats["trained_frac"] == 0.5


def test_non_finite_gradients_skip_the_step():
    model = Toy()
    trainer = GRPOTrainer(model, GRPOConfig(lr=0.1, mini_batches=1, autocast_bf16=False))
    batch = make_batch([[1]], [[2, 3]], pad_id=0)
    scored = trainer.score(batch)
    before = model.table.detach().clone()
    stats = trainer.update(batch, scored, torch.tensor([float("nan")]))
    assert stats["skipped_updates"] == 1
    assert torch.equal(before, model.table)


def test_micro_batches_respect_token_budget():
    lengths = [5, 50, 7, 48, 6, 30]
    groups = micro_batches(lengths, max_tokens=100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 100


def test_make_batch_masks():
    batch = make_batch([[1, 2], [3]], [[4, 5], [6, 7, 8]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 4, 5], [3, 6, 7, 8]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert batch.target_mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_learning_rate_decay_follows_the_run_and_is_stateless():
    policy = torch.nn.Linear(2, 2)
    constant = GRPOTrainer(policy, GRPOConfig(lr=1e-4))
    cosine = GRPOTrainer(policy, GRPOConfig(lr=1e-4, lr_decay="cosine"))
    lrs = {}
    for fraction in (0.0, 0.5, 1.0, 0.25):  # any order: the rate depends on the step only (resume-safe)
        constant.set_progress(fraction)
        cosine.set_progress(fraction)
        assert constant.optimizer.param_groups[0]["lr"] == 1e-4
        lrs[fraction] = cosine.optimizer.param_groups[0]["lr"]
    assert lrs[0.0] == pytest.approx(1e-4) and lrs[0.5] == pytest.approx(5e-5) and lrs[1.0] == pytest.approx(0.0, abs=1e-12)
    assert lrs[0.25] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
