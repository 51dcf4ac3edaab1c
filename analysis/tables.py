"""Tables of run summaries: column titles, number formats, cells of grouped figures, Markdown and CSV
writers, and the line naming the hardware a set of runs ran on."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from codraft.hardware import fingerprint, label
from codraft.io import atomic_write_text

# ---------------------------------------------------------------------------------- cells and titles


COLUMN_TITLES = {
    "name": "run", "finished": "finished", "steps": "steps", "drafts": "drafts", "draft_tokens": "draft tokens",
    "accepted": "accepted", "accept_len_first": "accept len first", "accept_len_mean": "accept len mean",
    "accept_len_last": "accept len last", "accept_rate": "accept rate", "swaps": "swaps", "refusals": "refusals",
    "distill_swap_s": "distill+swap s", "gen_s": "gen s", "step_s": "all steps s", "eval_s": "eval s",
    "wall_s": "end-to-end s", "step_s_mean": "step s/step", "gen_share": "gen share", "eval_first": "eval acc first",
    "eval_last": "eval acc last", "reward_first": "reward first", "reward_last": "reward last", "runs": "runs",
    "n_seeds": "seeds", "n_pairs": "paired seeds", "note": "note", "baseline": "baseline",
    "learned_alone_accept_len": "learned alone accept len", "suffix_alone_accept_len": "suffix alone accept len",
    "mix_minus_learned_alone": "mix − learned alone", "mix_minus_suffix_alone": "mix − suffix alone",
}


def column_title(column: str) -> str:
    """A table header for a `summary_row` column (`gen_s_per_step` -> `gen s/step`, `swaps_diff` ->
    `Δ swaps`); other names as they are."""
    if column.endswith("_diff"):
        return "Δ " + column_title(column[: -len("_diff")])
    if column.endswith("_s_per_step"):
        return column[: -len("_s_per_step")] + " s/step"
    return COLUMN_TITLES.get(column, column)


def fmt(value: Any) -> str:
    """A table cell: floats with 3 significant figures (more for large values), NaN as an en dash."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def cell(value: Any, runs: int | None = None) -> str:
    """A table cell: a grouped figure (anything with `text(runs)`, e.g. `analysis.stats.Interval`) as its
    text (`runs`: how many runs the group has, so a figure fewer of them had says so), else `fmt`."""
    return value.text(runs) if callable(getattr(value, "text", None)) and not isinstance(value, str) else fmt(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str], runs_column: str = "n_seeds") -> str:
    head = "| " + " | ".join(column_title(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(c), r.get(runs_column)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


RUN_COLUMNS = ["steps", "accept_len_first", "accept_len_mean", "accept_len_last", "swaps", "refusals", "distill_swap_s",
               "gen_s_per_step", "step_s_mean", "wall_s", "eval_last", "finished"]


def results_markdown(title: str, head: list[str], sections: list[tuple[str, list[dict[str, Any]], list[str], str, str]],
                     runs: list[dict[str, Any]]) -> str:
    """A results.md: the title, `head` lines, each (heading, rows, columns, runs column, note) section,
    then the table per run (`runs`: `summary_row`s)."""
    lines = [f"# {title}", ""] + [line for text in head for line in (text, "")]
    for heading, rows, columns, runs_column, note in sections:
        lines += [f"## {heading}", "", markdown_table(rows, columns, runs_column), "", note, ""]
    lines += ["## Per run", "", markdown_table(runs, ["name", *RUN_COLUMNS]), "",
              "Acceptance lengths come from summed counts (1 + accepted / drafts); times are seconds,",
              "per step as the mean over steps; end-to-end = all steps + evaluations of the run.", ""]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]], first: str = "name") -> Path:
    """Rows as CSV, every column any row has (in order of first appearance); lists and dicts as JSON."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or [first], lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: (json.dumps(v) if isinstance(v, (list, dict)) else v) for c, v in r.items()} for r in rows)
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def machine(facts: dict[str, Any]) -> str:
    """`codraft.hardware.label` of a hardware.json, with the torch / vLLM versions and the engine mode."""
    extra = [f"{p} {facts[p]}" for p in ("torch", "vllm") if facts.get(p)]
    extra += [f"engine {facts['engine_mode']}"] if facts.get("engine_mode") else []
    return label(facts) + "".join(f"; {e}" for e in extra)


def hardware_note(facts: dict[str, dict[str, Any] | None]) -> str:
    """One sentence naming the machine runs ran on (`facts`: run name -> its hardware.json, None when
    missing), or the machines and their runs when they differ."""
    groups: dict[tuple[str, str], list[str]] = {}  # (machine, fingerprint) -> runs
    missing = [name for name, f in facts.items() if not f]
    for name, f in facts.items():
        if f:
            groups.setdefault((machine(f), fingerprint(f)), []).append(name)
    if not groups:
        return "Hardware: not recorded (no hardware.json in the run directories)."
    if len(groups) == 1:
        (key, names), = groups.items()
        text = f"Hardware: {key[0]}" + (f" ({_runs(len(names))} with a hardware.json)." if missing else f" (all {_runs(len(names))}).")
    else:
        text = "The runs ran on DIFFERENT hardware, so their times do not compare: " + "; ".join(
            f"{key[0]}: {', '.join(names)}" for key, names in groups.items()) + "."
    return text + (f" No hardware.json in {_runs(len(missing))}: {', '.join(missing)}." if missing else "")


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


# ---------------------------------------------------------------------------------- console tables (rich)


def num(x: float, digits: int = 1) -> str:
    return "nan" if not math.isfinite(x) else f"{x:,.{digits}f}"


def pct(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:+.1f}%"


def rich_table(title: str, columns: list[str]):
    from rich.table import Table

    text = {"key", "device", "source", "stage", "figure", "role", "assumption"}
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in text else "right", overflow="fold")
    return table
