"""EAGLE-3 checkpoints in both layouts vLLM reads: codraft's drafter exported in each loads back to the
same tensors and logits; published checkpoints built here by hand (classic `LlamaForCausalLMEagle3` with
`midlayer.*`, d2t and t2d; speculators `speculators_model_type: eagle3`) load and compute what a plain
re-implementation of vLLM's EAGLE-3 step computes with their tensors; checkpoints that do not fit the
target, or that codraft's head cannot compute, are refused with the reason; `codraft export-drafter`."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from codraft.drafter import DRAFTERS, DrafterMismatch, Features, load_drafter, shifted, target_parts
from codraft.nn import rotary
from tests_helpers import tiny_checkpoint, tiny_policy

H, V, HEADS, KV, HD, MLP = 64, 40, 2, 1, 32, 80  # the tiny policy's width, vocabulary and heads; the head's own MLP width
DRAFT_IDS = [3, 5, 8, 13, 21, 34, 1, 2]  # any order: d2t maps draft id i to DRAFT_IDS[i]


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def trained_eagle3(policy, draft_vocab=16):
    """A codraft EAGLE-3 drafter with a reduced vocabulary and non-trivial weights everywhere."""
    cls = DRAFTERS.get("eagle3")
    drafter = cls.build(policy, cls.Config(draft_vocab_size=draft_vocab), token_counts=torch.rand(V, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return drafter.eval()


def features(aux_layers, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, T), generator=g)
    return Features(ids, torch.ones_like(ids), aux=torch.randn(2, T, len(aux_layers) * H, generator=g))


def head_tensors(seed=0, draft_vocab=len(DRAFT_IDS), bias=False):
    """Random head tensors under classic names (`midlayer.*`)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    w = {"fc.weight": r(H, 3 * H), "norm.weight": 1 + r(H), "lm_head.weight": r(draft_vocab, H)}
    for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        w[f"midlayer.{name}.weight"] = 1 + r(H)
    for name, rows, cols in (("q", HEADS * HD, 2 * H), ("k", KV * HD, 2 * H), ("v", KV * HD, 2 * H), ("o", H, HEADS * HD)):
        w[f"midlayer.self_attn.{name}_proj.weight"] = r(rows, cols)
        if bias and name != "o":
            w[f"midlayer.self_attn.{name}_proj.bias"] = r(rows)
    w.update({"midlayer.mlp.gate_proj.weight": r(MLP, H), "midlayer.mlp.up_proj.weight": r(MLP, H), "midlayer.mlp.down_proj.weight": r(H, MLP)})
    return w


def vocab_maps(ids=DRAFT_IDS, vocab=V):
    d2t = torch.tensor(ids) - torch.arange(len(ids))  # offsets: target id = draft id + d2t
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return {"d2t": d2t, "t2d": t2d}


def classic_config(**extra):
    """config.json as the EAGLE authors publish it: no codraft_kind, no head_dim, no rope_theta (Llama's 10000)."""
    return {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H, "intermediate_size": MLP, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "vocab_size": V, "draft_vocab_size": len(DRAFT_IDS),
            "torch_dtype": "float16", "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 3], "use_aux_hidden_state": True}, **extra}


def speculators_config(layer_extra=None, **extra):
    """config.json as vLLM's speculators library writes it (the layer under transformer_layer_config)."""
    layer = {"model_type": "llama", "hidden_size": H, "intermediate_size": MLP, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
             "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "vocab_size": V, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **(layer_extra or {})}
    verifier = {"name_or_path": "Qwen/Qwen3-8B", "architectures": ["Qwen3ForCausalLM"]}
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "transformer_layer_config": layer, "draft_vocab_size": len(DRAFT_IDS),
            "speculators_config": {"algorithm": "eagle3", "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}], "default_proposal_method": "greedy",
                                   "verifier": verifier}, **extra}


def write(path, config, tensors, dtype=torch.float16):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def speculators_names(tensors):
    return {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}


def reference_step0(w, feats, embed, draft_ids, theta, eps, norm_before_residual):
    """vLLM's EAGLE-3 draft step 0 (llama_eagle3.py) written out plainly, from checkpoint tensors. -> [B, T, V]"""
    w = {k: v.float() for k, v in w.items()}
    rms = lambda x, name: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]  # noqa: E731
    B, T = feats.input_ids.shape
    g = feats.aux @ w["fc.weight"].T  # [B, T, H]
    normed = rms(g, "midlayer.hidden_norm.weight")
    x = torch.cat([rms(embed[shifted(feats.input_ids, 1)], "midlayer.input_layernorm.weight"), normed], -1)  # [B, T, 2H]
    proj = lambda n, heads: (x @ w[f"midlayer.self_attn.{n}_proj.weight"].T + w.get(f"midlayer.self_attn.{n}_proj.bias", 0)).view(B, T, heads, HD).transpose(1, 2)  # noqa: E731
    pos = torch.arange(T)
    q, k, v = rotary(proj("q", HEADS), pos, theta), rotary(proj("k", KV), pos, theta), proj("v", KV)
    k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(HD) + torch.full((T, T), float("-inf")).triu(1)
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, HEADS * HD) @ w["midlayer.self_attn.o_proj.weight"].T
    r = (normed if norm_before_residual else g) + attn
    m = rms(r, "midlayer.post_attention_layernorm.weight")
    out = r + (F.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) @ w["midlayer.mlp.down_proj.weight"].T
    logits = rms(out, "norm.weight") @ w["lm_head.weight"].T  # [B, T, Vd]
    full = torch.full((B, T, V), float("-inf"))
    full[..., draft_ids] = logits
    return full


def step0(drafter, policy, feats):
    return drafter.unroll(feats, target_parts(policy), steps=1)[0][0]


# ---------------------------------------------------------------------- codraft's drafter, both formats
@pytest.mark.parametrize("fmt", ["vllm", "speculators"])
def test_codraft_drafter_round_trips_in_each_format(fmt, policy, tmp_path):
    drafter = trained_eagle3(policy)
    drafter.export(tmp_path / "d", dtype=torch.float32, fmt=fmt, verifier={"name_or_path": "/models/policy", "architectures": ["Qwen3ForCausalLM"]}, k=4)
    again = load_drafter(tmp_path / "d", policy)
    mine, theirs = drafter.serving_weights(), again.serving_weights()
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        assert torch.equal(tensor.detach().float(), theirs[name].detach().float()), name
    assert again.hf_config() == drafter.hf_config() and again.aux_layers == drafter.aux_layers
    feats = features(drafter.aux_layers)
    for steps in (1, 3):
        for (a, _), (b, _) in zip(drafter.unroll(feats, target_parts(policy), steps), again.unroll(feats, target_parts(policy), steps)):
            assert torch.allclose(a, b, atol=1e-5)


def test_speculators_export_is_what_vllm_reads(policy, tmp_path):
    from safetensors.torch import load_file

    drafter = trained_eagle3(policy)
    drafter.export(tmp_path / "d", fmt="speculators", verifier={"name_or_path": "/models/policy", "architectures": ["Qwen3ForCausalLM"]}, k=4)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    tensors = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert config["speculators_model_type"] == "eagle3" and config["transformer_layer_config"]["model_type"] == "llama"
    assert config["speculators_config"]["verifier"] == {"name_or_path": "/models/policy", "architectures": ["Qwen3ForCausalLM"]}
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert config["norm_before_residual"] is False  # written: vLLM's default for a speculators config is True
    assert config["eagle_aux_hidden_state_layer_ids"] == list(drafter.aux_layers) and config["draft_vocab_size"] == 16
    assert not any(k.startswith("midlayer.") for k in tensors) and "layers.0.hidden_norm.weight" in tensors
    assert tensors["t2d"].dtype == torch.bool and tensors["t2d"].nonzero().flatten().tolist() == sorted(drafter.draft_ids.tolist())
    with pytest.raises(ValueError, match="names its verifier"):
        drafter.export(tmp_path / "e", fmt="speculators", verifier={}, k=3)
    with pytest.raises(ValueError, match="unknown drafter checkpoint format 'gguf'"):
        drafter.export(tmp_path / "e", fmt="gguf")


# ---------------------------------------------------------------------- published checkpoints
@pytest.mark.parametrize("prefix", ["midlayer.", "layers.0."])
def test_published_classic_checkpoint_loads_and_computes_vllms_step(prefix, policy, tmp_path):
    w = head_tensors()
    write(tmp_path / "d", classic_config(), {**{k.replace("midlayer.", prefix): v for k, v in w.items()}, **vocab_maps()})
    drafter = load_drafter(tmp_path / "d", policy)
    assert drafter.name == "eagle3" and drafter.aux_layers == (0, 1, 3) and drafter.draft_ids.tolist() == DRAFT_IDS
    assert not drafter.norm_before_residual and drafter.shape["rope_theta"] == 10000.0 and drafter.shape["head_dim"] == HD
    feats = features(drafter.aux_layers)
    ref = reference_step0({k: v.half() for k, v in w.items()}, feats, policy.get_input_embeddings().weight.detach(), DRAFT_IDS, 10000.0, 1e-5, False)
    assert torch.allclose(step0(drafter, policy, feats), ref, atol=1e-4)
    exported = drafter.hf_config()  # re-exported as codraft serves it, the published defaults written out
    assert exported["intermediate_size"] == MLP and exported["rope_theta"] == 10000.0 and exported["norm_before_residual"] is False


def test_published_speculators_checkpoint_takes_vllms_defaults(tmp_path):
    """No aux layer ids: vLLM's (2, L/2, L-3); no norm_before_residual: True, as vLLM's update_eagle3 reads it."""
    deep = tiny_policy(layers=8)
    w = head_tensors(seed=1)
    write(tmp_path / "d", speculators_config(), {**speculators_names(w), **vocab_maps()}, dtype=torch.bfloat16)
    drafter = load_drafter(tmp_path / "d", deep)
    assert drafter.aux_layers == (2, 4, 5) and drafter.norm_before_residual and drafter.shape["rope_theta"] == 1e6
    feats = features(drafter.aux_layers, seed=2)
    ref = reference_step0({k: v.bfloat16() for k, v in w.items()}, feats, deep.get_input_embeddings().weight.detach(), DRAFT_IDS, 1e6, 1e-6, True)
    assert torch.allclose(step0(drafter, deep, feats), ref, atol=1e-4)
    without = reference_step0({k: v.bfloat16() for k, v in w.items()}, feats, deep.get_input_embeddings().weight.detach(), DRAFT_IDS, 1e6, 1e-6, False)
    assert not torch.allclose(ref, without, atol=1e-2)  # the flag matters, so the check above tests it


def test_attention_bias_and_full_vocabulary_load(policy, tmp_path):
    w = head_tensors(seed=3, draft_vocab=V, bias=True)
    write(tmp_path / "d", speculators_config(layer_extra={"attention_bias": True}, draft_vocab_size=V, norm_before_residual=False,
                                             eagle_aux_hidden_state_layer_ids=[1, 2, 3]), speculators_names(w), dtype=torch.float32)
    drafter = load_drafter(tmp_path / "d", policy)
    assert drafter.draft_ids is None and drafter.hf_config()["attention_bias"] is True
    feats = features(drafter.aux_layers)
    ref = reference_step0(w, feats, policy.get_input_embeddings().weight.detach(), list(range(V)), 1e6, 1e-6, False)
    assert torch.allclose(step0(drafter, policy, feats), ref, atol=1e-4)


def test_own_embedding_is_shared_when_it_is_the_targets_and_kept_when_not(policy, tmp_path):
    target = policy.get_input_embeddings().weight.detach()
    base = {**head_tensors(), **vocab_maps()}
    write(tmp_path / "same", classic_config(), {**base, "embed_tokens.weight": target.clone()})
    assert load_drafter(tmp_path / "same", policy).embed_tokens is None  # vLLM shares an identical embedding
    own = torch.randn(V, H)
    write(tmp_path / "own", classic_config(), {**base, "embed_tokens.weight": own})
    drafter = load_drafter(tmp_path / "own", policy)
    assert torch.equal(drafter.embed_tokens, own.half().float())
    feats = features(drafter.aux_layers)
    ref = reference_step0({k: v.half() for k, v in head_tensors().items()}, feats, own.half().float(), DRAFT_IDS, 10000.0, 1e-5, False)
    assert torch.allclose(step0(drafter, policy, feats), ref, atol=1e-4)
    drafter.export(tmp_path / "again", dtype=torch.float32)
    assert torch.equal(load_drafter(tmp_path / "again", policy).embed_tokens, drafter.embed_tokens)


def test_pytorch_bin_checkpoint_loads(policy, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(classic_config()))
    torch.save({**head_tensors(), **vocab_maps()}, tmp_path / "d" / "pytorch_model.bin")
    assert load_drafter(tmp_path / "d", policy).draft_ids.tolist() == DRAFT_IDS


# ---------------------------------------------------------------------- refused, with the reason
def refused(policy, path, config, tensors, match):
    write(path, config, tensors)
    with pytest.raises(DrafterMismatch, match=match):
        load_drafter(path, policy)


def test_mismatched_published_checkpoints_are_refused_with_the_reason(policy, tmp_path):
    w, maps = head_tensors(), vocab_maps()
    cases = [
        (tiny_policy(hidden=96), classic_config(), {**w, **maps}, "hidden size 64 does not fit the target's 96"),
        (policy, classic_config(vocab_size=48), {**w, **vocab_maps(vocab=48)}, "vocabulary 48 does not fit the target's 40"),
        (policy, classic_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2, 4]}), {**w, **maps}, r"out of range for a 4-layer target \(valid: 0..3\)"),
        (policy, classic_config(eagle_config={}), {**w, **maps}, r"names no aux layer ids, and vLLM's default .* \[2, 2, 1\] for a 4-layer target"),
        (policy, classic_config(), {**w, "d2t": maps["d2t"], "t2d": vocab_maps(ids=DRAFT_IDS[:-1] + [30])["t2d"]}, r"t2d disagrees with d2t.*marked, not mapped: \[30\]; mapped, not marked: \[2\]"),
        (policy, classic_config(), {**w, "d2t": maps["d2t"], "t2d": torch.ones(50, dtype=torch.bool)}, "t2d covers"),
        (policy, classic_config(), {**w, "t2d": maps["t2d"]}, "t2d but no d2t"),
        (policy, classic_config(), w, "draft vocabulary of 8 tokens .* needs d2t"),
        (policy, classic_config(), {**w, "d2t": torch.full((8,), 39)}, "outside the target vocabulary of 40"),
        (policy, classic_config(), {**w, **maps, "midlayer.self_attn.q_norm.weight": torch.ones(HD)}, r"tensors codraft's head does not compute: \['midlayer.self_attn.q_norm.weight'\]"),
        (policy, classic_config(), {**w, **maps, "layers.1.mlp.up_proj.weight": torch.ones(2, 2)}, "more than one decoder layer"),
        (policy, classic_config(norm_before_fc=True), {**w, **maps}, "sets norm_before_fc"),
        (policy, classic_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), {**w, **maps}, "'llama3' rope scaling"),
        (policy, speculators_config(layer_extra={"model_type": "qwen3"}, eagle_aux_hidden_state_layer_ids=[0, 1, 3]), {**speculators_names(w), **maps}, "'qwen3' decoder layer"),
        (policy, {**classic_config(), "architectures": ["LlamaForCausalLM"]}, {**w, **maps}, r"no format codraft reads.*architectures:LlamaForCausalLM"),
    ]
    for i, (target, config, tensors, match) in enumerate(cases):
        refused(target, tmp_path / str(i), config, tensors, match)
    short = {**w, **maps}
    short.pop("midlayer.hidden_norm.weight")
    refused(policy, tmp_path / "short", classic_config(), short, r"lacks \['midlayer.hidden_norm.weight'\]")


# ---------------------------------------------------------------------- codraft export-drafter
def test_export_drafter_command(policy, tmp_path, capsys):
    from codraft.cli import main

    run = tmp_path / "run"
    tiny_checkpoint(run / "policy")
    drafter = trained_eagle3(policy)
    drafter.export(run / "drafter")
    (run / "config.toml").write_text("[drafter]\nnum_speculative_tokens = 4\n")
    assert main(["export-drafter", str(run), "--out", str(tmp_path / "spec")]) == 0
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert config["speculators_config"]["verifier"] == {"name_or_path": str((run / "policy").resolve()), "architectures": ["Qwen3ForCausalLM"]}
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert main(["export-drafter", str(run), "--format", "vllm", "--k", "2", "--out", str(tmp_path / "plain")]) == 0
    assert '"num_speculative_tokens": 2' in capsys.readouterr().out
    for path in ("spec", "plain"):
        again = load_drafter(tmp_path / path, policy)
        assert all(torch.equal(t.float(), again.serving_weights()[n].float()) for n, t in load_drafter(run / "drafter", policy).serving_weights().items())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["export-drafter", str(run), "--out", str(tmp_path / "busy")]) == 2
    assert main(["export-drafter", str(run), "--out", str(run / "drafter")]) == 2
    assert main(["export-drafter", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "holds other files" in err and "not a run directory with a drafter" in err and (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
