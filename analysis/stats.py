"""Means over seeds with 95% Student-t intervals, and paired differences against a baseline.

    iv = t_interval([2.1, 2.4, 2.2])            # Interval(mean, low, high, n): mean ± t(0.975, n-1)·s/√n
    d = paired_interval({0: 2.1, 1: 2.4}, {0: 1.9, 1: 2.0})   # over the seeds both hold: a - b per seed
    rows = configuration_rows(run_rows, ["controller.policy"], baseline={"controller.policy": "every_n"})
    steps, band = mean_curve([(steps_a, ys_a), (steps_b, ys_b)])   # an Interval per step, for plots

A configuration is the swept values except the seed; its runs are its seeds. Only finished runs
count. With one seed there is no interval (NaN) and the configuration is an anecdote, labelled so.
Differences are paired by seed (configuration minus baseline, same seed), so what the seed fixes
for both runs cancels; their interval is the t interval of the per-seed differences.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from analysis.runs import number
from analysis.tables import fmt
from codraft.config import ConfigError

SEED_KEY = "run.seed"
LEVEL = 0.95
INTERVAL_NAME = "95% Student-t interval"
INTERVAL_NOTE = ("Intervals are 95% Student-t intervals of the mean over seeds, mean ± t(0.975, n−1)·s/√n with s the sample "
                 "standard deviation of the n seeds (scipy.stats.t); with one seed there is no interval and the row is an anecdote.")
DIFF_NOTE = ("Paired differences are configuration minus baseline, seed by seed, over the seeds both finished; the interval is the "
             "95% Student-t interval of those per-seed differences (none with one pair: an anecdote). An interval that excludes 0 "
             "is a difference at the 5% level.")
ANECDOTE = "1 seed: anecdote"
# per-configuration figures: acceptance, refreshes, refresh cost, stage times per step, speed, quality
METRICS = ["accept_len_mean", "accept_len_last", "swaps", "refusals", "distill_swap_s", "gen_s_per_step",
           "logprob_s_per_step", "train_s_per_step", "step_s_mean", "wall_s", "eval_last", "reward_last"]
# a hybrid drafter's acceptance against each of its sources alone on the same rows (within-run pairs)
HYBRID_METRICS = ["learned_alone_accept_len", "suffix_alone_accept_len", "mix_minus_learned_alone", "mix_minus_suffix_alone"]


def metrics_for(rows: list[dict[str, Any]]) -> list[str]:
    """METRICS, plus HYBRID_METRICS when some run drafted with a hybrid drafter."""
    hybrid = any(number(r.get("learned_alone_accept_len")) is not None for r in rows)
    return METRICS + HYBRID_METRICS if hybrid else METRICS


@dataclass(frozen=True)
class Interval:
    """The mean of some values and its 95% Student-t interval."""

    mean: float
    """Mean of the finite values (NaN when there are none)."""
    low: float
    """Lower end of the interval (NaN with fewer than two values)."""
    high: float
    """Upper end of the interval (NaN with fewer than two values)."""
    n: int
    """Finite values the interval is built from."""

    def text(self, runs: int | None = None) -> str:
        """`mean [low, high]` (the mean alone with one value), `(n=...)` added when fewer than `runs` had a value."""
        if not self.n:
            return "–"
        spread = f" [{fmt(self.low)}, {fmt(self.high)}]" if math.isfinite(self.low) else ""
        return f"{fmt(self.mean)}{spread}" + ("" if runs is None or self.n == runs else f" (n={self.n})")

    def __str__(self) -> str:
        return self.text()


def t_interval(values: Iterable[Any], level: float = LEVEL) -> Interval:
    """Mean ± t((1+level)/2, n-1)·s/√n over the finite numbers among `values` (others are skipped)."""
    xs = [x for x in (number(v) for v in values) if x is not None]
    if not xs:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return Interval(mean, math.nan, math.nan, 1)
    from scipy.stats import t

    half = float(t.ppf((1 + level) / 2, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(mean, mean - half, mean + half, len(xs))


def paired_interval(a: dict[Any, Any], b: dict[Any, Any], level: float = LEVEL) -> Interval:
    """t interval of `a[seed] - b[seed]` over the seeds where both hold a finite number."""
    diffs = [number(a[s]) - number(b[s]) for s in a if s in b and number(a[s]) is not None and number(b[s]) is not None]
    return t_interval(diffs, level)


def mean_curve(curves: list[tuple[list[Any], list[float]]], level: float = LEVEL) -> tuple[list[Any], list[Interval]]:
    """(xs, interval per x) of several runs' curves (each (xs, ys), e.g. one per seed): at every x
    any curve has, the t interval over the curves that have it (no interval where only one does)."""
    at = [dict(zip(xs, ys)) for xs, ys in curves]
    xs = sorted({x for points in at for x in points})
    return xs, [t_interval([points[x] for points in at if x in points], level) for x in xs]


# ---------------------------------------------------------------------------------- per configuration


def _same(a: Any, b: Any) -> bool:
    """Config values equal as TOML would tell them apart (true is not 1)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def matches(values: dict[str, Any], selector: dict[str, Any]) -> bool:
    """Whether a configuration's values hold every (key, value) of `selector`."""
    return all(k in values and _same(values[k], v) for k, v in selector.items())


def configuration_rows(rows: list[dict[str, Any]], keys: list[str], metrics: list[str] = METRICS,
                       baseline: dict[str, Any] | None = None, seed_key: str = SEED_KEY) -> list[dict[str, Any]]:
    """One row per configuration (distinct values of `keys`, in order of first appearance) of the
    per-run `rows` (each holding `keys`, `seed_key` and `finished`): the key values, `n_seeds` (finished
    runs), `seeds`, `note`, and per metric an `Interval` over the finished seeds. With a `baseline`
    (some key values naming one configuration): `baseline` (true on its row) and, on every other row,
    `n_pairs` and per metric `<metric>_diff`, the paired `Interval` of (row - baseline) per seed."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.get(k)) for k in keys), []).append(row)
    out, by_seed = [], []  # by_seed[i][metric]: seed -> value, of configuration i's finished runs
    for members in groups.values():
        done = [m for m in members if m.get("finished")]
        n = len(done)
        unfinished = f" ({len(members) - n} unfinished)" if len(members) > n else ""
        conf: dict[str, Any] = {k: members[0].get(k) for k in keys}
        conf.update(n_seeds=n, seeds=[d.get(seed_key) for d in done],
                    note={0: "no finished run", 1: ANECDOTE}.get(n, f"{n} seeds") + unfinished)
        conf.update({m: t_interval(d.get(m) for d in done) for m in metrics})
        out.append(conf)
        by_seed.append({m: {d.get(seed_key): d.get(m) for d in done} for m in metrics})
    if baseline is not None:
        b = next((i for i, c in enumerate(out) if matches(c, baseline)), None)  # None: the baseline has no run yet
        for i, conf in enumerate(out):
            conf["baseline"] = i == b
            if i != b:
                conf["n_pairs"] = len(set(conf["seeds"]) & set(out[b]["seeds"])) if b is not None else 0
                conf.update({f"{m}_diff": paired_interval(by_seed[i][m], by_seed[b][m] if b is not None else {}) for m in metrics})
    return out


def flat_row(conf: dict[str, Any]) -> dict[str, Any]:
    """A configuration row for CSV: each `Interval` as `<name>_mean`, `_ci95_low`, `_ci95_high`
    (`<metric>_diff` becomes `<metric>_diff_mean`, ...); the baseline's difference cells stay empty."""
    out: dict[str, Any] = {}
    for column, value in conf.items():
        if isinstance(value, Interval):
            out.update({f"{column}_mean": value.mean, f"{column}_ci95_low": value.low, f"{column}_ci95_high": value.high})
        else:
            out[column] = value
    return out


def baseline_label(baseline: dict[str, Any]) -> str:
    """`controller.policy=every_n` for a results heading."""
    return ", ".join(f"{k}={v}" for k, v in baseline.items())


def select_baseline(configurations: list[dict[str, Any]], baseline: dict[str, Any], axes: dict[str, list[Any]],
                    where: str = "grid") -> dict[str, Any]:
    """The one configuration holding every (key, value) of `baseline`; a baseline that names the seed,
    or matches no configuration or several, is refused with the grid keys (`axes`: key -> values)."""
    keys = "; ".join(f"'{k}' in {v}" for k, v in axes.items()) or "none but the seed"
    if SEED_KEY in baseline:
        raise ConfigError(f"{where}: the baseline names a configuration, not a seed: drop '{SEED_KEY}' from it (grid keys: {keys})")
    hits = [c for c in configurations if matches(c, baseline)]
    if len(hits) != 1:
        found = "no configuration" if not hits else f"{len(hits)} configurations, not one"
        strays = [k for k in baseline if k not in axes]
        hint = f" ({', '.join(map(repr, strays))} not swept in [grid])" if strays else ""
        raise ConfigError(f"{where}: baseline {baseline_label(baseline)} matches {found}{hint}; name one configuration by the grid keys: {keys}")
    return hits[0]


def seeds_note(seeds: tuple[Any, ...] | list[Any]) -> str:
    """What the seeds of a sweep are, for results.md."""
    if not seeds:
        return "Seeds: one run per configuration (the grid sweeps no seed): every row is an anecdote."
    return f"Seeds: {len(seeds)} per configuration ({SEED_KEY} = {', '.join(map(str, seeds))}); the seeds column counts the finished ones."


def result_sections(confs: list[dict[str, Any]], keys: list[str], baseline: dict[str, Any] | None = None,
                    metrics: list[str] = METRICS) -> list[tuple[str, list[dict[str, Any]], list[str], str, str]]:
    """(heading, rows, columns, column counting each row's runs, note) of the table per configuration
    and, with a baseline, of the paired differences; results.md and the HTML report draw both."""
    out = [(f"Per configuration: mean [{INTERVAL_NAME}] over seeds, finished runs only", confs,
            [*keys, "n_seeds", "note", *metrics], "n_seeds", INTERVAL_NOTE + " (n=...) marks a figure fewer seeds had.")]
    if baseline:
        rows = [c for c in confs if not c.get("baseline")]
        base = next((c for c in confs if c.get("baseline")), None)
        missing = "" if base and base["n_seeds"] else " The baseline has no finished run, so there is nothing to pair."
        out.append((f"Paired differences against the baseline ({baseline_label(baseline)}): mean [{INTERVAL_NAME}] of configuration − baseline",
                    rows, [*keys, "n_pairs", *(f"{m}_diff" for m in metrics)], "n_pairs", DIFF_NOTE + missing))
    return out
