"""LoRA: only adapters train, merged weights carry the base model's names and reproduce the LoRA model."""
import pytest
import torch

from codraft.batch import make_batch, token_logprobs
from codraft.config import GRPOConfig
from codraft.grpo import GRPOTrainer
from codraft.lora import LoRAConfig, apply_lora, base_name, merged_state_dict, trainable_names

pytest.importorskip("peft")


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(config).eval()


def batch_and_adv():
    batch = make_batch([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[10, 11, 12], [13, 14, 15, 16, 17], [18]], pad_id=0)
    return batch, torch.tensor([1.0, -0.5, 0.7])


def logprobs(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return token_logprobs(logits, batch.targets) * batch.target_mask  # [B, T-1]


@pytest.fixture
def trained_lora():
    """A rank-4 LoRA policy after one GRPO update (so B != 0), and the base weights it started from."""
    model = apply_lora(tiny_qwen3(), LoRAConfig(rank=4, alpha=8))
    base_before = {base_name(k): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    trainer = GRPOTrainer(model, GRPOConfig(lr=1e-2, autocast_bf16=False))
    batch, adv = batch_and_adv()
    trainer.update(batch, trainer.score(batch), adv)
    return model, base_before


def test_rank_zero_is_a_no_op():
    model = tiny_qwen3()
    assert apply_lora(model, LoRAConfig(rank=0)) is model
    assert all(p.requires_grad for p in model.parameters())


def test_update_changes_only_adapter_weights(trained_lora):
    model, base_before = trained_lora
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    state = model.state_dict()
    for key, value in state.items():
        if ".lora_" in key:
            continue
        assert torch.equal(value, base_before[base_name(key)]), key  # bitwise unchanged
    assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)  # B started at 0 and moved


def test_merged_weights_reproduce_the_lora_model(trained_lora):
    model, base_before = trained_lora
    batch, _ = batch_and_adv()
    before_merge = logprobs(model, batch)
    merged = merged_state_dict(model)
    fresh = tiny_qwen3(seed=123)  # different init: every weight must come from the merge
    assert merged.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(merged, strict=True)
    assert torch.allclose(logprobs(fresh, batch), before_merge, atol=1e-5)
    assert not torch.allclose(logprobs(tiny_qwen3(), batch), before_merge, atol=1e-3)  # the adapters matter
    assert torch.equal(logprobs(model, batch), before_merge)  # merging left the training model as it was
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base_before[q])
