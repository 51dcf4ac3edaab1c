"""How often the swap gate picks the drafter that the report groups also call better.

    python -m analysis.swap_gate runs/policies-short-rich-warmstart runs/policies-short-rich-warmstart-peak

At each gated refresh the controller compares the candidate with the serving drafter on the gate
groups (swap if the candidate's teacher-forced acceptance length exceeds (1 - gate_margin) x the
serving one's, else refuse) and reports both
on other held-out prompt groups of the step (`drafter/alpha_before`, `drafter/alpha_after`; see
codraft/distill_data.py). A decision AGREES with the report groups when it swapped a candidate they
measure higher, or refused one they measure not higher. Agreement alone flatters the gate: when
most candidates are better, swapping every one agrees as often, so the table sets the gate's
agreement beside that of always swapping, and tests whether the gate's choice carries information
about the report groups' verdict: the share of candidates better on the report groups among those
it swapped and among those it refused, and Fisher's exact test (two-sided) on that 2 x 2 table.
Per configuration (`controller.policy`, its `controller.args`, and other controller fields
that vary, e.g. `gate_steps`) and over all runs given. Decisions are pooled as if independent,
though consecutive refreshes of one run share a serving drafter: read p as a screen. Refreshes whose distillation failed (no `drafter/alpha_after`) and runs with
`controller.gate = false` are left out.

Runs that log the gate's own numbers (`drafter/gate_before`, `drafter/gate_after`) get a second
table: what other swap rules would have decided on the same refreshes. A rule with margin m swaps
when the candidate's gate acceptance length exceeds (1 - m) x the serving drafter's
(`controller.gate_margin`); each rule is scored by its agreement with the report groups and by the
report groups' relative gain of the drafter it leaves serving (after / before - 1 when it swaps,
0 when it refuses), per decision, with a 95% t interval. A screen: a different decision would
change the run's later refreshes, which this cannot see.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import binomtest, fisher_exact

from analysis.cli import paths_cli
from analysis.policy_goal import label
from analysis.runs import RunData, find_run_dirs, load_run, number, read_hardware, varying_keys
from analysis.stats import t_interval
from analysis.tables import hardware_note

ALL = "all runs"
MARGINS = (0.0, 0.02, 0.05, 0.1)
"""Gate margins the counterfactual table scores (`controller.gate_margin`)."""


def gated_decisions(run: RunData) -> list[tuple[bool, bool]]:
    """(swapped, better on the report groups) for each refresh the gate decided."""
    if run.config_value("controller.gate", True) is False:
        return []
    out = []
    for r in run.steps:
        before, after = number(r.get("drafter/alpha_before")), number(r.get("drafter/alpha_after"))
        if r.get("controller/decision") in ("swap", "refuse") and before is not None and after is not None and math.isfinite(before) and math.isfinite(after):
            out.append((r["controller/decision"] == "swap", after > before))
    return out


def gate_readings(run: RunData) -> list[tuple[float, float, float, float]]:
    """(gate before, gate after, report before, report after) acceptance lengths of each gated
    refresh that logged the gate's own numbers."""
    if run.config_value("controller.gate", True) is False:
        return []
    keys = ("drafter/gate_before", "drafter/gate_after", "drafter/alpha_before", "drafter/alpha_after")
    out = []
    for r in run.steps:
        values = [number(r.get(k)) for k in keys]
        if r.get("controller/decision") in ("swap", "refuse") and all(v is not None and math.isfinite(v) and v > 0 for v in values):
            out.append(tuple(values))
    return out


def margin_table(runs: list[RunData]) -> list[str]:
    """Markdown lines scoring swap rules by margin, always swapping and the report groups' own choice
    on the refreshes of `runs` that logged the gate's numbers (no lines when none did)."""
    readings = [x for run in runs for x in gate_readings(run)]
    if not readings:
        return []
    rules = [(f"margin {m:g}", lambda gb, ga, m=m: ga > (1 - m) * gb) for m in MARGINS] + [("always swap", lambda gb, ga: True)]
    head = ["rule", "swaps", "agree with report", "report gain per decision [95% CI]"]
    lines = ["", f"Other swap rules on the same {len(readings)} refreshes (runs that log the gate's numbers; per decision, a screen):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, swaps in rules:
        chosen = [swaps(gb, ga) for gb, ga, _, _ in readings]
        agree = sum(s == (a > b) for s, (_, _, b, a) in zip(chosen, readings))
        gain = t_interval([a / b - 1 if s else 0.0 for s, (_, _, b, a) in zip(chosen, readings)])
        lines.append(f"| {name} | {sum(chosen)} | {agree / len(readings):.0%} | {gain.mean:+.2%} [{gain.low:+.2%}, {gain.high:+.2%}] |")
    best = t_interval([max(a / b - 1, 0.0) for _, _, b, a in readings])
    lines.append(f"| the report groups' own choice (a bound) | {sum(a > b for _, _, b, a in readings)} | 100% | {best.mean:+.2%} |")
    return lines


@dataclass(frozen=True)
class GateRow:
    config: str
    counts: Counter
    """(swapped, better on report) -> decisions."""

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    @property
    def agree(self) -> int:
        return self.counts[(True, True)] + self.counts[(False, False)]

    def cells(self) -> list[str]:
        n, k, c = self.n, self.agree, self.counts
        swapped, refused = c[(True, True)] + c[(True, False)], c[(False, True)] + c[(False, False)]
        better = c[(True, True)] + c[(False, True)]
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        share = lambda b, m: f"{b}/{m} ({b / m:.0%})" if m else "–"  # noqa: E731
        p = fisher_exact([[c[(True, True)], c[(True, False)]], [c[(False, True)], c[(False, False)]]]).pvalue if swapped and refused else math.nan
        return [f"`{self.config}`", str(n), f"{k / n:.0%} [{ci.low:.0%}, {ci.high:.0%}]", f"{better / n:.0%}",
                share(c[(True, True)], swapped), share(c[(False, True)], refused), f"{p:.2g}"]


def gate_rows(runs: list[RunData]) -> list[GateRow]:
    """One row per configuration (first-seen order), then the pooled row."""
    by_config: dict[str, Counter] = {}
    total: Counter = Counter()
    keys = varying_keys(runs)
    for run in runs:
        decisions = Counter(gated_decisions(run))
        if not decisions:
            continue
        by_config.setdefault(label(run, keys), Counter()).update(decisions)
        total.update(decisions)
    if not total:
        raise ValueError("no gated refresh among the runs given (no swap or refuse with drafter/alpha_before and drafter/alpha_after)")
    return [GateRow(c, n) for c, n in by_config.items()] + [GateRow(ALL, total)]


def markdown(rows: list[GateRow], hardware: str) -> str:
    head = ["configuration", "gated refreshes", "agree with report [95% CI]", "always swap would agree",
            "better on report: swapped", "better on report: refused", "Fisher p"]
    lines = [hardware, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    lines += ["", "A decision agrees when the report groups measure the swapped candidate higher than the serving drafter, or the refused one "
              "not higher; Clopper-Pearson interval. A gate that reads signal swaps a larger share of report-better candidates than it "
              "refuses (Fisher's exact test, two-sided, on swapped/refused x better/not). Decisions of all seeds pooled."]
    return "\n".join(lines)


def main(paths: list[Path]) -> str:
    dirs = [d for p in paths for d in find_run_dirs(p)]
    runs = [load_run(d) for d in dirs]
    return "\n".join([markdown(gate_rows(runs), hardware_note({d.name: read_hardware(d) for d in dirs}))] + margin_table(runs))


if __name__ == "__main__":
    paths_cli(__doc__, main)
