"""The rollout benchmark's parts (analysis/bench_rollout.py, analysis/bench_vanilla.py): its records
and their JSON, the targets and drafters it times, paired timing and its statistics, and the cost
model's predictions of its cells.

Paired timing: two engines kept up side by side (a baseline `a` and an engine `b`) generate the same
batch alternately, repeat by repeat (a then b, then b then a, ...), so that a shared machine's load
swings hit both alike. A repeat of each runs the same number of generate calls, enough for at
least `min_seconds` of the baseline (sized from an untimed probe call). Per repeat the ratio of b's
throughput to a's is kept; a cell reports their median, their range and their spread
(range / median, the repeat-to-repeat spread).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Sequence

LARGE = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=4", "model.intermediate_size=1536"]
NAN = float("nan")


@dataclass
class Cell:
    """One (kind, k, running batch) of a target; kind `none` (k = 0): plain decoding."""

    target: str
    kind: str
    k: int
    batch: int
    seconds: float
    """Median seconds of one generate call (the speculative engine's; plain cells: the plain one's)."""
    tokens: float
    """Tokens one generate call emits (median)."""
    accept_len: float = NAN
    c_ratio: float = NAN
    """Measured draft/target step-cost ratio c = (T_spec - T_plain) / (k T_plain)."""
    speedup: float = NAN
    """Median over repeats of the paired throughput ratio speculative / plain."""
    predicted: float = NAN
    """Cost model calibrated on the kind's cells (this one included)."""
    loo: float = NAN
    """Cost model calibrated without this cell (leave one out)."""
    speedup_low: float = NAN
    speedup_high: float = NAN
    spread: float = NAN
    """(highest - lowest) / median of the paired ratios (plain cells: of the plain call's seconds)."""
    plain_seconds: float = NAN
    """Median seconds of the paired plain engine's call."""
    calls: int = 1
    """Generate calls per timed repeat."""
    repeats: int = 0
    profiled: float = NAN
    """Cost model fitted on the engine-start profile only (codraft/costprofile.py)."""
    profiled_loo: float = NAN
    """The profiled model refined online with every other cell of the kind (leave one out)."""


@dataclass
class TargetResult:
    name: str
    parameters: int
    cells: list[Cell] = field(default_factory=list)
    grpo: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    """Per drafter kind, the engine-start profile: key, seconds, cached, timings (codraft/costprofile.py)."""
    vanilla: list = field(default_factory=list)
    """`--baseline vanilla`: rows of codraft's engine against a plain vllm.LLM (analysis/bench_vanilla.py)."""


# ---------------------------------------------------------------------------------- JSON


def write_results(path: Path, results: list[TargetResult], hardware: dict[str, Any], **extra: Any) -> None:
    """The benchmark JSON: the machine (`codraft.hardware.describe`) and the targets' results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"hardware": hardware, **extra, "targets": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=1, default=str))


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {"hardware": None, "targets": data}  # files written before the hardware block


def load_results(path: Path) -> list[TargetResult]:
    """A benchmark JSON as written by `write_results` (or a bare list of targets, as before), back as `TargetResult`s."""
    known = {f.name for f in dataclasses.fields(Cell)}
    return [TargetResult(t["name"], t["parameters"], [Cell(**{k: v for k, v in c.items() if k in known}) for c in t.get("cells", [])],
                         t.get("grpo", {}), t.get("profiles", {}), t.get("vanilla", [])) for t in _read(path)["targets"]]


def load_hardware(path: Path) -> dict[str, Any] | None:
    """The machine a benchmark JSON was measured on (None for files written before it was recorded)."""
    return _read(path).get("hardware")


def hardware_label(hardware: dict[str, Any] | None) -> str:
    from codraft.hardware import label

    if not hardware:
        return "hardware not recorded"
    mode = f", {hardware['engine_mode']} vLLM" if hardware.get("engine_mode") else ""
    return f"{label(hardware)}{mode}, OpenMP {hardware.get('openmp', '?')}"


# ---------------------------------------------------------------------------------- paired statistics


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: the repeat-to-repeat spread (NaN for fewer than two values)."""
    values = [v for v in values if v == v]
    if len(values) < 2:
        return NAN
    return (max(values) - min(values)) / statistics.median(values)


@dataclass(frozen=True)
class PairedRatio:
    """Per repeat, b's throughput over a's, timed alternately."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else NAN

    @property
    def low(self) -> float:
        return min(self.ratios, default=NAN)

    @property
    def high(self) -> float:
        return max(self.ratios, default=NAN)

    @property
    def spread(self) -> float:
        return spread(self.ratios)


def paired_ratio(a_seconds: Sequence[float], a_tokens: Sequence[float], b_seconds: Sequence[float], b_tokens: Sequence[float]) -> PairedRatio:
    """Per repeat r: (b_tokens[r] / b_seconds[r]) / (a_tokens[r] / a_seconds[r])."""
    return PairedRatio(tuple((bt / bs) / (at / as_) for as_, at, bs, bt in zip(a_seconds, a_tokens, b_seconds, b_tokens)))


# ---------------------------------------------------------------------------------- paired timing


@dataclass
class Side:
    """One engine's timed repeats: seconds and tokens of each repeat (all its calls), summed acceptance."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    acceptance: Any = None
    last: Any = None
    """The last timed `Generation`."""

    def per_call(self, calls: int) -> tuple[float, float]:
        """(median seconds, median tokens) of one generate call."""
        return statistics.median(self.seconds) / calls, statistics.median(self.tokens) / calls


@dataclass
class PairTiming:
    a: Side
    b: Side
    calls: int

    @property
    def ratio(self) -> PairedRatio:
        return paired_ratio(self.a.seconds, self.a.tokens, self.b.seconds, self.b.tokens)


def _run(engine, side: Side | None, prompts, n: int, sampling, seeds: Sequence[int]) -> float:
    t0 = perf_counter()
    gens = [engine.generate(prompts, n=n, sampling=sampling, seed=s) for s in seeds]
    seconds = perf_counter() - t0
    if side is not None:
        side.seconds.append(seconds)
        side.tokens.append(sum(g.num_tokens for g in gens))
        for g in gens:
            if g.acceptance is not None:
                side.acceptance = g.acceptance if side.acceptance is None else side.acceptance + g.acceptance
        side.last = gens[-1]
    return seconds


def time_pair(a, b, prompts: list[list[int]], sampling, repeats: int, min_seconds: float, seed: int, n: int = 1) -> PairTiming:
    """Time `a` and `b` on the same batch alternately (see the module docstring): an untimed call
    of each first (a new batch size compiles), then a probe of `a` that sizes the calls per repeat."""
    _run(a, None, prompts, n, sampling, [seed - 1])
    _run(b, None, prompts, n, sampling, [seed - 1])
    probe = _run(a, None, prompts, n, sampling, [seed - 2])
    calls = max(1, math.ceil(min_seconds / max(probe, 1e-6)))
    out = PairTiming(Side(), Side(), calls)
    for r in range(repeats):
        seeds = [seed + r * calls + i for i in range(calls)]
        order = ((a, out.a), (b, out.b)) if r % 2 == 0 else ((b, out.b), (a, out.a))
        for engine, side in order:
            _run(engine, side, prompts, n, sampling, seeds)
    return out


def ratio_fields(ratio: PairedRatio, prefix: str) -> dict[str, Any]:
    """A paired ratio as flat JSON fields: `<prefix>` (median), `<prefix>_range`, `<prefix>_spread`."""
    return {prefix: ratio.median, f"{prefix}_range": [ratio.low, ratio.high], f"{prefix}_spread": ratio.spread}


# ---------------------------------------------------------------------------------- what is timed


@dataclass
class Setup:
    """A target ready to time: its config, policy, prompts."""

    cfg: Any
    policy_dir: Path
    tokenizer: Any
    policy: Any
    prompts: list[list[int]]
    """Prompts whose worked solutions outrun the token budget (the running batch stays full)."""
    train_ids: list[list[int]]
    """Prompts for warm starts and the engine-start cost profile."""
    grpo_prompts: list[list[int]]
    """One GRPO step's prompts (natural lengths)."""

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.policy.parameters())


def _long_prompts(cfg, tok, n: int) -> list[list[int]]:
    """Held-out (then training) prompts whose worked solutions outrun the token budget."""
    from codraft.task import make_task

    train, held = make_task(cfg.task, cfg.task.seed).splits()
    rows = list(held) + list(train)
    rows.sort(key=lambda r: -len(r["solution"]))
    return [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows[:n]]


def setup_target(name: str, preset: str, overrides: Sequence[str], eager: bool, max_batch: int, log=print) -> Setup:
    """The target `name` (`testbed`, or `large`: ~4x parameters) of `preset` with `overrides`. The
    engines of a comparison stay up side by side: on a GPU each takes 40% of its memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.configfile import load_config
    from codraft.task import make_task
    from codraft.testbed import policy_source

    over = (LARGE if name == "large" else []) + [f"rollout.engine_mode={'eager' if eager else 'compiled'}", f"rollout.max_num_seqs={max_batch}",
                                                 "rollout.gpu_memory_utilization=0.4", *overrides]
    cfg = load_config(preset, overrides=over)
    policy_dir = policy_source(cfg, log=log)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    train, _ = make_task(cfg.task, cfg.task.seed).splits()
    grpo = [tok(r["prompt"], add_special_tokens=False).input_ids for r in list(train)[: cfg.rollout.prompts_per_step]]
    return Setup(cfg, policy_dir, tok, policy, _long_prompts(cfg, tok, max_batch), _long_prompts(cfg, tok, 512), grpo)


def drafter_for(setup: Setup, kind: str, k: int, log=print):
    """(config with this drafter kind at k, drafter, exported path): the cached warm start of `kind`."""
    from codraft.warmstart import initial_drafter

    cfg = setup.cfg
    kcfg = dataclasses.replace(cfg, drafter=dataclasses.replace(cfg.drafter, kind=kind, num_speculative_tokens=k))
    warm = dataclasses.replace(kcfg, drafter=dataclasses.replace(kcfg.drafter, num_speculative_tokens=cfg.drafter.num_speculative_tokens))
    drafter, path = initial_drafter(warm, setup.policy, setup.train_ids, setup.policy_dir, setup.tokenizer.eos_token_id,
                                    setup.tokenizer.pad_token_id, log=log)
    return kcfg, drafter, path


def grpo_sampling(cfg):
    from codraft.engine import Sampling

    return Sampling(cfg.rollout.temperature, 1.0, cfg.rollout.max_new_tokens)


# ---------------------------------------------------------------------------------- cost-model predictions


def fit_rows(cells: list[Cell]) -> list[tuple[Cell, list[int], float, float]]:
    """(cell, its sequences' lengths, its alpha, seconds to fit): each sequence runs the full token
    budget. A speculative cell's seconds are its paired speedup applied to the plain cell of its
    batch (load swings between cells cancel); plain cells keep theirs."""
    from codraft.costmodel import alpha_from_accept_len

    plain_rate = {c.batch: c.tokens / c.seconds for c in cells if c.kind == "none"}
    rows = []
    for c in cells:
        seconds = c.seconds
        if c.k and c.batch in plain_rate and c.speedup == c.speedup:
            seconds = c.tokens / (plain_rate[c.batch] * c.speedup)
        alpha = alpha_from_accept_len(c.accept_len, c.k) if c.k else NAN
        rows.append((c, [round(c.tokens / c.batch)] * c.batch, alpha, seconds))
    return rows


def calibrate(rows, model=None):
    from codraft.costmodel import CostModel

    model = model or CostModel()
    for c, lengths, alpha, seconds in rows:
        model.observe(lengths, alpha, c.k, seconds, c.kind != "none")
    return model


def _predicted_speedup(model, lengths, alpha, k) -> float:
    return model.predict_gen_s(lengths, NAN, 0) / model.predict_gen_s(lengths, alpha, k)


def predict_cells(result: TargetResult) -> None:
    """Per drafter kind, calibrate a cost model on the target's plain cells and that kind's cells (a
    run's controller only ever times its own drafter) and set every speculative cell's predicted
    speedup from its measured acceptance (`predicted`), and from a model calibrated without it
    (`loo`). With the kind's engine-start profile: the profiled model's forecast (`profiled`) and
    the profiled model refined with every other cell (`profiled_loo`), as a run refines it."""
    from codraft.costprofile import Timing, fit

    plain = [c for c in result.cells if c.kind == "none"]
    result.grpo["cost_model"] = {}
    for kind in dict.fromkeys(c.kind for c in result.cells if c.kind != "none"):
        rows = fit_rows(plain + [c for c in result.cells if c.kind == kind])
        model = calibrate(rows)
        stored = result.profiles.get(kind, {}).get("timings")
        timings = [Timing(t["batch"], t["k"], tuple(t["lengths"]), t["seconds"], t.get("accept_len", NAN)) for t in stored or []]
        for i, (c, lengths, alpha, _) in enumerate(rows):
            if c.kind == "none":
                continue
            others = rows[:i] + rows[i + 1:]
            c.predicted = _predicted_speedup(model, lengths, alpha, c.k)
            c.loo = _predicted_speedup(calibrate(others), lengths, alpha, c.k)
            if timings:
                c.profiled = _predicted_speedup(fit(timings), lengths, alpha, c.k)
                c.profiled_loo = _predicted_speedup(calibrate(others, fit(timings)), lengths, alpha, c.k)
        result.grpo["cost_model"][kind] = dataclasses.asdict(model.costs)
        if timings:
            result.profiles[kind]["costs"] = dataclasses.asdict(fit(timings).costs)


def prediction_errors(cells: list[Cell], field: str = "predicted") -> list[float]:
    """|predicted - measured| / measured over the speculative cells that have a prediction."""
    return [abs(getattr(c, field) - c.speedup) / c.speedup for c in cells if c.k and getattr(c, field) == getattr(c, field)]
