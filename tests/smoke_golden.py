"""Seeded smoke runs, one per drafter kind, and their recorded metrics ("goldens").

A refactor must not change what a run computes. `tests/integration/test_smoke_golden.py` runs a
short seeded smoke run per drafter kind and compares its metrics.jsonl, step by step, with the
golden recorded here, leaving out timing keys. Goldens hold bit-level results, which depend on the
CPU type and the library versions, so each golden records the hardware it came from
(`codraft.hardware.fingerprint`); on other hardware only the metric keys are compared.

Write (or rewrite, after a change that is meant to change results) the goldens on this machine:

    .venv/bin/python tests/smoke_golden.py [KIND ...]
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from codraft.hardware import describe, fingerprint
from codraft.io import read_jsonl
from conftest import child_env

GOLDEN_DIR = Path(__file__).parent / "data" / "smoke_golden"

# The tiny testbed of tests/conftest.py (shared with the other tests, built once), three steps.
OVERRIDES = [
    "model.hidden_size=128", "model.num_layers=4", "model.num_heads=2", "model.num_kv_heads=1", "model.intermediate_size=256",
    "model.sft_steps=120", "model.sft_batch_size=32", "model.max_len=128", "task.args.max_ops=3", "task.num_train=200", "task.num_eval=8",
    "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=48", "rollout.kv_cache_gib=0.125",
    "run.steps=3", "run.eval_every=2", "run.eval_samples=1", "output.progress=false",
    "drafter.warmup_steps=30", "drafter.batch_size=16", "controller.policy=every_n", "controller.distill_steps=4",
]


def is_timing(key: str) -> bool:
    """Keys whose values are wall-clock measurements (or derived from them)."""
    return key.startswith(("time/", "spec/proposer_")) or key == "gen/tokens_per_s"


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not is_timing(k)}


def run_smoke(kind: str, out: Path) -> list[dict]:
    """`codraft run --preset smoke` with the overrides above and `drafter.kind=kind`; its metrics."""
    sets = [a for o in OVERRIDES + [f"drafter.kind={kind}"] for a in ("--set", o)]
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "codraft", "run", "--preset", "smoke", *sets, "--out", str(out)], capture_output=True, text=True, timeout=1200, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"smoke run ({kind}) failed:\n{proc.stderr[-3000:]}")
    return [comparable(r) for r in read_jsonl(out / "metrics.jsonl")]


def golden_path(kind: str) -> Path:
    return GOLDEN_DIR / f"{kind}.json"


def hardware_now() -> dict:
    return describe(engine_mode="eager", omp_num_threads=1)


def write_golden(kind: str, records: list[dict]) -> Path:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    path = golden_path(kind)
    hw = hardware_now()
    path.write_text(json.dumps({"hardware": hw, "fingerprint": fingerprint(hw), "overrides": OVERRIDES, "records": records}, indent=1) + "\n")
    return path


def read_golden(kind: str) -> dict | None:
    path = golden_path(kind)
    return json.loads(path.read_text()) if path.is_file() else None


def differences(golden: list[dict], got: list[dict], values: bool = True) -> list[str]:
    """What differs between two metric logs (keys always; values when `values`), as readable lines."""
    out = []
    if len(golden) != len(got):
        out.append(f"{len(got)} records, golden has {len(golden)}")
    for i, (a, b) in enumerate(zip(golden, got)):
        a, b = comparable(a), comparable(b)  # a golden recorded before a key counted as timing still holds it
        where = f"record {i} (step {a.get('step')})"
        if set(a) != set(b):
            out.append(f"{where}: keys only in golden {sorted(set(a) - set(b))}, only now {sorted(set(b) - set(a))}")
        if not values:
            continue
        for key in sorted(set(a) & set(b)):
            x, y = a[key], b[key]
            same = x == y or (isinstance(x, float) and isinstance(y, (int, float)) and (math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)))
            if not same:
                out.append(f"{where}: {key} golden {x!r}, now {y!r}")
    return out


if __name__ == "__main__":
    import tempfile

    from codraft.drafter import DRAFTERS

    kinds = sys.argv[1:] or ["none", *DRAFTERS.names()]
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            records = run_smoke(kind, Path(tmp) / "run")
        print(f"{kind}: {len(records)} records -> {write_golden(kind, records)}")
