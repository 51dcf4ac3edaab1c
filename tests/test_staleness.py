"""analysis/staleness.py on synthetic runs whose acceptance falls linearly with a known policy KL."""
import math
from pathlib import Path

import pytest

from test_analysis import write_run


def drifting_run(run_dir: Path, policy: str, seed: int, steps: int = 24, overrides: tuple[str, ...] = ()) -> Path:
    """Acceptance length 2.5 - 2 * KL, KL growing 0.01 per step since the last swap (every_n: every step)."""
    records, since = [], 0
    for s in range(steps):
        kl = 0.01 * since
        drafts = 1000
        accepted = round(drafts * (1.5 - 2.0 * kl))
        decision = "swap" if policy == "every_n" else "keep"
        records.append({
            "step": s, "reward/mean": 0.3, "spec/drafts": drafts, "spec/draft_tokens": 3 * drafts, "spec/accepted": accepted,
            "spec/accepted_pos_0": accepted // 2, "spec/accepted_pos_1": accepted // 3, "spec/accepted_pos_2": accepted - accepted // 2 - accepted // 3,
            "controller/decision": decision, "drafter/policy_kl": kl, "train/entropy": 0.2 - 0.001 * s + 0.001 * seed,
            "time/step_s": 1.0, "time/gen_s": 0.5,
        })
        since = 0 if decision == "swap" else since + 1
    return write_run(run_dir, [f"controller.policy={policy}", "drafter.kind=eagle3", f"run.seed={seed}", f"run.steps={steps}", *overrides], records, {"eval/accuracy": 0.5})


def test_staleness_table_recovers_the_planted_slope_and_decay(tmp_path):
    from analysis.staleness import analyse

    root = tmp_path / "sweep"
    for policy in ("never", "every_n"):
        for seed in (0, 1):
            drifting_run(root / f"policy-{policy}__seed-{seed}", policy, seed)
    md = analyse([root], tmp_path / "out")
    rows = {r.split("|")[1].strip(): r for r in md.read_text().splitlines() if r.startswith("| ") and "---" not in r and "policy" not in r.split("|")[1]}
    never = [c.strip() for c in rows["never"].split("|")]
    # cells: "", policy, seeds, early, late, change, KL at the end, entropy first, entropy last, slope
    assert never[2] == "2"
    assert float(never[3].split()[0]) == pytest.approx(2.5 - 2 * 0.045, abs=0.01)  # mean KL over steps 0-9 is 0.045
    assert float(never[6].split()[0]) == pytest.approx(0.23, abs=1e-6)  # KL at the end (23 steps since the warm start)
    assert float(never[8].split()[0]) == pytest.approx(0.1775, abs=1e-3)  # entropy at the end, mean of two seeds
    assert float(never[9].split()[0]) == pytest.approx(-2.0, abs=0.01)  # the planted slope
    every = [c.strip() for c in rows["every_n"].split("|")]
    assert float(every[5].split()[0]) == pytest.approx(0.0, abs=1e-9)  # no decay when refreshed every step
    assert (tmp_path / "out" / "accept_len_vs_policy_kl.png").stat().st_size > 1000
    assert "Hardware:" in md.read_text() and math.isfinite(float(never[3].split()[0]))


def test_runs_of_one_policy_with_and_without_a_policy_field_are_two_configurations(tmp_path):
    """Two sweeps read together, `drift` and `drift` with `baseline = "peak"` (a field only the
    second sets): two rows of two seeds each, not one row of four."""
    from analysis.staleness import analyse

    for seed in (0, 1):
        drifting_run(tmp_path / "first" / f"policy-drift__seed-{seed}", "drift", seed)
        drifting_run(tmp_path / "peak" / f"baseline-peak__seed-{seed}", "drift", seed, overrides=("controller.args.baseline=peak",))
    md = analyse([tmp_path / "first", tmp_path / "peak"], tmp_path / "out").read_text()
    table = [[c.strip() for c in r.split("|")[1:-1]] for r in md.splitlines() if r.startswith("| ")]
    assert table[0][:2] == ["controller.args.baseline", "seeds"]
    assert [row[:2] for row in table[1:]] == [["None", "2"], ["peak", "2"]], md  # None: the policy's default


def test_a_window_asked_for_adds_its_acceptance_column(tmp_path):
    """`--window 10:15`: the acceptance length over steps 10-14, from summed counts, after the usual columns."""
    from analysis.staleness import analyse, parse_window

    for seed in (0, 1):
        drifting_run(tmp_path / "sweep" / f"policy-never__seed-{seed}", "never", seed)
    md = analyse([tmp_path / "sweep"], tmp_path / "out", (parse_window("10:15"),)).read_text()
    head, row = [[c.strip() for c in r.split("|")[1:-1]] for r in md.splitlines() if r.startswith("| ") and "---" not in r]
    assert head[-1] == "accept len, steps 10-14"
    assert float(row[-1].split()[0]) == pytest.approx(2.5 - 2 * 0.12, abs=0.004)  # mean KL over steps 10-14 is 0.12 (9-13: 2.27, 11-15: 2.25)
    with pytest.raises(ValueError, match="START < END"):
        parse_window("15:10")
    with pytest.raises(ValueError, match="reaches past the 24 steps"):
        analyse([tmp_path / "sweep"], tmp_path / "out", (parse_window("10:30"),))
