"""bf16 autocast only where the hardware runs bf16 natively (codraft.precision)."""
import torch

from codraft import precision


def _matmul_dtype(ctx) -> torch.dtype:
    a = torch.ones(4, 4)
    with ctx:
        return (a @ a).dtype


def test_cpu_without_bf16_instructions_runs_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert not precision.native_bf16("cpu")
    assert _matmul_dtype(precision.autocast("cpu")) == torch.float32
    assert precision.compute_dtype("cpu") == "fp32"


def test_cpu_with_bf16_instructions_autocasts_unless_disabled(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert _matmul_dtype(precision.autocast("cpu")) == torch.bfloat16
    assert _matmul_dtype(precision.autocast("cpu", enabled=False)) == torch.float32
    assert precision.compute_dtype("cpu") == "bf16" and precision.compute_dtype("cpu", enabled=False) == "fp32"


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "Path", lambda _: cpuinfo)
    for flags, expected in (("fpu avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        precision.cpu_has_bf16.cache_clear()
        assert precision.cpu_has_bf16() is expected, flags
    precision.cpu_has_bf16.cache_clear()
