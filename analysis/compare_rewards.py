"""Overlay the reward curves of two runs from the same seed (e.g. without and with speculation) and test them.

    codraft compare-rewards runs/plain runs/eagle3 --out rewards.png

Speculative decoding is lossless: it samples from the policy's own distribution, so a run with a
drafter must train like one without. The two runs draw different random numbers, so their
rollouts differ one by one. What must agree is the distribution. The test pairs the two runs'
mean rewards step by step:
- a Wilcoxon signed-rank test on the per-step differences (two-sided);
- the mean difference with a 95% t-interval.
The statement is "no detectable difference at the 5% level", not proof of equality. Only step 0
compares samples of one policy: from then on each run follows its own trajectory, so a policy that
drifted a little worse stays worse for many steps and the per-step differences are not
independent. The test then rejects more often than 5% even when both samplers are exact: read a
rejection as "look closer" (more seeds, `codraft check-lossless`), not as proof of bias. The exact,
token-level check is `codraft check-lossless` (chi-square per position).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from codraft.cliargs import Command

from analysis.runs import load_run, run_label, series, varying_keys

ALPHA = 0.05


@dataclass
class CompareArgs:
    """Overlay two runs' reward curves and test whether they differ (paired by step)."""

    a: Annotated[Path, tyro.conf.Positional]
    """First run directory (e.g. without speculation)."""
    b: Annotated[Path, tyro.conf.Positional]
    """Second run directory (e.g. with a drafter), same seed and steps."""
    out: Path = Path("rewards.png")
    """Where the overlay plot is written (PNG)."""
    key: str = "reward/mean"
    """Per-step metric to compare."""


def compare(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired comparison of two per-step series of equal length."""
    from scipy.stats import t, wilcoxon

    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    p = float(wilcoxon(diffs).pvalue) if any(diffs) else 1.0
    return {"steps": n, "mean_a": sum(a) / n, "mean_b": sum(b) / n, "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "wilcoxon_p": p}


def cmd_compare(args: CompareArgs) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    runs = [load_run(args.a), load_run(args.b)]
    keys = varying_keys(runs)
    curves = [series(r, args.key) for r in runs]  # (steps, values)
    common = sorted(set(curves[0][0]) & set(curves[1][0]))
    if len(common) < 2:
        raise SystemExit(f"compare-rewards: the runs share {len(common)} steps with {args.key!r}; need at least 2")
    values = [[dict(zip(*c))[s] for s in common] for c in curves]
    stats = compare(*values)
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    for run, (steps, ys) in zip(runs, curves):
        ax.plot(steps, ys, marker=".", label=run_label(run, keys))
    ax.set_xlabel("GRPO step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(args.key)
    verdict = "no detectable difference" if stats["wilcoxon_p"] >= ALPHA else "DIFFERENT"
    ax.set_title(f"{args.key}: paired Wilcoxon p = {stats['wilcoxon_p']:.2f} over {stats['steps']} steps ({verdict} at {ALPHA:.0%})")
    ax.legend()
    ax.grid(alpha=0.3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="png")
    print(
        f"{args.key} over {stats['steps']} shared steps: mean {stats['mean_a']:.4f} ({runs[0].name}) vs {stats['mean_b']:.4f} ({runs[1].name}); "
        f"difference {stats['mean_diff']:+.4f} (95% CI {stats['ci_low']:+.4f} .. {stats['ci_high']:+.4f}); "
        f"paired Wilcoxon p = {stats['wilcoxon_p']:.3f}: {verdict} at the {ALPHA:.0%} level"
    )
    print(f"wrote {args.out}")
    return 0


COMMAND = Command("compare-rewards", CompareArgs, cmd_compare)
