"""A self-contained HTML report of one run or of a sweep: tables, plots (PNG embedded as base64
data URIs) and the configs that produced them, in one file that opens anywhere without a server.

    codraft report runs/smoke                                   # writes runs/smoke/report.html
    codraft report runs/policies --out /tmp/policies.html       # a sweep directory
    codraft report runs/policies --bench runs/bench_rollout.json
    python -m analysis.report runs/policies

A directory is a sweep when it holds sweep.json or subdirectories with metrics.jsonl; otherwise it
must be a run directory. The page holds: the hardware the runs ran on (their hardware.json); the
results table (one row per run); for a sweep, the table per configuration (the swept values but
the seed: mean and 95% Student-t interval over its seeds, "1 seed: anecdote" with one) and, when
the grid names a baseline, the paired differences against it (`analysis.stats`); every run's
summary (raw counts, totals, derived figures); the staleness, per-position acceptance, stage-time,
Pareto and accuracy plots (curves of a configuration's seeds as their mean with a 95% band); the
rollout-benchmark plot when `--bench` is given; and each run's config.toml (and the sweep grid)
in collapsible blocks.
"""
from __future__ import annotations

import base64
import html
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from analysis.runs import RunData, find_run_dirs, load_run, read_hardware, summarize, summary_row, varying_keys
from analysis.stats import SEED_KEY, configuration_rows, metrics_for, result_sections, seeds_note
from analysis.tables import cell, column_title, hardware_note
from codraft.io import atomic_write_text
from codraft.cliargs import Command

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1240px;
       padding: 1.2em 2em 3em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; font-size: 0.92em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #d6d6d6; padding: 0.28em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f1f3f5; white-space: normal; min-width: 3.2em; vertical-align: bottom; }
td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #e3e3e3; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; }
details { margin: 0.3em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.82em; border: 1px solid #e3e3e3; }
.note { color: #555; font-size: 0.9em; }
"""

MAIN_COLUMNS = ["steps", "accept_len_first", "accept_len_mean", "accept_len_last", "swaps", "refusals",
                "distill_swap_s", "gen_s_per_step", "step_s_mean", "wall_s", "eval_first", "eval_last"]

PLOTS = [  # (function in analysis.plots, heading, caption); matplotlib is imported only when a report is built
    ("plot_staleness", "Drafter staleness",
     "Mean acceptance length (1 + accepted / drafts) of each step's rollouts. ▲ marks steps after which a refreshed "
     "drafter was swapped in (its effect shows from the next step), × a refresh whose candidate was refused."),
    ("plot_position_acceptance", "Acceptance by draft position",
     "Share of verify steps whose i-th drafted token was accepted, from counts summed over the whole run."),
    ("plot_stage_times", "Stage times",
     "Mean seconds per GRPO step spent in each stage; distill and swap are averaged over all steps, not only refresh steps."),
    ("plot_pareto", "Acceptance vs refresh cost",
     "Each run's mean acceptance length against the seconds it spent distilling and swapping drafters; outlined points form "
     "the Pareto front (no other run has more acceptance for fewer seconds)."),
    ("plot_accuracy", "Accuracy and reward",
     "Held-out accuracy at evaluation steps (the last point is the final evaluation) and the mean training reward per step."),
]


def is_sweep_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "sweep.json").is_file() or (not (path / "metrics.jsonl").is_file() and path.is_dir()
                                                and any((p / "metrics.jsonl").is_file() for p in path.iterdir()))


def html_table(rows: list[dict[str, Any]], columns: list[str], text_columns: set[str] = frozenset(), runs_column: str = "n_seeds") -> str:
    def td(row: dict[str, Any], column: str, value: Any) -> str:
        klass = ' class="text"' if column in text_columns or isinstance(value, str) else ""
        return f"<td{klass}>{html.escape(cell(value, row.get(runs_column)))}</td>"

    head = "".join(f'<th{" class=text" if c in text_columns else ""}>{html.escape(column_title(c))}</th>' for c in columns)
    body = "".join("<tr>" + "".join(td(r, c, r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}">'


def _sweep_state(path: Path) -> dict[str, Any]:
    state_path = Path(path) / "sweep.json"
    return json.loads(state_path.read_text()) if state_path.is_file() else {}


def _load(path: Path) -> tuple[list[RunData], list[str], dict[str, Any]]:
    """Runs (in sweep order when sweep.json says it), the keys that tell them apart, the sweep state."""
    state = _sweep_state(path) if is_sweep_dir(path) else {}
    dirs = find_run_dirs(path)
    order = {e["name"]: i for i, e in enumerate(state.get("runs", []))}
    dirs.sort(key=lambda d: (order.get(d.name, len(order)), d.name))
    runs = [load_run(d) for d in dirs]
    keys = list(state.get("grid", {}).get("grid", {})) or varying_keys(runs)
    return runs, keys, state


def build_report(path: Path, out: Path | None = None, bench: Path | None = None) -> Path:
    """Write the HTML report of a run or sweep directory; returns the file written."""
    path = Path(path)
    runs, keys, state = _load(path)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run directories (no metrics.jsonl found)")
    out = Path(out) if out else path / "report.html"
    status = {e["name"]: e.get("status", "") for e in state.get("runs", [])}
    rows = []
    for run in runs:
        row = {"name": run.name, SEED_KEY: run.config_value(SEED_KEY), **{k: run.config_value(k) for k in keys}, **summary_row(summarize(run))}
        row["status"] = status.get(run.name) or ("done" if run.finished else "incomplete")
        rows.append(row)
    sweep = is_sweep_dir(path)
    parts = [f"<h1>codraft report: {html.escape(path.resolve().name)}</h1>",
             f'<p class="meta">{"Sweep of " + str(len(runs)) + " runs" if sweep else "One run"} in <code>{html.escape(str(path.resolve()))}</code>; '
             f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
             f'<p class="meta">{html.escape(hardware_note({run.name: read_hardware(run.path) for run in runs}))}</p>']
    if state.get("runs") and len(state["runs"]) > len(runs):
        parts.append(f'<p class="note">{len(state["runs"]) - len(runs)} runs of the grid have no results yet.</p>')

    if sweep and len(runs) > 1:  # the comparison first: one row per configuration, over its seeds
        by = [k for k in keys if k != SEED_KEY]
        baseline = state.get("grid", {}).get("baseline") or None
        parts.append(f'<p class="meta">{html.escape(seeds_note(state.get("grid", {}).get("grid", {}).get(SEED_KEY, ())))}</p>')
        metrics = metrics_for(rows)
        for heading, table, columns, runs_column, note in result_sections(configuration_rows(rows, by, metrics, baseline), by, baseline, metrics):
            parts += [f"<h2>{html.escape(heading)}</h2>", html_table(table, columns, {*by, "note"}, runs_column), f'<p class="note">{html.escape(note)}</p>']
    parts += ["<h2>Per run</h2>" if sweep else "<h2>Results</h2>", html_table(rows, ["name", *keys, "status", *MAIN_COLUMNS], {"name", "status", *keys}),
              '<p class="note">Acceptance lengths are 1 + accepted / drafts from summed counts (first / last: the first and last '
              "step that drafted). Times in seconds; per-step figures are means over steps; end-to-end = all steps + evaluations.</p>"]
    summary_columns = [c for c in rows[0] if c not in keys and c not in ("status", SEED_KEY)]
    parts += ["<h2>Summary per run</h2>", '<p class="note">Raw counts and totals, then figures derived from them.</p>']
    if len(rows) == 1:  # one run: a column of figures reads better than one very wide row
        parts.append(html_table([{"figure": column_title(c), "value": rows[0][c]} for c in summary_columns], ["figure", "value"], {"figure"}))
    else:
        parts.append(html_table(rows, summary_columns, {"name"}))

    from analysis import plots

    with tempfile.TemporaryDirectory(prefix="codraft-report-") as tmp:
        for i, (name, heading, caption) in enumerate(PLOTS):
            png = getattr(plots, name)(runs, Path(tmp) / f"{i}-{name}.png")
            parts += [f"<h2>{html.escape(heading)}</h2>", f"<figure>{_image(png)}<figcaption>{html.escape(caption)}</figcaption></figure>"]
        if bench is not None:
            png = plots.plot_rollout_bench(Path(bench), Path(tmp) / "bench.png")
            caption = f"Measured speedup over plain decoding (from {bench}); the dashed line is plain decoding."
            parts += ["<h2>Rollout benchmark</h2>", f"<figure>{_image(png)}<figcaption>{html.escape(caption)}</figcaption></figure>"]

    parts.append("<h2>Configs</h2>")
    if state.get("grid"):
        import tomli_w

        parts.append(f"<details open><summary>sweep grid</summary><pre>{html.escape(tomli_w.dumps(state['grid']), quote=False)}</pre></details>")
    for run in runs:
        text = run.config_text or "(no config.toml)"
        parts.append(f"<details><summary>{html.escape(run.name)}/config.toml</summary><pre>{html.escape(text, quote=False)}</pre></details>")

    page = "\n".join(['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
                      f"<title>codraft report: {html.escape(path.resolve().name)}</title><style>{CSS}</style></head><body>",
                      *parts, "</body></html>"])
    atomic_write_text(out, page)
    return out


@dataclass
class ReportArgs:
    """Write a self-contained HTML report (tables, embedded plots, configs) of a run or sweep directory."""

    path: Annotated[Path, tyro.conf.Positional]
    """Run directory or sweep directory."""
    out: Path | None = None
    """HTML file to write (default: <path>/report.html)."""
    bench: Path | None = None
    """Rollout benchmark JSON (`python -m analysis.bench_rollout` output) to plot as well."""


def cmd_report(args: ReportArgs) -> int:
    out = build_report(args.path, args.out, args.bench)
    print(f"wrote {out}")
    return 0


COMMAND = Command("report", ReportArgs, cmd_report)

if __name__ == "__main__":
    sys.exit(cmd_report(tyro.cli(ReportArgs, prog="python -m analysis.report")))
