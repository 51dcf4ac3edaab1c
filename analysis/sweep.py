"""Ablation sweeps: run the cartesian product of config values, resumably, and tabulate the results.

    codraft sweep --grid analysis/grids/policies.toml --out runs/policies
    codraft sweep --grid analysis/grids/policies.toml --dry-run        # validate every config, show the plan
    codraft sweep --grid analysis/grids/policies.toml --table-only     # (re)write results.csv and results.md
    python -m analysis.sweep --grid analysis/grids/policies.toml       # the same without the console script

A grid file is TOML. Keys are config keys, quoted or written as nested tables:

    preset = "smoke"                         # optional (else "default"; --base-preset wins)
    [base]                                   # fixed overrides applied to every run
    "run.steps" = 20
    [grid]                                   # config key -> list of values; their product is swept
    "controller.policy" = ["never", "every_n", "threshold"]
    "drafter.kind" = ["eagle3"]
    "drafter.num_speculative_tokens" = [3]
    "run.seed" = [0, 1, 2]

Every combination's config is validated (`codraft.configfile.load_config`, then the refresh policy and
drafter kind names) before the first run starts. Each combination runs as
`python -m codraft run --preset P --set key=value ... --out <sweep>/<name>` in a subprocess, one
after the other; names read like `policy-never__kind-eagle3__k-3__seed-0`. The sweep resumes: a
run whose metrics.jsonl ends with the final line is skipped; a directory left by a killed run is
renamed `<name>.incomplete-<n>` (never deleted) and the run starts again. `sweep.json` (grid,
runs, status) is rewritten atomically after every change. At the end, `results.csv` (one row per
run: raw counts, totals, derived figures) and `results.md` (per run, and grouped over `run.seed`
as mean ± std (n)) are written into the sweep directory.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from analysis.runs import Spread, column_title, fmt, group_rows, is_finished, load_run, short_key, summarize, summary_row
from codraft.config import ConfigError
from codraft.configfile import load_config
from codraft.io import atomic_write_text

SEED_KEY = "run.seed"


@dataclass(frozen=True)
class Grid:
    """What a grid file asks for."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    """(config key, values) per swept key, in file order; the sweep is their cartesian product."""
    base: tuple[tuple[str, Any], ...] = ()
    """(config key, value) fixed for every run, applied before the swept keys."""
    preset: str = "default"
    """Preset underneath every run."""

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.axes]

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "base": dict(self.base), "grid": {k: list(v) for k, v in self.axes}}


@dataclass(frozen=True)
class SweepRun:
    """One combination of the grid."""

    name: str
    """Directory name inside the sweep directory, built from the swept values."""
    values: tuple[tuple[str, Any], ...]
    """(config key, value) of every swept key."""
    overrides: tuple[str, ...]
    """`section.key=value` overrides passed to `codraft run` (base first, then the swept values)."""


# A runner starts one run: (run, its directory, preset) -> exit status. Tests inject a fake one.
Runner = Callable[[SweepRun, Path, str], int]


# ---------------------------------------------------------------------------------- grid file


def _flatten(table: dict[str, Any], where: str, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested TOML tables to (dotted key, leaf value) pairs."""
    out = []
    for key, value in table.items():
        if isinstance(value, dict):
            if not value:
                raise ConfigError(f"{where}: '{prefix}{key}' is an empty table")
            out += _flatten(value, where, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def parse_grid(data: dict[str, Any], preset: str | None = None, where: str = "grid file") -> Grid:
    """A `Grid` from a parsed grid file; `preset` (from --base-preset) overrides the file's."""
    unknown = sorted(set(data) - {"preset", "base", "grid"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; expected 'preset', '[base]' and '[grid]'")
    if not isinstance(data.get("grid"), dict) or not data["grid"]:
        raise ConfigError(f"{where}: needs a non-empty [grid] table of config keys mapped to lists of values")
    axes = []
    for key, values in _flatten(data["grid"], where):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [grid] '{key}' must be a non-empty list of values (put a fixed value under [base])")
        axes.append((key, tuple(values)))
    base = tuple(_flatten(data.get("base", {}), where))
    clash = sorted(set(dict(base)) & set(dict(axes)))
    if clash:
        raise ConfigError(f"{where}: key(s) {', '.join(clash)} appear in both [base] and [grid]")
    return Grid(tuple(axes), base, preset or data.get("preset", "default"))


def read_grid(path: Path, preset: str | None = None) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"grid file {path} is not valid TOML: {err}") from None
    return parse_grid(data, preset, where=f"grid file {path}")


def toml_literal(value: Any) -> str:
    """A value as the TOML literal `--set key=<literal>` reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string uses the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot pass {value!r} ({type(value).__name__}) as a config value")


def _name_part(value: Any) -> str:
    text = "-".join(_name_part(v) for v in value) if isinstance(value, (list, tuple)) else toml_literal(value).strip('"')
    return re.sub(r"[^A-Za-z0-9._+]+", "-", text).strip("-") or "empty"


def short_names(keys: list[str]) -> dict[str, str]:
    """A short name per key for directory names (`drafter.num_speculative_tokens` -> `k`);
    keys whose short names collide keep their full dotted path (dots become dashes)."""
    short = {k: short_key(k) for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: (s if counts[s] == 1 else k.replace(".", "-")) for k, s in short.items()}


def expand(grid: Grid) -> list[SweepRun]:
    """The cartesian product of the grid's axes, first axis slowest, each with a distinct name."""
    names = short_names(grid.keys)
    base = [f"{k}={toml_literal(v)}" for k, v in grid.base]
    runs = []
    for combo in itertools.product(*(values for _, values in grid.axes)):
        values = tuple(zip(grid.keys, combo))
        name = "__".join(f"{names[k]}-{_name_part(v)}" for k, v in values)
        runs.append(SweepRun(name, values, tuple(base + [f"{k}={toml_literal(v)}" for k, v in values])))
    seen: dict[str, SweepRun] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(f"grid values {dict(seen[run.name].values)} and {dict(run.values)} give the same run name {run.name!r}; make them distinct")
        seen[run.name] = run
    return runs


def validate_runs(grid: Grid, runs: list[SweepRun]) -> None:
    """Resolve every run's config before anything starts; the first error names the run and the key."""
    from codraft.refresh import make_refresh_policy
    from codraft.registry import UnknownNameError

    kinds: dict[str, str] = {}
    for run in runs:
        try:
            cfg = load_config(grid.preset, overrides=list(run.overrides))
            make_refresh_policy(cfg.controller.policy, cfg.controller.args)
        except (ConfigError, UnknownNameError) as err:
            raise ConfigError(f"sweep run {run.name!r}: {err}") from None
        if cfg.drafter.kind != "none":
            kinds.setdefault(cfg.drafter.kind, run.name)
    if kinds:
        from codraft.drafter import DRAFTERS  # imports torch: only when some run speculates

        for kind, name in kinds.items():
            if kind not in DRAFTERS:
                raise ConfigError(f"sweep run {name!r}: unknown drafter kind {kind!r} in 'drafter.kind' (known: none, {', '.join(DRAFTERS.names())})")


# ---------------------------------------------------------------------------------- running


def run_command(run: SweepRun, run_dir: Path, preset: str) -> list[str]:
    """The `codraft run` command line of one run (with this interpreter, so the environment matches)."""
    sets = [arg for o in run.overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "codraft", "run", "--preset", preset, *sets, "--out", str(run_dir)]


def subprocess_runner(run: SweepRun, run_dir: Path, preset: str) -> int:
    """Run one combination in a subprocess; its output goes to the console and to `<run_dir>/run.log`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.log", "ab") as log:
        proc = subprocess.Popen(run_command(run, run_dir, preset), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
            return proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise


def move_aside(run_dir: Path) -> Path:
    """Rename an incomplete run directory to `<name>.incomplete-<n>` (first free n >= 1)."""
    n = 1
    while (target := run_dir.with_name(f"{run_dir.name}.incomplete-{n}")).exists():
        n += 1
    run_dir.rename(target)
    return target


def _planned_action(run_dir: Path) -> str:
    if is_finished(run_dir):
        return "skip"
    if run_dir.exists() and any(run_dir.iterdir()):
        return "move aside, run"
    return "run"


def save_state(out: Path, grid: Grid, entries: list[dict[str, Any]]) -> None:
    state = {"grid": grid.as_dict(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": entries}
    atomic_write_text(out / "sweep.json", json.dumps(state, indent=1) + "\n")


def run_sweep(grid: Grid, out: Path, runner: Runner = subprocess_runner, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Validate, then run every combination not finished yet; returns the run entries of sweep.json."""
    out = Path(out)
    runs = expand(grid)
    validate_runs(grid, runs)
    out.mkdir(parents=True, exist_ok=True)
    entries = [
        {"name": r.name, "values": dict(r.values), "overrides": list(r.overrides), "status": "done" if is_finished(out / r.name) else "pending"}
        for r in runs
    ]
    save_state(out, grid, entries)
    for i, (run, entry) in enumerate(zip(runs, entries), 1):
        run_dir = out / run.name
        if entry["status"] == "done":
            log(f"[{i}/{len(runs)}] {run.name}: finished earlier, skipped")
            continue
        if run_dir.exists() and any(run_dir.iterdir()):
            entry["moved_aside"] = move_aside(run_dir).name
            log(f"[{i}/{len(runs)}] {run.name}: incomplete directory moved aside to {entry['moved_aside']}")
        log(f"[{i}/{len(runs)}] {run.name}: running")
        entry.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        save_state(out, grid, entries)
        t0 = time.perf_counter()
        try:
            code = runner(run, run_dir, grid.preset)
        except KeyboardInterrupt:
            entry["status"] = "interrupted"
            save_state(out, grid, entries)
            raise
        done = code == 0 and is_finished(run_dir)
        entry.update(status="done" if done else "failed", returncode=code, seconds=round(time.perf_counter() - t0, 3))
        save_state(out, grid, entries)
        if not done:
            log(f"[{i}/{len(runs)}] {run.name}: FAILED (exit status {code}); see {run_dir / 'run.log'}")
    write_results(out, grid)
    return entries


# ---------------------------------------------------------------------------------- results

RUN_COLUMNS = ["steps", "accept_len_first", "accept_len_mean", "accept_len_last", "swaps", "refusals", "distill_swap_s",
               "gen_s_per_step", "step_s_mean", "wall_s", "eval_last", "finished"]
GROUP_COLUMNS = ["accept_len_mean", "accept_len_last", "swaps", "refusals", "distill_swap_s", "gen_s_per_step",
                 "logprob_s_per_step", "train_s_per_step", "step_s_mean", "wall_s", "eval_last"]


def result_rows(out: Path, grid: Grid) -> list[dict[str, Any]]:
    """One row per grid run that has metrics: its swept values, then `summary_row` of its summary."""
    rows = []
    for run in expand(grid):
        run_dir = Path(out) / run.name
        if (run_dir / "metrics.jsonl").is_file():
            rows.append({"name": run.name, **dict(run.values), **summary_row(summarize(load_run(run_dir)))})
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(column_title(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(r[c].text(r.get("runs")) if isinstance(r.get(c), Spread) else fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_results(out: Path, grid: Grid) -> tuple[Path, Path]:
    """Write results.csv (every column, one row per run) and results.md (per run and grouped over seeds)."""
    out = Path(out)
    rows = result_rows(out, grid)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or ["name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: (json.dumps(v) if isinstance(v, (list, dict)) else v) for c, v in r.items()} for r in rows)
    atomic_write_text(out / "results.csv", buf.getvalue())

    by = [k for k in grid.keys if k != SEED_KEY]
    total = math.prod(len(v) for _, v in grid.axes)
    lines = [f"# Sweep results: {out.name}", "", f"{len(rows)} of {total} runs have results (preset `{grid.preset}`)."]
    if grid.base:
        lines.append("Fixed for every run: " + ", ".join(f"`{k}={toml_literal(v)}`" for k, v in grid.base) + ".")
    lines += ["", "## Per run", "", markdown_table(rows, ["name", *RUN_COLUMNS]), ""]
    finished = [r for r in rows if r["finished"]]
    over = f"over `{SEED_KEY}`" if SEED_KEY in grid.keys else f"(no `{SEED_KEY}` axis: one run per group)"
    lines += [f"## Grouped {over}: mean ± std, finished runs only ((n=...) where fewer runs had a value)", "", markdown_table(group_rows(finished, by, GROUP_COLUMNS), by + ["runs"] + GROUP_COLUMNS), ""]
    lines += ["Acceptance lengths come from summed counts (1 + accepted / drafts); times are seconds,",
              "per step as the mean over steps; end-to-end = all steps + evaluations of the run.", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    return out / "results.csv", out / "results.md"


# ---------------------------------------------------------------------------------- command line


@dataclass
class SweepArgs:
    """Run a grid of configs (their cartesian product) resumably; tabulate acceptance, refreshes and stage times."""

    grid: Path
    """TOML grid file: `[grid]` config keys -> lists of values, optional `[base]` fixed overrides and `preset`."""
    out: Path | None = None
    """Sweep directory (default: runs/<grid file name without .toml>)."""
    base_preset: str | None = None
    """Preset underneath every run (default: the grid file's `preset`, else `default`)."""
    dry_run: bool = False
    """Validate every config and print what would run, without running or writing anything."""
    table_only: bool = False
    """Only (re)write results.csv and results.md from the run directories already there."""


def cmd_sweep(args: SweepArgs) -> int:
    grid = read_grid(args.grid, args.base_preset)
    out = args.out or Path("runs") / args.grid.stem
    if args.table_only:
        if not out.is_dir():
            raise FileNotFoundError(f"sweep directory {out} does not exist (pass --out DIR)")
        for path in write_results(out, grid):
            print(f"wrote {path}")
        return 0
    if args.dry_run:
        runs = expand(grid)
        validate_runs(grid, runs)
        print(f"{len(runs)} runs in {out} (preset {grid.preset!r}); every config is valid")
        for run in runs:
            print(f"  {_planned_action(out / run.name):>15}  {run.name}\n{'':19}{shlex.join(run_command(run, out / run.name, grid.preset))}")
        return 0
    entries = run_sweep(grid, out)
    failed = [e["name"] for e in entries if e["status"] != "done"]
    print(f"sweep {out}: {len(entries) - len(failed)} of {len(entries)} runs done; results in {out / 'results.md'}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from codraft.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
