"""Plots of run outputs (matplotlib, Agg, PNG). Each function takes loaded runs (or the rollout
benchmark's JSON) and an output path, draws one figure and returns the path.

    runs = [load_run(d) for d in find_run_dirs("runs/sweep")]
    plot_staleness(runs, "staleness.png")            # acceptance length per step, refreshes marked
    plot_position_acceptance(runs, "positions.png")  # acceptance rate per draft position
    plot_stage_times(runs, "stages.png")             # stacked seconds per step by stage
    plot_pareto(runs, "pareto.png")                  # mean acceptance vs distill+swap seconds
    plot_accuracy(runs, "accuracy.png")              # held-out accuracy and reward per step
    plot_rollout_bench("runs/bench_rollout.json", "bench.png")  # speedup vs running batch size

Runs are labelled by the config keys that differ between them (`policy=threshold seed=1`). Runs
that differ only in `run.seed` are one configuration, with one colour: curves over steps (and
acceptance per draft position) are drawn as their mean with a shaded 95% Student-t band (per step,
over the seeds that have the step; `analysis.stats.mean_curve`); a configuration with one run is a
plain line labelled "1 run". Bars and Pareto points stay one per run, line style telling seeds apart.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from analysis.runs import RunData, step_acceptance, accept_len_series, decision_steps, run_label, series, summarize, varying_keys  # noqa: E402
from analysis.stats import SEED_KEY, mean_curve  # noqa: E402
from codraft.metrics import STAGES  # noqa: E402
LINESTYLES = ["-", "--", ":", "-."]
STAGE_COLORS = {"prepare": "#9e9e9e", "gen": "#1f77b4", "reward": "#bcbd22", "logprob": "#ff7f0e",
                "train": "#2ca02c", "distill": "#d62728", "swap": "#9467bd"}
KIND_COLORMAPS = {"eagle3": "Blues", "mtp": "Oranges", "draft_model": "Greens"}


def _styles(runs: Sequence[RunData]) -> list[tuple[str, Any, str]]:
    """(label, colour, line style) per run: colour by everything but the seed, style by seed."""
    keys = varying_keys(runs)
    group_keys = [k for k in keys if k != SEED_KEY]
    keys = group_keys + [SEED_KEY] * (SEED_KEY in keys)  # the seed last in labels
    groups: list[str] = []
    seeds: dict[str, list[Any]] = {}
    out = []
    for run in runs:
        group = run_label(run, group_keys) if group_keys else ""
        if group not in groups:
            groups.append(group)
        seeds.setdefault(group, []).append(run.config_value(SEED_KEY))
    palette = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    seen: dict[str, int] = {}
    for run in runs:
        group = run_label(run, group_keys) if group_keys else ""
        i = seen[group] = seen.get(group, -1) + 1
        out.append((run_label(run, keys), palette(groups.index(group) % palette.N), LINESTYLES[i % len(LINESTYLES)]))
    return out


def _configurations(runs: Sequence[RunData]) -> list[tuple[str, Any, list[RunData]]]:
    """(label, colour, runs) per configuration (runs that differ only in the seed), in order of first
    appearance; the label says how many seeds the curve averages, or that it is one run."""
    keys = [k for k in varying_keys(runs) if k != SEED_KEY]
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run_label(run, keys) if keys else "", []).append(run)
    palette = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    out = []
    for i, (name, members) in enumerate(groups.items()):
        name = name or (members[0].name if len(members) == 1 else "all runs")
        label = f"{name} (1 run)" if len(members) == 1 else f"{name} (mean of {len(members)} seeds, 95% band)"
        out.append((label, palette(i % palette.N), members))
    return out


def _curve(ax, curves: list[tuple[list[Any], list[float]]], label: str, color: Any, **line: Any) -> dict[Any, float]:
    """One configuration's curve: a single run as it is, several as the mean per x with a shaded 95%
    t band; returns x -> the plotted y (empty when no curve has points)."""
    curves = [c for c in curves if c[0]]
    if not curves:
        return {}
    if len(curves) == 1:
        xs, ys = curves[0]
    else:
        xs, band = mean_curve(curves)
        ys = [iv.mean for iv in band]
        ax.fill_between(xs, [iv.low for iv in band], [iv.high for iv in band], color=color, alpha=0.2, linewidth=0)
    ax.plot(xs, ys, color=color, label=label, **line)
    return dict(zip(xs, ys))


def _figure(width: float = 10, height: float = 5) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax, handles=None, n: int = 0) -> None:
    """Legend inside the axes for a few entries, to the right of it for many."""
    kwargs = {"fontsize": 8, "framealpha": 0.9}
    if n > 6:
        kwargs.update(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.legend(handles=handles, **kwargs) if handles else ax.legend(**kwargs)


# ---------------------------------------------------------------------------------- per-run plots


def plot_staleness(runs: Sequence[RunData], path: Path) -> Path:
    """(a) Mean acceptance length per GRPO step, one curve per configuration (the mean over its seeds
    with a 95% band); drafter swaps (▲) and refused refreshes (×) marked on the step after which
    they happened (in any of the configuration's seeds)."""
    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for label, color, members in _configurations(runs):
        at = _curve(ax, [accept_len_series(r) for r in members], label, color, marker=".", markersize=4, linewidth=1.5)
        if not at:
            continue
        drawn += 1
        for decision, marker, size in (("swap", "^", 70), ("refuse", "x", 50)):
            pts = sorted({(s, at[s]) for r in members for s in decision_steps(r, decision) if s in at})
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=size, color=color, edgecolors="black" if marker == "^" else None, linewidths=0.8, zorder=3)
    if not drawn:
        _no_data(ax, "no speculative decoding in these runs (no spec/drafts recorded)")
    else:
        handles, _ = ax.get_legend_handles_labels()
        handles += [Line2D([], [], marker="^", linestyle="", color="white", markeredgecolor="black", markersize=8, label="drafter swapped after this step"),
                    Line2D([], [], marker="x", linestyle="", color="black", markersize=7, label="refresh refused (gate)")]
        _legend(ax, handles, len(handles))
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("mean acceptance length (tokens per verify step)")
        ax.grid(alpha=0.3)
    ax.set_title("Drafter staleness: acceptance length per step, by configuration")
    return _save(fig, path)


def plot_kl_acceptance(runs: Sequence[RunData], path: Path) -> Path:
    """(f) Acceptance length of each step against `drafter/policy_kl` (KL of the policy from the one
    the serving drafter was distilled against), one colour per configuration, every seed's steps as
    points with the configuration's least-squares line."""
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for label, color, members in _configurations(runs):
        pts = [(float(r["drafter/policy_kl"]), step_acceptance(r).accept_len) for run in members for r in run.steps
               if step_acceptance(r).drafts and isinstance(r.get("drafter/policy_kl"), (int, float)) and math.isfinite(r["drafter/policy_kl"])]
        if not pts:
            continue
        drawn += 1
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=10, color=color, alpha=0.5, label=label)
        if len(set(xs)) > 2:
            a, b = np.polyfit(xs, ys, 1)
            grid = np.linspace(min(xs), max(xs), 20)
            ax.plot(grid, a * grid + b, color=color, linewidth=1.5)
    if not drawn:
        _no_data(ax, "no drafter/policy_kl recorded in these runs")
    else:
        _legend(ax, n=drawn)
        ax.set_xlabel("KL(policy now || policy the drafter was distilled against), token mean")
        ax.set_ylabel("acceptance length (tokens per verify step)")
        ax.grid(alpha=0.3)
    ax.set_title("Acceptance against policy drift")
    return _save(fig, path)


def plot_position_acceptance(runs: Sequence[RunData], path: Path) -> Path:
    """(b) Per draft position i, the share of verify steps whose i-th drafted token was accepted
    (counts summed over the run), one curve per configuration (mean over seeds, 95% band)."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    drawn, kmax = 0, 0
    for label, color, members in _configurations(runs):
        curves = []
        for run in members:
            rates = summarize(run).pos_rates
            pts = [(i, r) for i, r in enumerate(rates, 1) if not math.isnan(r)]
            curves.append(([i for i, _ in pts], [r for _, r in pts]))
        at = _curve(ax, curves, label, color, marker="o")
        if at:
            drawn += 1
            kmax = max(kmax, max(at))
    if not drawn:
        _no_data(ax, "no per-position acceptance counts (spec/accepted_pos_<i>) in these runs")
    else:
        ax.set_xticks(range(1, kmax + 1))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("draft position i")
        ax.set_ylabel("acceptance rate at position i (accepted / verify steps)")
        ax.grid(alpha=0.3)
        _legend(ax, n=drawn)
    ax.set_title("Acceptance by draft position (whole run)")
    return _save(fig, path)


def plot_stage_times(runs: Sequence[RunData], path: Path) -> Path:
    """(c) Horizontal stacked bars: mean seconds per GRPO step in each stage, one bar per run."""
    labels = [label for label, _, _ in _styles(runs)]
    fig = _figure(10, 2.2 + 0.45 * max(1, len(runs)))
    ax = fig.add_subplot()
    if not runs:
        _no_data(ax, "no runs")
        return _save(fig, path)
    means = [summarize(run).mean_stage_s for run in runs]
    left = [0.0] * len(runs)
    ys = list(range(len(runs)))
    for stage in STAGES:
        widths = [0.0 if math.isnan(m[stage]) else m[stage] for m in means]
        if not any(widths):
            continue
        ax.barh(ys, widths, left=left, color=STAGE_COLORS[stage], label=stage, height=0.7)
        left = [a + b for a, b in zip(left, widths)]
    for y, total in zip(ys, left):
        ax.text(total, y, f" {total:.2f} s", va="center", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left + [1e-9]) * 1.15)
    ax.set_xlabel("seconds per GRPO step (mean over steps)")
    ax.set_title("Where a step's time goes, by stage")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=8, ncols=len(STAGES), loc="outside lower center", frameon=False)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: cost (x) no higher and acceptance (y) no lower,
    one of them strictly. Sorted by cost."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot_pareto(runs: Sequence[RunData], path: Path) -> Path:
    """(d) Mean acceptance length vs distill + swap seconds per run; the Pareto front (most
    acceptance for the least refresh cost) joined and labelled."""
    fig = _figure(9, 5.5)
    ax = fig.add_subplot()
    pts, styles = [], []
    for run, style in zip(runs, _styles(runs)):
        s = summarize(run)
        if s.accept_total.drafts:
            pts.append((s.distill_swap_s, s.accept_len_mean))
            styles.append(style)
    if not pts:
        _no_data(ax, "no speculative decoding in these runs")
    else:
        front = pareto_front(pts)
        for i, ((x, y), (label, color, _)) in enumerate(zip(pts, styles)):
            on = i in front
            ax.scatter([x], [y], s=110 if on else 45, color=color, edgecolors="black" if on else "none", linewidths=1.2, zorder=3, label=label)
        fx, fy = zip(*(pts[i] for i in front))
        ax.plot(fx, fy, color="black", linestyle="--", linewidth=1, alpha=0.7, zorder=2)
        ax.margins(x=0.08, y=0.12)
        mid = (min(x for x, _ in pts) + max(x for x, _ in pts)) / 2
        for i in front:  # label front points, on the side facing the middle of the plot
            right_half = pts[i][0] > mid
            ax.annotate(styles[i][0], pts[i], textcoords="offset points", xytext=(-8 if right_half else 8, 6), ha="right" if right_half else "left", fontsize=8)
        handles, _ = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="white", markeredgecolor="black", label="Pareto front"))
        _legend(ax, handles, len(handles))
        ax.set_xlabel("distill + swap seconds (whole run)")
        ax.set_ylabel("mean acceptance length (tokens per verify step)")
        ax.grid(alpha=0.3)
    ax.set_title("Acceptance vs refresh cost (front: more acceptance for fewer seconds)")
    return _save(fig, path)


def plot_accuracy(runs: Sequence[RunData], path: Path) -> Path:
    """(f) Held-out accuracy (evaluation steps and the final line) and mean training reward per step,
    one curve per configuration (mean over seeds, 95% band)."""
    fig = _figure(12, 4.8)
    ax_eval, ax_reward = fig.subplots(1, 2)
    for label, color, members in _configurations(runs):
        _curve(ax_eval, [series(r, "eval/accuracy", include_final=True) for r in members], label, color, marker="o", markersize=4)
        _curve(ax_reward, [series(r, "reward/mean") for r in members], label, color, linewidth=1.3)
    for ax, title, ylabel in ((ax_eval, "Held-out accuracy", "accuracy (share correct)"), (ax_reward, "Training reward", "mean reward per rollout")):
        if not ax.lines:
            _no_data(ax, f"no {title.lower()} recorded")
        else:
            ax.set_xlabel("GRPO step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        ax.set_title(title)
    if ax_reward.lines:
        _legend(ax_reward, n=len(ax_reward.lines))
    return _save(fig, path)


# ---------------------------------------------------------------------------------- rollout benchmark


def load_bench(source: Path | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rollout benchmark's targets (a JSON list as written by `analysis.bench_rollout`)."""
    if isinstance(source, (str, Path)):
        return json.loads(Path(source).read_text())
    return list(source)


def plot_rollout_bench(bench: Path | list[dict[str, Any]] | dict[str, Any], path: Path) -> Path:
    """(e) Measured speedup over plain decoding vs running batch size, one panel per target and one
    line per (drafter kind, k); kind `none` (k = 0) is the baseline at 1.0. The title names the
    machine when the file records it (`{"hardware": ..., "targets": [...]}`; older files are a bare list)."""
    data = bench if isinstance(bench, dict) else load_bench(bench)
    hardware = data.get("hardware") if isinstance(data, dict) else None
    targets = list(data.get("targets", [])) if isinstance(data, dict) else data
    fig = _figure(6 * max(1, len(targets)), 5)
    axes = fig.subplots(1, max(1, len(targets)), sharey=True, squeeze=False)[0]
    if not targets:
        _no_data(axes[0], "empty benchmark file")
        return _save(fig, path)
    for ax, target in zip(axes, targets):
        cells = [c for c in target.get("cells", []) if c.get("kind") != "none"]
        lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for c in cells:
            speedup = c.get("speedup")
            if isinstance(speedup, (int, float)) and math.isfinite(speedup):
                lines.setdefault((c["kind"], int(c["k"])), []).append((int(c["batch"]), float(speedup)))
        kinds = sorted({kind for kind, _ in lines})
        ks = sorted({k for _, k in lines})
        for (kind, k), pts in sorted(lines.items()):
            cmap = matplotlib.colormaps[KIND_COLORMAPS.get(kind, ["Purples", "Greys", "Reds"][kinds.index(kind) % 3])]
            shade = 0.45 + 0.5 * (ks.index(k) / max(1, len(ks) - 1))
            pts.sort()
            ax.plot(*zip(*pts), marker="o", color=cmap(shade), label=f"{kind} k={k}")
        batches = sorted({int(c["batch"]) for c in target.get("cells", [])})
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="plain decoding (none, k=0)")
        if batches:
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
        params = target.get("parameters")
        ax.set_title(f"{target.get('name', '?')} target" + (f" ({params / 1e6:.1f}M parameters)" if isinstance(params, (int, float)) else ""))
        ax.set_xlabel("running batch size (sequences)")
        ax.grid(alpha=0.3)
        if not lines:
            ax.text(0.5, 0.5, "no speculative cells", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("speedup over plain decoding (tokens/s ratio)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    from codraft.hardware import label

    fig.suptitle("Rollout speedup vs running batch size, by drafter kind and k" + (f"\n{label(hardware)}" if hardware else ""))
    return _save(fig, path)
