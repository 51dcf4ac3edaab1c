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


def test_learning_rate_decay_follows_the_step_and_is_stateless():
    policy = torch.nn.Linear(2, 2)
    constant = GRPOTrainer(policy, GRPOConfig(lr=1e-4))
    cosine = GRPOTrainer(policy, GRPOConfig(lr=1e-4, lr_decay="cosine"))
    lrs = {}
    for step in (0, 50, 100, 25):  # any order: the rate depends on the step only (resume-safe)
        constant.begin_step(step, 100)
        cosine.begin_step(step, 100)
        assert constant.optimizer.param_groups[0]["lr"] == 1e-4
        lrs[step] = cosine.optimizer.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(1e-4) and lrs[50] == pytest.approx(5e-5) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert lrs[25] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_resuming_with_more_steps_continues_the_learning_rate_without_a_jump():
    """Issue 16: the cosine rate used to be recomputed over the new run.steps, jumping from 0.5 to 0.79 x lr here."""
    first = GRPOTrainer(torch.nn.Linear(2, 2), GRPOConfig(lr=1e-4, lr_decay="cosine"))
    for step in range(31):
        first.begin_step(step, 60)
    at_30 = first.optimizer.param_groups[0]["lr"]
    resumed = GRPOTrainer(torch.nn.Linear(2, 2), GRPOConfig(lr=1e-4, lr_decay="cosine"))
    resumed.load_state_dict(first.state_dict())
    resumed.begin_step(30, 100)  # --resume --set run.steps=100
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(at_30) == pytest.approx(5e-5)
    resumed.begin_step(65, 100)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 * 0.5)  # halfway from step 30 to 100
    resumed.begin_step(100, 100)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_mini_batch_split_changes_from_step_to_step_and_is_reproducible():
    """Issue 16: the permutation was seeded by the batch size, so every step split the batch alike."""
    from codraft.grpo import minibatch_split

    splits = [minibatch_split(64, 4, seed=0, step=s) for s in range(3)]
    assert splits[0] != splits[1] != splits[2]
    assert minibatch_split(64, 4, seed=0, step=1) == splits[1]  # every rank, and a resumed run, agree
    assert minibatch_split(64, 4, seed=1, step=1) != splits[1]
    assert sorted(r for m in splits[0] for r in m) == list(range(64))


def test_diagnostics_average_over_the_tokens_trained_on():
    """Issue 16: entropy / clip_frac / kl summed over rows with a non-zero advantage but divided by all tokens."""
    model = Toy()
    trainer = GRPOTrainer(model, GRPOConfig(lr=0.0 + 1e-9, mini_batches=1, autocast_bf16=False))
    batch = make_batch([[1, 2], [1, 3]], [[4, 5, 6, 0], [5]], pad_id=0)  # 4 tokens, 1 token
    with torch.no_grad():
        logits = model.table[batch.input_ids][:, :-1].float()
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # [B, T-1]
    trained_row = 1
    mask = batch.target_mask[trained_row].float()
    expected = float((entropy[trained_row] * mask).sum() / mask.sum())
    stats = trainer.update(batch, trainer.score(batch), torch.tensor([0.0, 1.0]))
    assert stats["entropy"] == pytest.approx(expected, rel=1e-5)  # the old division by 5 tokens gave a fifth of it


def test_entropy_bonus_raises_the_entropy_of_a_flat_objective():
    """With zero advantages and a bonus, the only gradient is the entropy's: the policy flattens."""
    model = Toy()
    trainer = GRPOTrainer(model, GRPOConfig(lr=0.5, mini_batches=1, autocast_bf16=False, entropy_coef=1.0))
    batch = make_batch([[1, 2], [1, 3]], [[4, 5, 6, 0], [5]], pad_id=0)
    first = trainer.update(batch, trainer.score(batch), torch.tensor([0.0, 0.0]))
    second = trainer.update(batch, trainer.score(batch), torch.tensor([0.0, 0.0]))
    assert first["trained_frac"] == 1.0 and second["entropy"] > first["entropy"]
    none = GRPOTrainer(Toy(), GRPOConfig(lr=0.5, mini_batches=1, autocast_bf16=False))
    assert none.update(batch, none.score(batch), torch.tensor([0.0, 0.0]))["trained_frac"] == 0.0


def test_gradient_checkpointing_gives_the_same_update(tiny_policy_dir):
    """Recomputing layers in the backward pass changes memory, not the gradient."""
    from transformers import AutoModelForCausalLM

    batch = make_batch([[1, 2, 3], [1, 4]], [[5, 6, 7], [8, 9]], pad_id=0)
    updated = []
    for ckpt in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = GRPOTrainer(model, GRPOConfig(lr=1e-3, mini_batches=1, autocast_bf16=False))
        trainer.update(batch, trainer.score(batch), torch.tensor([1.0, -1.0]))
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(updated[0], updated[1], atol=1e-6)
