"""A seeded smoke run per drafter kind writes the metrics it wrote when its golden was recorded
(step for step, timing keys left out). Goldens and how to rewrite them: tests/smoke_golden.py.

On the hardware a golden was recorded on, every value must match (floats to 1e-6 relative); on
other hardware (another CPU type computes other bf16 results) the metric keys of every record must.
"""
import pytest

from smoke_golden import differences, hardware_now, read_golden, run_smoke

from codraft.drafter import DRAFTERS
from codraft.hardware import fingerprint

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind", ["none", *DRAFTERS.names()])
def test_smoke_run_matches_golden(kind, tiny_policy_dir, tmp_path):
    golden = read_golden(kind)
    if golden is None:
        pytest.fail(f"no golden for drafter kind {kind!r}: record one with `python tests/smoke_golden.py {kind}`")
    got = run_smoke(kind, tmp_path / "run")
    same_machine = golden["fingerprint"] == fingerprint(hardware_now())
    problems = differences(golden["records"], got, values=same_machine)
    assert not problems, "\n".join(problems[:20])
    if not same_machine:
        pytest.skip(f"keys match; values recorded on {golden['fingerprint']}, not comparable on {fingerprint(hardware_now())}")
