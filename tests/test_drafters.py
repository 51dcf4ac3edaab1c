"""Drafter contract, run over every registered kind (and the worked example of drafters/README.md):
checkpoint round trip, fit checks, a documented settings dataclass, clear errors on checkpoints
that do not fit, and for kinds that learn (`Drafter.learned`) unroll shapes and distillation that
raises teacher-forced acceptance; a kind that learns nothing is built and exported, not distilled."""
import dataclasses
import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from codraft.distill import distill, distill_loss, teacher_forced_alpha
from codraft.drafter import DRAFTERS, DrafterMismatch, load_drafter, target_parts
from codraft.warmstart import record_examples
from tests_helpers import counting_pairs, scratch_registry, tiny_policy
from tests_helpers import taught_policy as teach

KINDS = DRAFTERS.names()
LEARNED = [kind for kind in KINDS if DRAFTERS.get(kind).learned]  # distilled kinds: the teacher-forced contract applies
README = Path(__file__).resolve().parents[1] / "drafters" / "README.md"


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.fixture(scope="module")
def pairs():
    return counting_pairs()


@pytest.fixture(scope="module")
def taught_policy(pairs):
    """A policy trained briefly on the counting pattern, so that it has something to distil."""
    return teach(pairs)


def check_unroll_shapes(kind, policy, pairs):
    drafter = DRAFTERS.get(kind).build(policy, DRAFTERS.get(kind).Config())
    examples = record_examples(policy, pairs[:4], drafter, pad_id=0)
    from codraft.distill import collate

    batch = collate(examples, policy.config.vocab_size)
    outs = drafter.unroll(batch.feats, target_parts(policy), steps=3)
    assert len(outs) in (1, 3)
    for j, (logits, shift) in enumerate(outs):
        assert logits.shape == (*batch.feats.input_ids.shape, policy.config.vocab_size)
        assert shift == (0 if len(outs) == 1 else 1 + j)


def check_export_load_round_trip(kind, policy, pairs, tmp_path):
    drafter = DRAFTERS.get(kind).build(policy, DRAFTERS.get(kind).Config()).eval()
    drafter.export(tmp_path / "d", dtype=torch.float32)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["codraft_kind"] == kind and config["architectures"]
    again = load_drafter(tmp_path / "d", policy)
    for name, tensor in drafter.serving_weights().items():
        assert torch.equal(tensor.detach().float(), again.serving_weights()[name].detach().float()), name
    assert again.hf_config() == drafter.hf_config() and again.speculative_config(tmp_path / "d", 3) == drafter.speculative_config(tmp_path / "d", 3)
    if not drafter.learned:  # nothing to unroll: the settings are the drafter
        assert again.settings == drafter.settings
        return
    from codraft.distill import collate

    batch = collate(record_examples(policy, pairs[:2], drafter, 0), policy.config.vocab_size)
    a = drafter.unroll(batch.feats, target_parts(policy), 2)[0][0]
    b = again.unroll(batch.feats, target_parts(policy), 2)[0][0]
    assert torch.allclose(a, b, atol=1e-5)


def check_distillation_raises_teacher_forced_acceptance(kind, taught_policy, pairs):
    drafter = DRAFTERS.get(kind).build(taught_policy, DRAFTERS.get(kind).Config())
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


def check_drafter_that_does_not_fit_the_target_is_refused(kind, policy, tmp_path):
    drafter = DRAFTERS.get(kind).build(policy, DRAFTERS.get(kind).Config())
    drafter.export(tmp_path / "d")
    other = tiny_policy(vocab=48)
    with pytest.raises(DrafterMismatch, match="vocabulary|shape"):
        load_drafter(tmp_path / "d", other)
    if kind != "draft_model" and drafter.learned:
        wider = tiny_policy(hidden=96)
        with pytest.raises(DrafterMismatch, match="hidden size|shape"):
            load_drafter(tmp_path / "d", wider)


@pytest.mark.parametrize("kind", LEARNED)
def test_unroll_shapes(kind, policy, pairs):
    check_unroll_shapes(kind, policy, pairs)


@pytest.mark.parametrize("kind", KINDS)
def test_export_load_round_trip(kind, policy, pairs, tmp_path):
    check_export_load_round_trip(kind, policy, pairs, tmp_path)


@pytest.mark.parametrize("kind", LEARNED)
def test_distillation_raises_teacher_forced_acceptance(kind, taught_policy, pairs):
    check_distillation_raises_teacher_forced_acceptance(kind, taught_policy, pairs)


@pytest.mark.parametrize("kind", KINDS)
def test_drafter_that_does_not_fit_the_target_is_refused(kind, policy, tmp_path):
    check_drafter_that_does_not_fit_the_target_is_refused(kind, policy, tmp_path)


def check_documented_settings(kind):
    cls = DRAFTERS.get(kind)
    assert cls.description, f"{kind}: no description"
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
    from codraft.configfile import from_dict, section_fields, to_dict

    for name, _, _, doc in section_fields(cls.Config):
        assert doc, f"{kind}: setting {name} has no docstring"
    assert from_dict(cls.Config, to_dict(cls.Config())) == cls.Config()


@pytest.mark.parametrize("kind", KINDS)
def test_settings_are_documented_and_round_trip(kind):
    check_documented_settings(kind)


@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(LEARNED)))
def test_a_kind_that_learns_nothing_is_built_not_distilled(kind, policy, tmp_path):
    from codraft.configfile import load_config
    from codraft.warmstart import initial_drafter
    from tests_helpers import tiny_checkpoint

    cfg = load_config("smoke", overrides=[f"drafter.kind={kind}", f"model.cache_dir={tmp_path / 'cache'}"])
    # no prompts: sampling completions for a distillation would have nothing to sample from
    drafter, path = initial_drafter(cfg, policy, [], tiny_checkpoint(tmp_path / "policy"), eos_id=0, pad_id=0, log=lambda *a: None)
    assert drafter.name == kind and not drafter.learned and drafter.hf_config() == DRAFTERS.get(kind).build(policy, DRAFTERS.get(kind).Config()).hf_config()
    assert json.loads((path / "warmstart.json").read_text()) == {"kind": kind, "learned": False}


@pytest.mark.parametrize("warmup_prompts, batch_size, sampled", [(64, 16, 64), (100, 16, 100), (8, 4, 16), (500, 16, 300)])
def test_warm_start_samples_warmup_prompts(warmup_prompts, batch_size, sampled, policy, tmp_path, monkeypatch):
    """`drafter.warmup_prompts` training prompts (at least 4 x batch_size, at most the 300 given), 4 completions each."""
    import codraft.warmstart as warmstart
    from codraft.configfile import load_config
    from tests_helpers import tiny_checkpoint

    seen = {}

    def stop(policy, prompts, n, *args, **kwargs):
        seen.update(prompts=prompts, n=n)
        raise InterruptedError

    monkeypatch.setattr(warmstart, "sample_completions", stop)
    cfg = load_config("smoke", overrides=["drafter.kind=eagle3", f"drafter.warmup_prompts={warmup_prompts}", f"drafter.batch_size={batch_size}",
                                          f"model.cache_dir={tmp_path / 'cache'}"])
    prompts = [[i % 7 + 1, i % 5 + 1] for i in range(300)]
    with pytest.raises(InterruptedError):
        warmstart.warm_drafter(cfg, policy, prompts, tiny_checkpoint(tmp_path / "policy"), eos_id=0, pad_id=0, log=lambda *a: None)
    assert seen == {"prompts": prompts[:sampled], "n": 4}


def test_unknown_drafter_setting_names_the_key():
    from codraft.config import ConfigError
    from codraft.configfile import load_config
    from codraft.drafter import drafter_settings

    cfg = load_config("smoke", overrides=["drafter.kind=eagle3", "drafter.args.draft_vocab=64"])
    with pytest.raises(ConfigError, match="unknown config key 'drafter.args.draft_vocab'; did you mean 'draft_vocab_size'"):
        drafter_settings(cfg.drafter)
    cfg = load_config("smoke", overrides=["drafter.kind=draft_model", "drafter.args.num_layers=9"])
    with pytest.raises(ConfigError, match="'drafter.args.num_layers' must be in 1..4"):
        drafter_settings(cfg.drafter)


def readme_example() -> tuple[str, str]:
    """(kind name, code) of the example in drafters/README.md's 'Add a drafter kind in one file'."""
    section = README.read_text().split("## Add a drafter kind in one file", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return re.search(r'DRAFTERS\.register\("(\w+)"\)', code).group(1), code


def test_readme_example_registers_and_meets_the_contract(policy, taught_policy, pairs, tmp_path, monkeypatch):
    name, code = readme_example()
    package = tmp_path / "readme_drafters"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    scratch_registry(monkeypatch, DRAFTERS)  # registration undone afterwards
    try:
        importlib.import_module(f"readme_drafters.{name}")
        assert name in DRAFTERS.names()
        check_unroll_shapes(name, policy, pairs)
        check_export_load_round_trip(name, policy, pairs, tmp_path / "round-trip")
        check_distillation_raises_teacher_forced_acceptance(name, taught_policy, pairs)
        check_drafter_that_does_not_fit_the_target_is_refused(name, policy, tmp_path / "misfit")
        check_documented_settings(name)
        narrow = DRAFTERS.get(name).build(policy, DRAFTERS.get(name).Config(mlp_ratio=0.5))
        assert narrow.hf_config()["intermediate_size"] == max(8, round(policy.config.intermediate_size * 0.5))
        from codraft.drafter import describe_drafters

        assert f"{name}: " in describe_drafters() and "mlp_ratio" in describe_drafters()
    finally:
        for module in ("readme_drafters", f"readme_drafters.{name}"):
            sys.modules.pop(module, None)


def test_corrupt_or_missing_checkpoint(policy, tmp_path):
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config())
    drafter.export(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DrafterMismatch, match="cannot be read"):
        load_drafter(tmp_path / "d", policy)
    with pytest.raises(FileNotFoundError, match="needs config.json and model.safetensors"):
        load_drafter(tmp_path / "nowhere", policy)


def test_eagle3_layer_ids_are_checked(policy):
    with pytest.raises(DrafterMismatch, match="3 distinct aux layer ids"):
        DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config(aux_layers=(1, 1, 2)))
    with pytest.raises(DrafterMismatch, match=r"out of range for a 4-layer target \(valid: 0..3\)"):
        DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config(aux_layers=(1, 2, 4)))


def test_eagle3_reduced_vocabulary_maps_ids(policy):
    counts = torch.zeros(policy.config.vocab_size)
    counts[[5, 9, 17]] = torch.tensor([3.0, 2.0, 1.0])
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config(draft_vocab_size=3), token_counts=counts)
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
