"""Reading run outputs: a run directory's config, per-step metrics and final evaluation, and the
summary statistics that sweep tables, plots and reports are built from.

    run = load_run("runs/smoke")                 # RunData: config, step records, final record
    steps, accept = accept_len_series(run)       # acceptance length per step, from the counts
    s = summarize(run)                           # RunSummary: counts and totals; ratios are properties
    s.accept_len_mean, s.swaps, s.mean_stage_s["gen"], s.wall_s
    runs = [load_run(d) for d in find_run_dirs("runs/sweep")]
    read_hardware("runs/smoke")                  # hardware.json: the machine the run ran on (or None)

Nothing here runs anything; it reads only what `codraft run` wrote (config.toml, metrics.jsonl,
samples.jsonl, hardware.json). Acceptance over several steps is summed from each step's raw counts
(`spec/drafts`, `spec/accepted`, `spec/accepted_pos_<i>`), so a mean over steps weights every
verify step equally instead of averaging per-step ratios.
"""
from __future__ import annotations

import json
import math
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from codraft.acceptance import AcceptanceStats
from codraft.config import ADDED_FIELDS
from codraft.io import read_jsonl
from codraft.metrics import STAGES


@dataclass(frozen=True)
class RunData:
    """Everything one run directory holds that analysis reads."""

    path: Path
    """The run directory."""
    config: dict[str, Any]
    """The resolved config from config.toml, nested by section (empty when the file is missing)."""
    config_text: str
    """config.toml as written (empty when missing)."""
    steps: tuple[dict[str, Any], ...]
    """One metrics record per GRPO step, in order; the final evaluation line is not among them."""
    final: dict[str, Any] | None
    """The final evaluation record (`"final": true`); None when the run did not finish."""
    samples: int
    """Lines in samples.jsonl (a few rollouts per step)."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def records(self) -> list[dict[str, Any]]:
        """Step records followed by the final record, if any."""
        return list(self.steps) + ([self.final] if self.final else [])

    def config_value(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key, e.g. `controller.policy`."""
        return flat_config(self.config).get(key, default)


def is_finished(run_dir: Path) -> bool:
    """Whether the run's metrics.jsonl ends with its final evaluation line."""
    try:
        records = read_jsonl(Path(run_dir) / "metrics.jsonl")
    except ValueError:  # a corrupt line in the middle: treat as unfinished
        return False
    return any(r.get("final") for r in records)


def read_hardware(run_dir: Path) -> dict[str, Any] | None:
    """The run's hardware.json (`codraft.hardware.describe`): the machine it ran on; None when missing."""
    path = Path(run_dir) / "hardware.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run directory, else its subdirectories holding metrics.jsonl
    (sorted by name; runs moved aside as `<name>.incomplete-<n>` are left out)."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such directory: {path}")
    return sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file() and ".incomplete-" not in p.name)


def load_run(run_dir: Path) -> RunData:
    """Read a run directory (a run still in progress reads as unfinished)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    config_path = run_dir / "config.toml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    config = tomllib.loads(config_text) if config_text else {}
    records = read_jsonl(metrics)
    steps = tuple(r for r in records if not r.get("final"))
    final = next((r for r in reversed(records) if r.get("final")), None)
    samples_path = run_dir / "samples.jsonl"
    samples = sum(1 for line in samples_path.read_text().splitlines() if line.strip()) if samples_path.is_file() else 0
    return RunData(run_dir, config, config_text, steps, final, samples)


# ---------------------------------------------------------------------------------- series


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def series(run: RunData, key: str, include_final: bool = False) -> tuple[list[int], list[float]]:
    """(steps, values) of a numeric metric over the steps that recorded it as a finite number."""
    xs, ys = [], []
    for r in run.records if include_final else run.steps:
        y = number(r.get(key))
        if y is not None:
            xs.append(int(r["step"]))
            ys.append(y)
    return xs, ys


def step_acceptance(record: dict[str, Any]) -> AcceptanceStats:
    """One step's acceptance counts (empty when the step did not speculate)."""
    return AcceptanceStats.from_metrics(record, "spec/")


def accept_len_series(run: RunData) -> tuple[list[int], list[float]]:
    """(steps, mean acceptance length) over the steps that drafted, from each step's counts."""
    xs, ys = [], []
    for r in run.steps:
        acc = step_acceptance(r)
        if acc.drafts:
            xs.append(int(r["step"]))
            ys.append(acc.accept_len)
    return xs, ys


def decision_steps(run: RunData, decision: str) -> list[int]:
    """Steps whose controller decision was `decision` ("keep", "swap" or "refuse")."""
    return [int(r["step"]) for r in run.steps if r.get("controller/decision") == decision]


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"drafter": {"kind": "mtp"}} -> {"drafter.kind": "mtp"}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


POLICY_ARGS = "controller.args."
"""Refresh-policy fields: a run's config holds only those it set, so among runs of one policy a
missing field is that policy's default, a different configuration from one that set it."""


ABSENT_MEANS: dict[str, Any] = ADDED_FIELDS
"""Config fields added after some runs were written, with the value those older runs ran with: a run
whose config.toml lacks one is read as having it (analysis compares it with newer runs that set it)."""


def varying_keys(runs: Iterable[RunData], ignore: tuple[str, ...] = ("output.",)) -> list[str]:
    """Config keys whose value differs between runs (keys starting with `ignore` left out), and
    refresh-policy fields that some runs of one policy set and others do not. A field a run's config
    lacks reads as its `ABSENT_MEANS` value when it has one (runs from before
    `controller.gate_steps` gated like gate_steps = 1); any other field only some runs hold is
    compared among those runs."""
    own = [flat_config(r.config) for r in runs]
    keys: list[str] = []
    for flat in own:
        keys += [k for k in flat if k not in keys]
    flats = [{**ABSENT_MEANS, **flat} if flat else {} for flat in own]

    def varies(key: str) -> bool:
        if len({repr(f[key]) for f in flats if key in f}) > 1:
            return True
        if not key.startswith(POLICY_ARGS):
            return False
        policies = {f.get("controller.policy") for f in flats if key in f}
        return any(key not in f for f in flats if f.get("controller.policy") in policies)

    return [k for k in keys if not k.startswith(ignore) and varies(k)]


SHORT_NAMES = {"num_speculative_tokens": "k", "policy": "policy", "kind": "kind"}


def short_key(key: str) -> str:
    """A short readable name for a config key: `drafter.num_speculative_tokens` -> `k`."""
    last = key.rsplit(".", 1)[-1]
    return SHORT_NAMES.get(last, last)


def run_label(run: RunData, keys: list[str]) -> str:
    """`policy=threshold k=3` from the given config keys (those the run lacks left out); the directory
    name when that leaves nothing."""
    parts = [f"{short_key(k)}={run.config_value(k, ABSENT_MEANS.get(k))}" for k in keys if run.config_value(k, ABSENT_MEANS.get(k)) is not None]
    return " ".join(parts) if parts else run.name


# ---------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class RunSummary:
    """Counts and totals of one run; every ratio is a property derived from them."""

    name: str
    """The run directory's name."""
    finished: bool
    """Whether the run wrote its final evaluation line."""
    steps: int
    """GRPO steps recorded."""
    accept_first: AcceptanceStats
    """Acceptance counts of the first step that drafted."""
    accept_last: AcceptanceStats
    """Acceptance counts of the last step that drafted."""
    accept_total: AcceptanceStats
    """Acceptance counts summed over all steps."""
    swaps: int
    """Refreshes whose drafter was swapped into the engine."""
    refusals: int
    """Refreshes whose candidate was refused (gate failed or non-finite loss)."""
    stage_s: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (prepare, gen, reward, logprob, train, distill, swap) summed over steps."""
    step_s: float = 0.0
    """Seconds of all steps (`time/step_s` summed; the sum of the stages)."""
    eval_s: float = 0.0
    """Seconds of held-out evaluations (outside the steps' stage timers), final one included."""
    eval_first: float = math.nan
    """Held-out accuracy of the first evaluation (before training moves the policy)."""
    eval_last: float = math.nan
    """Held-out accuracy of the last evaluation (the final line when the run finished)."""
    reward_first: float = math.nan
    """Mean reward over the first `reward_window` steps."""
    reward_last: float = math.nan
    """Mean reward over the last `reward_window` steps."""
    reward_window: int = 1
    """Steps averaged for reward_first / reward_last (a fifth of the steps, at least 1)."""
    samples: int = 0
    """Rollouts written to samples.jsonl."""
    alone: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Hybrid drafter: per source (`learned`, `suffix`), (drafts, expected accepted tokens) that source
    alone would have had on the verified rows of every step (`spec/<source>/alone_accept_len` times
    the step's drafts); empty for other kinds."""

    @property
    def accept_len_first(self) -> float:
        return self.accept_first.accept_len

    @property
    def accept_len_mean(self) -> float:
        """1 + accepted / drafts over the whole run (every verify step weighs the same)."""
        return self.accept_total.accept_len

    @property
    def accept_len_last(self) -> float:
        return self.accept_last.accept_len

    @property
    def accept_rate(self) -> float:
        return self.accept_total.accept_rate

    def alone_accept_len(self, source: str) -> float:
        """Hybrid drafter: acceptance length `source` alone would have had over the run (NaN otherwise)."""
        drafts, accepted = self.alone.get(source, (0.0, math.nan))
        return 1 + accepted / drafts if drafts else math.nan

    @property
    def pos_rates(self) -> list[float]:
        """Per draft position: accepted count / drafts over the whole run."""
        return self.accept_total.pos_rates()

    @property
    def distill_swap_s(self) -> float:
        return self.stage_s.get("distill", 0.0) + self.stage_s.get("swap", 0.0)

    @property
    def gen_s(self) -> float:
        return self.stage_s.get("gen", 0.0)

    @property
    def wall_s(self) -> float:
        """Seconds of steps plus evaluations (start-up such as building the testbed left out)."""
        return self.step_s + self.eval_s

    @property
    def step_s_mean(self) -> float:
        return self.step_s / self.steps if self.steps else math.nan

    @property
    def mean_stage_s(self) -> dict[str, float]:
        """Seconds per step spent in each stage (mean over all steps, zero where a stage did not run)."""
        return {s: (self.stage_s.get(s, 0.0) / self.steps if self.steps else math.nan) for s in STAGES}

    @property
    def stage_shares(self) -> dict[str, float]:
        whole = sum(self.stage_s.values())
        return {s: (self.stage_s.get(s, 0.0) / whole if whole else math.nan) for s in STAGES}


def summarize(run: RunData) -> RunSummary:
    drafted = [step_acceptance(r) for r in run.steps]
    drafted = [a for a in drafted if a.drafts]
    total = sum(drafted, AcceptanceStats())
    decisions = [r.get("controller/decision") for r in run.steps]
    stage_s = {s: sum(number(r.get(f"time/{s}_s")) or 0.0 for r in run.steps) for s in STAGES}
    _, rewards = series(run, "reward/mean")
    window = max(1, len(rewards) // 5)
    _, evals = series(run, "eval/accuracy", include_final=True)
    return RunSummary(
        name=run.name,
        finished=run.finished,
        steps=len(run.steps),
        accept_first=drafted[0] if drafted else AcceptanceStats(),
        accept_last=drafted[-1] if drafted else AcceptanceStats(),
        accept_total=total,
        swaps=decisions.count("swap"),
        refusals=decisions.count("refuse"),
        stage_s=stage_s,
        step_s=sum(number(r.get("time/step_s")) or 0.0 for r in run.steps),
        eval_s=sum(number(r.get("time/eval_s")) or 0.0 for r in run.records),
        eval_first=evals[0] if evals else math.nan,
        eval_last=evals[-1] if evals else math.nan,
        reward_first=statistics.fmean(rewards[:window]) if rewards else math.nan,
        reward_last=statistics.fmean(rewards[-window:]) if rewards else math.nan,
        reward_window=window,
        samples=run.samples,
        alone=alone_counts(run.steps),
    )


ALONE_SOURCES = ("learned", "suffix")


def alone_counts(steps: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per hybrid source: drafts and accepted tokens it alone would have had, summed over the steps
    that log `spec/<source>/alone_accept_len` (each step weighted by its drafts, as the run's own
    acceptance is)."""
    sums = {source: [0.0, 0.0] for source in ALONE_SOURCES}
    for r in steps:
        rows = step_acceptance(r).drafts
        for source, acc in sums.items():
            alone = number(r.get(f"spec/{source}/alone_accept_len"))
            if alone is not None and rows:
                acc[0], acc[1] = acc[0] + rows, acc[1] + (alone - 1) * rows
    return {source: (drafts, accepted) for source, (drafts, accepted) in sums.items() if drafts}


def summary_row(s: RunSummary) -> dict[str, Any]:
    """One flat row (column -> value) for results.csv: raw counts and totals first, then derived figures."""
    row: dict[str, Any] = {
        "name": s.name,
        "finished": s.finished,
        "steps": s.steps,
        "drafts": s.accept_total.drafts,
        "draft_tokens": s.accept_total.draft_tokens,
        "accepted": s.accept_total.accepted,
        "accept_len_first": s.accept_len_first,
        "accept_len_mean": s.accept_len_mean,
        "accept_len_last": s.accept_len_last,
        "accept_rate": s.accept_rate,
        "swaps": s.swaps,
        "refusals": s.refusals,
        "distill_swap_s": s.distill_swap_s,
        "gen_s": s.gen_s,
        "step_s": s.step_s,
        "eval_s": s.eval_s,
        "wall_s": s.wall_s,
        "step_s_mean": s.step_s_mean,
    }
    row.update({f"{stage}_s_per_step": v for stage, v in s.mean_stage_s.items()})
    row["gen_share"] = s.stage_shares["gen"]
    for source in ALONE_SOURCES:  # NaN but for a hybrid drafter
        row[f"{source}_alone_accept_len"] = s.alone_accept_len(source)
        row[f"mix_minus_{source}_alone"] = s.accept_len_mean - s.alone_accept_len(source)
    row.update({"eval_first": s.eval_first, "eval_last": s.eval_last, "reward_first": s.reward_first, "reward_last": s.reward_last})
    return row

