"""analysis/swap_gate.py on synthetic runs with hand-counted gate decisions."""
import math

import pytest

from test_analysis import step_record, write_run


def gated_run(root, policy, seed, decisions):
    """`decisions`: (decision, alpha_before, alpha_after[, gate_before, gate_after]) per step; None
    alphas for a failed distillation; the gate's numbers only where given (newer runs log them)."""
    records = []
    for step, (decision, before, after, *gate) in enumerate(decisions):
        rec = step_record(step, 100, 150, decision, distill_s=1.0, swap_s=0.1)
        if before is not None:
            rec.update({"drafter/alpha_before": before, "drafter/alpha_after": after})
        if gate:
            rec.update({"drafter/gate_before": gate[0], "drafter/gate_after": gate[1]})
        records.append(rec)
    return write_run(root / f"{policy}__seed-{seed}", [f"controller.policy={policy}", f"run.seed={seed}"], records, {"eval/accuracy": 0.5})


def fisher_two_sided(a, b, c, d):
    """Fisher's exact test from the hypergeometric law: tables as likely as or less likely than the seen one."""
    row, col, n = a + b, a + c, a + b + c + d
    prob = lambda x: math.comb(col, x) * math.comb(n - col, row - x) / math.comb(n, row)  # noqa: E731
    seen = prob(a)
    return sum(prob(x) for x in range(max(0, row + col - n), min(row, col) + 1) if prob(x) <= seen * (1 + 1e-9))


def test_agreement_always_swap_and_association_hand_counted(tmp_path):
    from analysis.swap_gate import main

    # every_n: 8 swaps better on report, 2 swaps worse, 1 refusal better, 9 refusals not better (one a tie)
    steps = [("swap", 2.0, 2.2)] * 8 + [("swap", 2.0, 1.9)] * 2 + [("refuse", 2.0, 2.1)] + [("refuse", 2.0, 1.8)] * 8 + [("refuse", 2.0, 2.0)]
    steps += [("refuse", None, None), ("keep", 2.0, 2.5)]  # a failed distillation and a kept step: not gate decisions
    gated_run(tmp_path, "every_n", 0, steps)
    gated_run(tmp_path, "never", 0, [("keep", None, None)] * 3)  # no gated refresh: no row
    lines = [line for line in main([tmp_path]).splitlines() if line.startswith("| `")]
    cells = {c[0].strip("`"): c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in lines)}
    assert set(cells) == {"every_n", "all runs"}
    row = cells["every_n"]
    assert row[1] == "20"
    assert row[2].startswith("85% [")  # 8 + 9 of 20 agree
    assert row[3] == "45%"  # 9 of 20 candidates better on the report groups: always swapping agrees 45%
    assert row[4] == "8/10 (80%)" and row[5] == "1/10 (10%)"
    assert float(row[6]) == pytest.approx(fisher_two_sided(8, 2, 1, 9), rel=0.01)
    assert cells["all runs"][1:] == row[1:]


def test_runs_without_a_gate_are_left_out_and_nothing_gated_is_an_error(tmp_path):
    from analysis.swap_gate import main

    run = gated_run(tmp_path, "every_n", 0, [("swap", 2.0, 1.0)] * 3)
    config = run / "config.toml"
    config.write_text(config.read_text().replace("gate = true", "gate = false"))
    with pytest.raises(ValueError, match="no gated refresh"):
        main([tmp_path])


def test_other_margins_are_scored_on_the_logged_gate_numbers_hand_counted(tmp_path):
    from analysis.swap_gate import main

    gated_run(tmp_path, "every_n", 0, [("swap", 2.0, 2.0)] * 3)  # an older run: no gate numbers, no effect on the table
    steps = [
        ("swap", 2.0, 2.2, 2.0, 2.1),     # report +10%; every rule swaps
        ("refuse", 2.0, 2.1, 2.0, 1.98),  # report +5%; gate -1%: margin 0 refuses, 0.02 and up swap
        ("refuse", 2.0, 1.8, 2.0, 1.85),  # report -10%; gate -7.5%: only margin 0.1 (and always) swap
        ("refuse", 2.0, 2.0, 2.0, 1.5),   # report tie; gate -25%: only always swaps
    ]
    gated_run(tmp_path, "drift", 0, steps)
    text = main([tmp_path])
    assert "same 4 refreshes" in text
    rows = {c[0]: c[1:] for c in ([x.strip() for x in line.split("|")[1:-1]] for line in text.splitlines()) if c and c[0].startswith(("margin", "always", "the report"))}
    assert rows["margin 0"][:2] == ["1", "75%"] and rows["margin 0"][2].startswith("+2.50%")
    assert rows["margin 0.02"][:2] == ["2", "100%"] and rows["margin 0.02"][2].startswith("+3.75%")
    assert rows["margin 0.05"][:2] == ["2", "100%"]
    assert rows["margin 0.1"][:2] == ["3", "75%"] and rows["margin 0.1"][2].startswith("+1.25%")
    assert rows["always swap"][:2] == ["4", "50%"] and rows["always swap"][2].startswith("+1.25%")
    assert rows["the report groups' own choice (a bound)"] == ["2", "100%", "+3.75%"]


def test_no_margin_table_without_the_gate_numbers(tmp_path):
    from analysis.swap_gate import main

    gated_run(tmp_path, "every_n", 0, [("swap", 2.0, 2.2), ("refuse", 2.0, 1.9)])
    assert "Other swap rules" not in main([tmp_path])
