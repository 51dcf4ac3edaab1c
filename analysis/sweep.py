"""Ablation sweeps: run the cartesian product of config values, resumably, and tabulate the results.

    codraft sweep --grid analysis/grids/policies.toml --out runs/policies
    codraft sweep --grid analysis/grids/policies.toml --dry-run        # validate every config, show the plan
    codraft sweep --grid analysis/grids/policies.toml --table-only     # (re)write results.csv, runs.csv, results.md
    python -m analysis.sweep --grid analysis/grids/policies.toml       # the same without the console script

A grid file is TOML. Keys are config keys, quoted or written as nested tables:

    preset = "smoke"                         # optional (else "default"; --base-preset wins)
    seeds = [0, 1, 2]                        # optional: every configuration runs with each seed
    baseline = { "controller.policy" = "every_n" }   # optional: the configuration others are compared to
    [base]                                   # fixed overrides applied to every run
    "run.steps" = 20
    [grid]                                   # config key -> list of values; their product is swept
    "controller.policy" = ["never", "every_n", "threshold"]
    "drafter.kind" = ["eagle3"]
    "drafter.num_speculative_tokens" = [3]

A configuration is one combination of the [grid] values; each runs once per seed. `seeds = [...]`
is the same as a `"run.seed" = [...]` axis in [grid] (swept last, so a configuration's seeds run
one after another); giving both is refused. Without either, each configuration runs once with the
preset's seed: an anecdote, and the tables say so. `baseline` names one configuration by some of
its [grid] values; a baseline that matches no configuration or several is refused.

Every combination's config is validated (`codraft.configfile.load_config`, then the refresh policy and
drafter kind names) before the first run starts. Each combination runs as
`python -m codraft run --preset P --set key=value ... --out <sweep>/<name>` in a subprocess, one
after the other; names read like `policy-never__kind-eagle3__k-3__seed-0`. The sweep resumes: a
run whose metrics.jsonl ends with the final line is skipped; a directory left by a killed run is
renamed `<name>.incomplete-<n>` (never deleted) and the run starts again. `sweep.json` (grid,
runs, status) is rewritten atomically after every change. At the end the sweep directory gets
`results.csv`, one row per configuration (`analysis.stats.configuration_rows`: `n_seeds`, a `note`
that says "1 seed: anecdote" when so, `<m>_mean`, `<m>_ci95_low`, `<m>_ci95_high` per figure, and
with a baseline `n_pairs` and `<m>_diff_mean`, ... paired by seed); `runs.csv`, one row per run
(raw counts, totals, derived figures); and `results.md`: the hardware (from each run's
hardware.json), the seeds, the interval method, then both tables.
"""
from __future__ import annotations

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

from analysis.runs import flat_config, is_finished, load_run, read_hardware, short_key, summarize, summary_row
from analysis.stats import SEED_KEY, configuration_rows, flat_row, metrics_for, result_sections, seeds_note, select_baseline
from analysis.tables import hardware_note, results_markdown, write_csv
from codraft.config import ConfigError
from codraft.cliargs import Command
from codraft.configfile import load_config
from codraft.io import atomic_write_text


@dataclass(frozen=True)
class Grid:
    """What a grid file asks for."""

    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    """(config key, values) per swept key, in file order; the sweep is their cartesian product."""
    base: tuple[tuple[str, Any], ...] = ()
    """(config key, value) fixed for every run, applied before the swept keys."""
    preset: str = "default"
    """Preset underneath every run."""
    baseline: tuple[tuple[str, Any], ...] = ()
    """(config key, value) naming the configuration the others are compared to; () for none."""

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.axes]

    @property
    def config_keys(self) -> list[str]:
        """The swept keys that make a configuration: all but the seed."""
        return [key for key in self.keys if key != SEED_KEY]

    def configurations(self) -> list[dict[str, Any]]:
        """The swept values but the seed, one dict per configuration, in sweep order."""
        return [dict(zip(self.config_keys, c)) for c in itertools.product(*(v for k, v in self.axes if k != SEED_KEY))]

    def as_dict(self) -> dict[str, Any]:
        out = {"preset": self.preset, "base": dict(self.base), "grid": {k: list(v) for k, v in self.axes}}
        return out | ({"baseline": dict(self.baseline)} if self.baseline else {})


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


def _flatten(table: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """Nested TOML tables to (dotted key, leaf value) pairs."""
    pairs = list(flat_config(table).items())
    for key, value in pairs:
        if value == {}:
            raise ConfigError(f"{where}: '{key}' is an empty table")
    return pairs


def parse_grid(data: dict[str, Any], preset: str | None = None, where: str = "grid file") -> Grid:
    """A `Grid` from a parsed grid file; `preset` (from --base-preset) overrides the file's."""
    unknown = sorted(set(data) - {"preset", "seeds", "baseline", "base", "grid"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(map(repr, unknown))}; expected 'preset', 'seeds', 'baseline', '[base]' and '[grid]'")
    if not isinstance(data.get("grid", {}), dict) or not (data.get("grid") or "seeds" in data):
        raise ConfigError(f"{where}: needs a non-empty [grid] table of config keys mapped to lists of values (or only top-level 'seeds')")
    axes = []
    for key, values in _flatten(data.get("grid", {}), where):
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [grid] '{key}' must be a non-empty list of values (put a fixed value under [base])")
        axes.append((key, tuple(values)))
    base = tuple(_flatten(data.get("base", {}), where))
    if "seeds" in data:
        seeds = data["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
        for table, pairs in (("[grid]", axes), ("[base]", base)):
            if SEED_KEY in dict(pairs):
                raise ConfigError(f"{where}: the seed is given twice, by top-level 'seeds' and by {table} '{SEED_KEY}'; keep one")
        axes.append((SEED_KEY, tuple(seeds)))
    clash = sorted(set(dict(base)) & set(dict(axes)))
    if clash:
        raise ConfigError(f"{where}: key(s) {', '.join(clash)} appear in both [base] and [grid]")
    baseline = data.get("baseline", {})
    if not isinstance(baseline, dict) or ("baseline" in data and not baseline):
        raise ConfigError(f"{where}: 'baseline' must be a table of [grid] keys and values, e.g. baseline = {{ \"controller.policy\" = \"every_n\" }}")
    grid = Grid(tuple(axes), base, preset or data.get("preset", "default"), tuple(_flatten(baseline, where)))
    if grid.baseline:
        select_baseline(grid.configurations(), dict(grid.baseline), {k: list(v) for k, v in grid.axes if k != SEED_KEY}, where)
    return grid


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

def result_rows(out: Path, grid: Grid) -> list[dict[str, Any]]:
    """One row per grid run that has metrics: its swept values (and its seed), then `summary_row`."""
    rows = []
    for run in expand(grid):
        run_dir = Path(out) / run.name
        if (run_dir / "metrics.jsonl").is_file():
            data = load_run(run_dir)
            values = {SEED_KEY: data.config_value(SEED_KEY)} | dict(run.values)
            rows.append({"name": run.name, **values, **summary_row(summarize(data))})
    return rows


def write_results(out: Path, grid: Grid) -> tuple[Path, Path, Path]:
    """Write results.csv (one row per configuration: means, intervals, paired differences), runs.csv
    (one row per run) and results.md (hardware, seeds, interval method, both tables)."""
    out = Path(out)
    rows = result_rows(out, grid)
    metrics = metrics_for(rows)
    confs = configuration_rows(rows, grid.config_keys, metrics, dict(grid.baseline) or None)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "results.csv", [flat_row(c) for c in confs], first="n_seeds")
    fixed = " Fixed for every run: " + ", ".join(f"`{k}={toml_literal(v)}`" for k, v in grid.base) + "." if grid.base else ""
    head = [f"{len(rows)} of {math.prod(len(v) for _, v in grid.axes)} runs have results (preset `{grid.preset}`).{fixed}",
            hardware_note({r["name"]: read_hardware(out / r["name"]) for r in rows}), seeds_note(dict(grid.axes).get(SEED_KEY, ()))]
    sections = result_sections(confs, grid.config_keys, dict(grid.baseline), metrics)
    atomic_write_text(out / "results.md", results_markdown(f"Sweep results: {out.name}", head, sections, rows))
    return out / "results.csv", out / "results.md", out / "runs.csv"


# ---------------------------------------------------------------------------------- command line


@dataclass
class SweepArgs:
    """Run a grid of configs (their cartesian product) resumably; tabulate acceptance, refreshes and stage times."""

    grid: Path
    """TOML grid file: `[grid]` config keys -> lists of values; optional `seeds`, `baseline`, `[base]` fixed overrides, `preset`."""
    out: Path | None = None
    """Sweep directory (default: runs/<grid file name without .toml>)."""
    base_preset: str | None = None
    """Preset underneath every run (default: the grid file's `preset`, else `default`)."""
    dry_run: bool = False
    """Validate every config and print what would run, without running or writing anything."""
    table_only: bool = False
    """Only (re)write results.csv, runs.csv and results.md from the run directories already there."""


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


COMMAND = Command("sweep", SweepArgs, cmd_sweep)

if __name__ == "__main__":
    import tyro

    sys.exit(cmd_sweep(tyro.cli(SweepArgs, prog="python -m analysis.sweep")))
