"""Staleness from RL drift: does a frozen drafter lose acceptance, how fast, and how does that
follow the KL of the policy from the one the drafter was distilled against?

    python -m analysis.staleness runs/staleness-drift [runs/policies ...] --out papers/2604.26779/staleness

Reads finished runs (any sweep directories). Per configuration (the swept values except the seed):
the measured acceptance length over early and late windows of steps (from summed counts, so every
verify step weighs the same), the change, `drafter/policy_kl` and `train/entropy` at the end, and
the slope of acceptance length against policy KL (least squares over the steps of every seed, with a
95% interval from the per-seed slopes), and the acceptance length over any further windows of steps
asked for (`--window 10:15`: steps 10-14, repeatable; e.g. the steps just before a task shift).
Means over seeds with 95% Student-t intervals. Writes `staleness.md`, `staleness.csv`, and two
plots: acceptance length against step and against `drafter/policy_kl` (mean over seeds with a
band; points per step for the KL plot). Every table names the hardware the runs ran on.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.runs import ABSENT_MEANS, RunData, find_run_dirs, is_finished, load_run, read_hardware, series, step_acceptance, varying_keys
from analysis.stats import SEED_KEY, t_interval
from analysis.tables import fmt
from codraft.acceptance import AcceptanceStats
from codraft.hardware import label
from codraft.io import atomic_write_text

WINDOW = 10  # steps per early / late window


def window_accept_len(run: RunData, steps: range) -> float:
    total = sum((step_acceptance(r) for r in run.steps if int(r["step"]) in steps), AcceptanceStats())
    return total.accept_len


def slope(run: RunData, x_key: str = "drafter/policy_kl") -> float:
    """Least-squares slope of the per-step acceptance length against `x_key` (NaN with < 3 points)."""
    xs, ys = [], []
    for r in run.steps:
        acc, x = step_acceptance(r), r.get(x_key)
        if acc.drafts and isinstance(x, (int, float)) and math.isfinite(x):
            xs.append(float(x))
            ys.append(acc.accept_len)
    if len(xs) < 3 or np.ptp(xs) == 0:
        return math.nan
    return float(np.polyfit(xs, ys, 1)[0])


def last_value(run: RunData, key: str) -> float:
    _, ys = series(run, key)
    return ys[-1] if ys else math.nan


@dataclass
class Config:
    values: dict[str, Any]
    runs: list[RunData] = field(default_factory=list)


def configurations(runs: list[RunData]) -> list[Config]:
    keys = [k for k in varying_keys(runs) if k != SEED_KEY]
    out: dict[tuple, Config] = {}
    for run in runs:
        values = {k: run.config_value(k, ABSENT_MEANS.get(k)) for k in keys}  # a field older runs lack: the value they ran with
        out.setdefault(tuple(map(repr, values.values())), Config(values)).runs.append(run)
    return list(out.values())


def window_key(steps: range) -> str:
    """The row key of a window's acceptance length, e.g. accept_steps_10_14."""
    return f"accept_steps_{steps.start}_{steps.stop - 1}"


def config_row(conf: Config, windows: tuple[range, ...] = ()) -> dict[str, Any]:
    n_steps = min(len(r.steps) for r in conf.runs)
    early, late = range(0, WINDOW), range(n_steps - WINDOW, n_steps)
    past = [w for w in windows if w.stop > n_steps]
    if past:
        raise ValueError(f"--window {past[0].start}:{past[0].stop} reaches past the {n_steps} steps the runs of {conf.values} have")
    per_seed = {
        "accept_early": [window_accept_len(r, early) for r in conf.runs],
        "accept_late": [window_accept_len(r, late) for r in conf.runs],
        "policy_kl_late": [last_value(r, "drafter/policy_kl") for r in conf.runs],
        "entropy_early": [series(r, "train/entropy")[1][0] if series(r, "train/entropy")[1] else math.nan for r in conf.runs],
        "entropy_late": [last_value(r, "train/entropy") for r in conf.runs],
        "slope_per_kl": [slope(r) for r in conf.runs],
    }
    per_seed["accept_change"] = [b - a for a, b in zip(per_seed["accept_early"], per_seed["accept_late"])]
    per_seed.update({window_key(w): [window_accept_len(r, w) for r in conf.runs] for w in windows})
    row = {**conf.values, "n_seeds": len(conf.runs), "steps": n_steps}
    for key, values in per_seed.items():
        iv = t_interval(values)
        row.update({f"{key}_mean": iv.mean, f"{key}_ci95_low": iv.low, f"{key}_ci95_high": iv.high})
    return row


COLUMNS = [("accept_early", "accept len, first {w} steps"), ("accept_late", "accept len, last {w} steps"),
           ("accept_change", "change"), ("policy_kl_late", "policy KL at the end"), ("entropy_early", "entropy, first step"),
           ("entropy_late", "entropy, last step"), ("slope_per_kl", "d accept len / d KL")]


def markdown(rows: list[dict[str, Any]], keys: list[str], hardware: str, windows: tuple[range, ...] = ()) -> str:
    columns = COLUMNS + [(window_key(w), f"accept len, steps {w.start}-{w.stop - 1}") for w in windows]

    def cell(row: dict[str, Any], key: str) -> str:
        mean, low, high = row[f"{key}_mean"], row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
        return fmt(mean) + (f" [{fmt(low)}, {fmt(high)}]" if math.isfinite(low) else "")

    head = "| " + " | ".join(keys + ["seeds"] + [t.format(w=WINDOW) for _, t in columns]) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1 + len(columns))]
    for row in rows:
        lines.append("| " + " | ".join([str(row[k]) for k in keys] + [str(row["n_seeds"])] + [cell(row, c) for c, _ in columns]) + " |")
    note = (f"Means over seeds with 95% Student-t intervals (none with one seed: an anecdote). Acceptance lengths from summed counts; "
            f"the slope is the least-squares slope of per-step acceptance length against `drafter/policy_kl`, per seed. Hardware: {hardware}.")
    return "\n".join(lines + ["", note])


def parse_window(text: str) -> range:
    """`START:END` -> the steps START .. END-1."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--window {text!r}: expected START:END, e.g. 10:15 for steps 10-14") from None
    if not 0 <= start < end:
        raise ValueError(f"--window {text!r}: needs 0 <= START < END")
    return range(start, end)


def analyse(paths: list[Path], out: Path, windows: tuple[range, ...] = ()) -> Path:
    from analysis.plots import plot_kl_acceptance, plot_staleness

    runs = [load_run(d) for p in paths for d in find_run_dirs(p) if is_finished(d)]
    if not runs:
        raise FileNotFoundError(f"no finished runs under {', '.join(map(str, paths))}")
    confs = configurations(runs)
    keys = list(confs[0].values)
    rows = [config_row(c, windows) for c in confs]
    machines = sorted({label(h) for h in (read_hardware(r.path) for r in runs) if h} or {"not recorded"})
    hardware = machines[0] if len(machines) == 1 else "DIFFERENT machines: " + "; ".join(machines)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "staleness.csv", buf.getvalue())
    atomic_write_text(out / "staleness.md", f"# Staleness from RL drift\n\n{len(runs)} runs.\n\n{markdown(rows, keys, hardware, windows)}\n")
    plot_staleness(runs, out / "accept_len_vs_step.png")
    plot_kl_acceptance(runs, out / "accept_len_vs_policy_kl.png")
    return out / "staleness.md"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", action="append", default=[], metavar="START:END", help="also the acceptance length over steps START..END-1 (repeatable)")
    args = parser.parse_args()
    try:
        windows = tuple(parse_window(w) for w in args.window)
        print(analyse(args.paths, args.out, windows).read_text())
    except ValueError as err:
        parser.error(str(err))
    sys.exit(0)
