"""How often the swap gate picks the drafter that the report groups also call better.

    python -m analysis.swap_gate runs/policies-short-rich-warmstart runs/policies-short-rich-warmstart-peak

At each gated refresh the controller compares the candidate with the serving drafter on the gate
groups (swap if the candidate's teacher-forced acceptance is higher, else refuse) and reports both
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
from analysis.tables import hardware_note

ALL = "all runs"


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
    return markdown(gate_rows([load_run(d) for d in dirs]), hardware_note({d.name: read_hardware(d) for d in dirs}))


if __name__ == "__main__":
    paths_cli(__doc__, main)
