"""The refresh-policy goal checked from finished runs: every configuration against every-step
refresh (the reference) and the frozen drafter (the floor), paired seed by seed.

    python -m analysis.policy_goal runs/policies-short
    python -m analysis.policy_goal runs/smoke-policies-shift runs/smoke-drift-tuning   # same scenario, same seeds

A configuration is `controller.policy` plus the `controller.args` its runs set (from config.toml),
e.g. `drift (threshold=0.05)`. Per seed, with A the mean acceptance length over the run (summed
counts), C the distill + swap seconds and R the refreshes (swapped or refused):

    vs reference = A / A_reference - 1        cost share = C / C_reference        vs floor = A / A_floor - 1
    refresh share = R / R_reference  (the cost share in counts: it holds when runs shared the machine
                                      and their seconds do not compare; every refresh distils alike)

and each column is the mean with a 95% Student-t interval over the seeds that both runs finished.
A configuration whose controller fields other than the policy and its args differ between the runs given (e.g.
`drift (gate_margin=0.05)`) is paired with the reference and floor of the same fields when they are
among the runs, else with the plain ones, else with those whose fields agree most; the last column names them.
The goal (issue 16): within 5% of the reference, at most 30% of its cost, at least 15% above the
floor. A goal is "met" when the mean meets it and "met at 95%" when the whole interval does.
Under the goal table, each configuration of an adaptive policy is paired with each one given before
it of the same policy (acceptance length / the other's - 1 over the seeds both finished).
The runs given should share one scenario; the table names the machines they ran on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.cli import paths_cli
from analysis.runs import ABSENT_MEANS, POLICY_ARGS, RunData, find_run_dirs, load_run, read_hardware, summarize, varying_keys
from analysis.stats import Interval, t_interval
from analysis.tables import hardware_note

REFERENCE, FLOOR = "every_n", "never"
WITHIN, COST, ABOVE = -0.05, 0.30, 0.15
"""The goal: relative acceptance against the reference >= WITHIN, cost share <= COST, relative
acceptance against the floor >= ABOVE."""


REFRESH_ONLY = frozenset(f"controller.{f}" for f in ("distill_steps", "distill_lr", "distill_tokens", "buffer_steps", "teacher_top_k",
                                                     "reward_weighting", "gate", "gate_margin", "gate_steps"))
"""Controller fields that act only when a drafter is refreshed: a frozen drafter's (`never`'s) runs
that differ in them are the same configuration (seeds 0-2 of one sweep pool with 3-5 of another)."""


def setting(run: RunData, keys: Sequence[str] = ()) -> dict[str, object]:
    """The controller fields among `keys` (those that vary between the runs compared) other than the
    policy and its args, e.g. {"gate_margin": 0.05}; each left out where it holds the value runs had
    before the field existed (`ABSENT_MEANS`: gate_steps = 1, gate_margin = 0, distill_lr = 0), and for the floor
    (`never`) the fields that act only on a refresh (`REFRESH_ONLY`)."""
    frozen = run.config_value("controller.policy", "?") == FLOOR
    out = {}
    for key in keys:
        if frozen and key in REFRESH_ONLY:
            continue
        if key.startswith("controller.") and not key.startswith(POLICY_ARGS) and key != "controller.policy":
            value = run.config_value(key, ABSENT_MEANS.get(key))
            if key not in ABSENT_MEANS or value != ABSENT_MEANS[key]:
                out[key.removeprefix("controller.")] = value
    return out


def label(run: RunData, keys: Sequence[str] = ()) -> str:
    """`policy` or `policy (key=value, ...)` with the controller.args the run set and its `setting`."""
    args = {**dict(sorted(run.config.get("controller", {}).get("args", {}).items())), **setting(run, keys)}
    policy = run.config_value("controller.policy", "?")
    return f"{policy} ({', '.join(f'{k}={v}' for k, v in args.items())})" if args else policy


@dataclass(frozen=True)
class GoalRow:
    """One configuration against the reference and the floor, over its paired seeds."""

    config: str
    seeds: int
    accept_len: Interval
    vs_reference: Interval
    cost_share: Interval
    vs_floor: Interval
    refresh_share: Interval
    against: tuple[str, str] = (REFERENCE, FLOOR)
    """The reference and floor configurations it was paired with."""
    accept_by_seed: tuple[tuple[int, float], ...] = ()
    """Mean acceptance length of each seed it finished (all of them, paired or not)."""
    policy: str = ""
    """Its `controller.policy`."""

    def verdicts(self) -> list[str]:
        """Per goal: "met at 95%", "met" (the mean only) or "missed"."""
        checks = [(self.vs_reference, lambda x: x >= WITHIN, "low"), (self.cost_share, lambda x: x <= COST, "high"),
                  (self.vs_floor, lambda x: x >= ABOVE, "low")]
        out = []
        for iv, ok, bound in checks:
            if not iv.n or not ok(iv.mean):
                out.append("missed" if iv.n else "–")
            else:
                out.append("met at 95%" if iv.n > 1 and ok(getattr(iv, bound)) else "met")
        return out


def goal_rows(runs: list[RunData]) -> list[GoalRow]:
    """One row per configuration (the reference's and the floor's included), in first-seen order.
    A configuration is compared with the reference (floor) of the same `setting` when one is among
    the runs (`drift (gate_margin=0.05)` with `every_n (gate_margin=0.05)`), else with the plain one,
    else with the nearest (`match`); labels show every setting that varies, so the last column says
    when a pair differs in more than the policy."""
    by_config: dict[str, dict[int, tuple[float, float, int]]] = {}
    plain: dict[tuple[str, tuple], str] = {}
    """(policy, setting) -> the configuration of that policy run without controller.args."""
    settings: dict[str, tuple] = {}
    policies: dict[str, str] = {}
    runs = [r for r in runs if r.finished]
    keys = varying_keys(runs)
    for run in runs:
        s = summarize(run)
        name, own = label(run, keys), tuple(setting(run, keys).items())
        settings[name], policies[name] = own, run.config_value("controller.policy", "?")
        if not run.config.get("controller", {}).get("args"):
            plain[(policies[name], own)] = name
        by_config.setdefault(name, {})[int(run.config_value("run.seed", 0))] = (s.accept_len_mean, s.distill_swap_s, s.swaps + s.refusals)

    def match(policy: str, name: str) -> str:
        """The `policy` configuration with `name`'s setting, else the plain one, else the one whose
        setting agrees with `name`'s on the most fields (the first given on a tie): `drift
        (distill_steps=30, gate_margin=0.05)` against `every_n (distill_steps=15, gate_margin=0.05)`,
        `never` (no setting) against the first `every_n`. The last column names the pair."""
        found = plain.get((policy, settings[name])) or plain.get((policy, ()))
        others = [(c, dict(own)) for (p, own), c in plain.items() if p == policy] if found is None else []
        if others:
            mine = dict(settings[name])
            found = max(others, key=lambda other: sum(other[1].get(k, object()) == v for k, v in mine.items()))[0]
        if found is None:
            raise ValueError(f"no finished `{policy}` run to compare `{name}` with (configurations: {', '.join(f'`{c}`' for c in by_config)}): "
                             f"the goal is measured against `{REFERENCE}` and `{FLOOR}` of the same seeds")
        return found

    rows = []
    for name, seeds in by_config.items():
        against = (match(REFERENCE, name), match(FLOOR, name))
        ref, floor = by_config[against[0]], by_config[against[1]]
        paired = [s for s in seeds if s in ref and s in floor]

        def ratio(i: int, base: dict[int, tuple[float, float, int]], minus: float = 0.0) -> Interval:
            """t interval over the paired seeds of this configuration's field i / base's - minus."""
            return t_interval(seeds[s][i] / base[s][i] - minus if base[s][i] > 0 else float("nan") for s in paired)

        rows.append(GoalRow(name, len(paired), t_interval(seeds[s][0] for s in paired), ratio(0, ref, 1.0), ratio(1, ref),
                            ratio(0, floor, 1.0), ratio(2, ref), against, tuple((s, v[0]) for s, v in seeds.items()), policies[name]))
    return rows


def between(rows: list[GoalRow]) -> list[tuple[str, str, Interval]]:
    """Each configuration of an adaptive policy against each one given before it of the same policy
    (`drift (distill_steps=30)` against `drift`): acceptance length / the other's - 1 per shared seed."""
    adaptive = [r for r in rows if r.policy not in (REFERENCE, FLOOR)]
    out = []
    for i, row in enumerate(adaptive):
        mine = dict(row.accept_by_seed)
        for other in adaptive[:i]:
            theirs = dict(other.accept_by_seed)
            if other.policy == row.policy and len(set(mine) & set(theirs)) > 1:
                out.append((row.config, other.config, t_interval(mine[s] / theirs[s] - 1 for s in mine if s in theirs)))
    return out


def percent(iv: Interval, signed: bool = True) -> str:
    if not iv.n:
        return "–"
    f = "{:+.1f}%" if signed else "{:.1f}%"
    spread = f" [{f.format(100 * iv.low)}, {f.format(100 * iv.high)}]" if iv.n > 1 else " (1 seed: anecdote)"
    return f.format(100 * iv.mean) + spread


def markdown(rows: list[GoalRow], hardware: str) -> str:
    """The goal table, after `hardware` (`analysis.tables.hardware_note`'s sentence)."""
    head = ["configuration", "paired seeds", "accept len", f"vs {REFERENCE}", "cost share", f"vs {FLOOR}", "refresh share",
            f"within {-WITHIN:.0%}", f"cost <= {COST:.0%}", f">= +{ABOVE:.0%}", "compared with"]
    lines = [hardware, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r.config}`", str(r.seeds), r.accept_len.text(), percent(r.vs_reference), percent(r.cost_share, signed=False),
                 percent(r.vs_floor), percent(r.refresh_share, signed=False), *r.verdicts(), " / ".join(f"`{c}`" for c in r.against)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Per seed: acceptance length (mean over the run) / `{REFERENCE}`'s - 1, distill + swap seconds / "
              f"`{REFERENCE}`'s, acceptance length / `{FLOOR}`'s - 1, refreshes (swaps + refusals) / `{REFERENCE}`'s (the configurations the last column names); mean [95% Student-t interval] over the seeds all "
              "three finished. \"met\": the mean meets the goal; \"met at 95%\": the whole interval does; the cost goal is judged on seconds."]
    pairs = between(rows)
    if pairs:
        lines += ["", "| configuration | against | shared seeds | accept len, paired |", "|---|---|---|---|"]
        lines += [f"| `{a}` | `{b}` | {iv.n} | {percent(iv)} |" for a, b, iv in pairs]
        lines += ["", "Configurations of one policy against each other: acceptance length / the other's - 1 over the seeds both finished, mean [95% Student-t interval]."]
    return "\n".join(lines)


def main(paths: list[Path]) -> str:
    dirs = [d for p in paths for d in find_run_dirs(p)]
    rows = goal_rows([load_run(d) for d in dirs])
    return markdown(rows, hardware_note({d.name: read_hardware(d) for d in dirs}))


if __name__ == "__main__":
    paths_cli(__doc__, main)
