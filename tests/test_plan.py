"""`codraft plan`: parameter counts from the real Qwen3-8B / Qwen3-32B config.json values (built on the
meta device), the shipped presets fitting their GPUs, over-sized plans refused with the reason, and
the activation coefficients checked against what autograd actually saves."""
from pathlib import Path

import pytest
import torch

from codraft.config import ConfigError
from codraft.configfile import load_config
from codraft.plan import estimate, model_facts, render
from codraft.plan_table import GIB, GPUS, gpu_spec, layer_activation_bytes

DATA = Path(__file__).parent / "data"
QWEN3_8B, QWEN3_32B = str(DATA / "qwen3-8b.json"), str(DATA / "qwen3-32b.json")
PRESETS = ("qwen3-8b-8gpu", "qwen3-8b-multinode", "qwen3-8b-gb200-32")


def test_parameter_counts_of_the_published_configs():
    f8 = model_facts(load_config("qwen3-8b-8gpu", overrides=[f"model.config={QWEN3_8B}", "drafter.kind=none"]))
    assert f8.params == 8_190_735_360 and f8.embed == f8.head == 151936 * 4096 and f8.layers == 36
    assert (f8.q_dim, f8.kv_dim, f8.kv_heads, f8.vocab) == (4096, 1024, 8, 151936)
    f32 = model_facts(load_config("qwen3-8b-8gpu", overrides=[f"model.config={QWEN3_32B}", "drafter.kind=none"]))
    assert f32.params == 32_762_123_264 and f32.layers == 64 and f32.hidden == 5120
    lora = model_facts(load_config("qwen3-8b-8gpu", overrides=[f"model.config={QWEN3_8B}", "lora.rank=64"]))
    per_layer = 64 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 12288) * 3)  # q, o; k, v; gate, up, down
    assert lora.trainable == 36 * per_layer
    assert 0.39e9 < lora.drafter < 0.41e9  # EAGLE-3 head over a 32k draft vocabulary


def test_the_bundled_config_is_the_published_one():
    from codraft.plan import BUNDLED

    assert (BUNDLED / "qwen3-8b.json").read_text() == (DATA / "qwen3-8b.json").read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_shipped_presets_fit_their_gpus(preset):
    plan = estimate(load_config(preset))
    assert plan.fits, plan.problems
    if preset != "qwen3-8b-gb200-32":
        assert plan.gpu == "h100-80gb"
        assert estimate(load_config(preset, overrides=["dist.gpu=a100-80gb"])).fits
    else:
        assert plan.gpu == "gb200" and len(plan.roles) == 3
    assert all(plan.peak(i)[0] > 0.5 * plan.gpu_bytes for i in range(2))  # not a vacuous fit


def test_oversized_plans_are_refused_with_the_reason():
    plan = estimate(load_config("qwen3-8b-8gpu", overrides=[f"model.config={QWEN3_32B}", "dist.strategy=ddp"]))
    assert not plan.fits
    assert any("rank 0" in p and "training state" in p and "DDP" in p for p in plan.problems), plan.problems
    assert any("rollout engine" in p for p in plan.problems)  # 32B weights / TP 8 outgrow a 0.12 share
    long = estimate(load_config("qwen3-8b-8gpu", overrides=["model.max_len=4096", "rollout.max_new_tokens=3072"]))
    assert not long.fits and any("activations" in p for p in long.problems), long.problems
    dense = estimate(load_config("qwen3-8b-8gpu", overrides=["drafter.batch_size=16"]))
    assert any("distillation" in p and "control" in p for p in dense.problems), dense.problems


def test_fsdp_shards_and_ddp_replicates():
    f = model_facts(load_config("qwen3-8b-8gpu"))
    rows = lambda plan: {name.split(",")[0]: values[0] for name, _, values in plan.rows}  # noqa: E731
    fsdp = rows(estimate(load_config("qwen3-8b-multinode"), f))
    assert fsdp["policy weights"] == pytest.approx(f.params * 4 / 32) and fsdp["AdamW m and v"] == pytest.approx(f.params * 8 / 32)
    ddp = rows(estimate(load_config("qwen3-8b-multinode", overrides=["dist.strategy=ddp"]), f))
    assert ddp["policy weights"] == f.params * 4 and ddp["DDP gradient buckets"] == f.params * 4


def test_sparse_teachers_shrink_the_buffer_and_the_distillation():
    sparse = estimate(load_config("qwen3-8b-8gpu"))
    dense = estimate(load_config("qwen3-8b-8gpu", overrides=["controller.teacher_top_k=0"]))
    buffer = lambda plan: next(b for what, b, _ in plan.host if what.startswith("distillation buffer"))  # noqa: E731
    tokens = 3 * 64 * 1536  # buffer_steps x rank 0's rows x max_len
    assert buffer(dense) == pytest.approx(tokens * (16 + 2 * 3 * 4096 + 2 * 151936))
    assert buffer(sparse) == pytest.approx(tokens * (16 + 2 * 3 * 4096 + 6 * 128 + 4))
    distill = lambda plan: next(v[0] for name, _, v in plan.rows if name.startswith("distillation"))  # noqa: E731
    assert distill(dense) > 1.5 * distill(sparse)


def test_testbed_plan_and_gpu_names():
    plan = estimate(load_config("default"))
    assert plan.fits and [r.name for r in plan.roles] == ["rank 0"]
    assert "model: 4.9M parameters (6 layers, hidden 256, vocabulary 384)" in render(plan)
    assert gpu_spec("H100")[0] == "h100-80gb" and gpu_spec("")[0] == "h100-80gb" and set(GPUS) >= {"gb200", "h200", "a100-40gb"}
    with pytest.raises(ValueError, match="unknown GPU 'a100'.*a100-40gb"):
        gpu_spec("a100")
    small = estimate(load_config("qwen3-8b-multinode", overrides=["dist.gpu=a100-40gb"]))
    assert not small.fits and small.gpu_bytes == pytest.approx(39.4 * GIB)


def test_model_path_config_wins_and_missing_configs_are_named(tmp_path):
    (tmp_path / "config.json").write_text(Path(QWEN3_32B).read_text())
    f = model_facts(load_config("qwen3-8b-8gpu", overrides=[f"model.path={tmp_path}", "drafter.kind=none"]))
    assert f.layers == 64
    with pytest.raises(ConfigError, match="model.path.*no config.json"):
        estimate(load_config("default", overrides=[f"model.path={tmp_path / 'nothing'}"]))
    with pytest.raises(ConfigError, match="model.config.*qwen3-8b"):
        estimate(load_config("qwen3-8b-8gpu", overrides=["model.config=qwen9"]))


@pytest.mark.parametrize("preset", PRESETS)
def test_cli_prints_the_table(preset, capsys):
    from codraft.cli import main

    assert main(["plan", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert "GiB per GPU" in out and "vLLM share" in out and "fits" in out and "host memory per node" in out


def test_cli_exits_1_naming_the_component(capsys):
    from codraft.cli import main

    assert main(["plan", "--preset", "qwen3-8b-8gpu", "--set", f"model.config={QWEN3_32B}", "--set", "dist.strategy=ddp"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in a forward, parameters excluded."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("autocast", [True, False])
def test_activation_coefficients_match_what_autograd_saves(autocast):
    """Per token and layer: the difference between 4 and 2 layers, between 160 and 64 tokens (so the
    bf16 weight copies autocast keeps, a per-layer constant, cancel)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    h, inter, heads, kv, hd = 256, 1024, 4, 2, 64
    saved = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        cfg = Qwen3Config(vocab_size=128, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, head_dim=hd, max_position_embeddings=256, attn_implementation="sdpa")
        model = Qwen3ForCausalLM(cfg).train()
        for T in (64, 160):
            saved[layers, T] = saved_bytes(model, torch.randint(0, 128, (1, T)), autocast)
    measured = (saved[4, 160] - saved[2, 160] - saved[4, 64] + saved[2, 64]) / 2 / (160 - 64)
    assert measured == pytest.approx(layer_activation_bytes(h, inter, heads * hd, kv * hd, autocast), rel=0.1)


def test_gradient_checkpointing_lets_4096_token_sequences_fit_80gb():
    from codraft.configfile import load_config
    from codraft.plan import estimate, overflows

    long = ["model.max_len=4096", "rollout.max_new_tokens=3072", "grpo.micro_batch_tokens=4096"]
    assert overflows(estimate(load_config("qwen3-8b-8gpu", overrides=long)))
    assert not overflows(estimate(load_config("qwen3-8b-8gpu", overrides=long + ["grpo.gradient_checkpointing=true"])))


def test_multinode_presets_give_every_node_an_engine_and_the_plan_counts_it():
    for preset, nodes in (("qwen3-8b-multinode", 4), ("qwen3-8b-gb200-32", 8)):
        cfg = load_config(preset)
        assert cfg.rollout.engines == nodes == cfg.dist.nodes
        plan = estimate(cfg)
        other = plan.roles[-1]
        assert other.name == "other-node GPU" and other.engine  # every GPU holds a share of some engine
        one = estimate(load_config(preset, overrides=["rollout.engines=1"]))
        assert not one.roles[-1].engine and plan.peak(len(plan.roles) - 1)[0] > one.peak(len(one.roles) - 1)[0]
        host = {what: (a, b) for what, a, b in plan.host}
        gathered = next(v for k, v in host.items() if k.startswith("full state dict"))
        assert gathered[0] == gathered[1] > 0  # each engine's node gathers the full policy for it
    bad = estimate(load_config("qwen3-8b-multinode", overrides=["rollout.engines=3"]))
    assert any("rollout.engines 3" in p and "32 GPUs" in p for p in bad.problems), bad.problems
    assert any("rollout.engines 8" in p for p in estimate(load_config("qwen3-8b-multinode", overrides=["rollout.engines=8"])).problems)
    two = estimate(load_config("qwen3-8b-multinode", overrides=["rollout.engines=2", "rollout.tensor_parallel_size=4"])).problems
    assert any("rollout.engines 2 on 4 node(s)" in p and "one per node" in p for p in two), two  # two engines would share node 0's GPUs
