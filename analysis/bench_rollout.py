"""Rollout benchmark: speculative against plain decoding, by drafter kind, k and running batch.

    python -m analysis.bench_rollout                       # testbed and a ~4x larger target, compiled vLLM
    python -m analysis.bench_rollout --targets testbed --kinds eagle3 --ks 1 3 --batches 1 16 --repeats 3
    python -m analysis.bench_rollout --baseline vanilla    # codraft's engine against a plain vllm.LLM
    python -m analysis.bench_rollout --refit runs/a.json runs/b.json   # recompute the cost models, print

For each target (the testbed policy and one built the same way with ~4x the parameters, both
SFT-warm-started, their drafters distilled before timing), in one process and in vLLM's compiled
mode: a plain engine, kept up beside one engine per drafter kind (built with the largest k,
switched to each k through the live scheduler's k-by-batch-size table). Each cell times `b`
held-out prompts whose solutions are longer than the token budget, so the running batch stays at
`b` throughout, on the plain and the speculative engine alternately (analysis/bench_cells.py:
each repeat at least `min_seconds` of plain decoding, the speedup the median of the paired ratios,
with their range and spread). Per cell it prints the measured acceptance length, the measured
draft/target step-cost ratio c, the speedup, and the speedup codraft's cost model predicts from the
measured acceptance: calibrated per drafter kind on the plain cells and the kind's cells, the same
leaving the predicted cell out (a forecast), the model fitted on the engine-start profile alone
(codraft/costprofile.py, timed on the kind's engine before its cells), and that model refined with
every other cell (as a run refines it). Then a whole GRPO rollout batch (natural lengths, long tail
included) at fixed k and with the `auto` k schedule the cost model derives, each paired with the
plain engine. Every table names the machine; the JSON carries `codraft.hardware.describe()`.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from analysis.bench_cells import (Cell, TargetResult, calibrate, drafter_for, fit_rows, grpo_sampling, hardware_label, load_hardware, load_results,
                                  predict_cells, prediction_errors, ratio_fields, setup_target, spread, time_pair, write_results)
from drafters._index_refresh import IndexRefresh

__all__ = ["BenchArgs", "Cell", "TargetResult", "load_results", "main", "predict_cells", "prediction_errors", "print_tables"]


@dataclass
class BenchArgs:
    """Time speculative rollouts (tokens/s, acceptance, cost ratio, speedup vs the cost model)."""

    targets: tuple[str, ...] = ("testbed", "large")
    """Targets: `testbed` (the preset's policy) and `large` (~4x parameters, built the same way)."""
    kinds: tuple[str, ...] = ("eagle3", "mtp", "draft_model", "suffix", "hybrid")
    """Drafter kinds to time (`suffix`, `hybrid`: the index holds one earlier epoch of the same prompts' rollouts)."""
    ks: tuple[int, ...] = (1, 2, 3, 5)
    """Draft lengths k."""
    batches: tuple[int, ...] = (1, 4, 16, 64)
    """Running batch sizes (64 = the default preset's GRPO batch)."""
    tokens: int = 48
    """Tokens generated per sequence by one generate call of a cell."""
    repeats: int = 5
    """Timed repeats per cell, each engine alternately (median, range and spread of the paired ratios)."""
    min_seconds: float = 1.0
    """Each repeat runs as many generate calls as take the plain engine at least this long (a probe sizes it)."""
    eager: bool = False
    """Use vLLM's eager mode instead of compiled mode."""
    out: Path = Path("runs/bench_rollout.json")
    """Where the measurements are written (JSON; `--baseline vanilla` writes runs/bench_vanilla.json unless given)."""
    preset: str = "default"
    """Config preset the targets start from."""
    overrides: tuple[str, ...] = ()
    """Config overrides (`section.key=value`) on top of the preset, e.g. a smaller testbed."""
    profile: bool = True
    """Time the engine-start cost profile (codraft/costprofile.py) on each kind's engine and forecast the cells from it."""
    baseline: str = ""
    """`vanilla`: time codraft's engine against a plain vllm.LLM with the same settings instead (analysis/bench_vanilla.py)."""
    refit: tuple[Path, ...] = ()
    """Time nothing: recompute the cost model's predictions for saved benchmark JSONs (e.g. after changing
    `codraft/costmodel.py`) and print their tables, with the forecast errors per CPU type."""


def spec_cell(name: str, kind: str, k: int, b: int, timing) -> Cell:
    """A speculative cell from its paired timing (a: plain, b: speculative)."""
    calls = timing.calls
    plain_s, plain_tok = timing.a.per_call(calls)
    spec_s, spec_tok = timing.b.per_call(calls)
    acc = timing.b.acceptance
    drafts = acc.drafts / (calls * len(timing.b.seconds)) if acc is not None else 0  # verify steps per call
    t_plain = plain_s / (plain_tok / b)  # seconds per plain step
    t_spec = spec_s / (drafts / b) if drafts else float("nan")  # seconds per verify step
    ratio = timing.ratio
    return Cell(name, kind, k, b, spec_s, spec_tok, acc.accept_len if acc is not None else float("nan"), (t_spec - t_plain) / (k * t_plain),
                ratio.median, speedup_low=ratio.low, speedup_high=ratio.high, spread=ratio.spread, plain_seconds=plain_s,
                calls=calls, repeats=len(ratio.ratios))


def plain_cells(name: str, timings: dict[int, list]) -> list[Cell]:
    """Per running batch, the plain engine over every timing it was paired in: median seconds and
    tokens of a call, and the spread of its per-call seconds."""
    cells = []
    for b, pairs in sorted(timings.items()):
        per_call = [s / t.calls for t in pairs for s in t.a.seconds]
        tokens = [n / t.calls for t in pairs for n in t.a.tokens]
        cells.append(Cell(name, "none", 0, b, statistics.median(per_call), statistics.median(tokens), spread=spread(per_call),
                          repeats=len(per_call), plain_seconds=statistics.median(per_call)))
    return cells


def _grpo_rows(plain, engine, setup, kcfg, args, cells: list[Cell], log) -> dict:
    """The GRPO batch at fixed k and with the `auto` schedule the cost model calibrated on `cells`
    (the plain ones and the kind's) derives, each paired with the plain engine."""
    from codraft.costmodel import alpha_from_accept_len

    cfg, n = setup.cfg, setup.cfg.rollout.group_size
    lengths = [len(c.token_ids) for c in plain.generate(setup.grpo_prompts, n=n, sampling=grpo_sampling(cfg), seed=99).completions]
    alpha = statistics.median(a for c in cells if (a := alpha_from_accept_len(c.accept_len, c.k)) == a)
    fixed = max(k for k in args.ks if k <= 3)
    engine.set_k_schedule([(1, kcfg.rollout.max_num_seqs, fixed)])
    at_fixed = time_pair(plain, engine, setup.grpo_prompts, grpo_sampling(cfg), args.repeats, args.min_seconds, seed=100, n=n)
    model = calibrate(fit_rows(cells))  # what a run with this drafter learns
    auto = list(model.best_k_schedule(alpha, range(1, kcfg.rollout.max_num_seqs + 1), ks=tuple(sorted({0, *args.ks})), lengths=lengths))
    engine.set_k_schedule(auto)
    at_auto = time_pair(plain, engine, setup.grpo_prompts, grpo_sampling(cfg), args.repeats, args.min_seconds, seed=200, n=n)
    g_fixed, g_auto = at_fixed.b.acceptance, at_auto.b.acceptance
    log(f"GRPO batch, {cells[-1].kind}: fixed k={fixed} {at_fixed.ratio.median:.2f}x, auto {at_auto.ratio.median:.2f}x")
    return {
        "plain_s": statistics.median(at_auto.a.seconds) / at_auto.calls, "fixed_k": fixed, "fixed_s": statistics.median(at_fixed.b.seconds) / at_fixed.calls,
        **ratio_fields(at_fixed.ratio, "fixed_vs_plain"), "auto_schedule": auto, "auto_s": statistics.median(at_auto.b.seconds) / at_auto.calls,
        **ratio_fields(at_auto.ratio, "auto_vs_plain"), "tokens": at_auto.b.last.num_tokens,
        "max_len": max(len(c.token_ids) for c in at_auto.b.last.completions),
        "accept_fixed": g_fixed.accept_len if g_fixed else float("nan"), "accept_auto": g_auto.accept_len if g_auto and g_auto.drafts else float("nan"),
    }


def _profile(engine, kcfg, drafter, setup, log) -> dict:
    from codraft.costprofile import profile_cost_model

    prof = profile_cost_model(engine, kcfg, drafter, setup.train_ids, refresh=True, log=log)
    return {"key": prof.key, "seconds": prof.seconds, "cached": prof.cached, "timings": [dataclasses.asdict(t) for t in prof.timings]}


def _earlier_epoch(plain, engine, drafter, setup, batch: int, log) -> None:
    """A suffix index's contents (drafters/suffix.py, drafters/hybrid.py) before timing: one earlier epoch of rollouts of
    the prompts the cells and the GRPO rows use (the plain engine, other seeds), as a run holds
    after its first pass over the data; siblings of the same batch join it while it generates."""
    prompts = setup.prompts[:batch] + setup.grpo_prompts
    n = setup.cfg.rollout.group_size
    gen = plain.generate(prompts, n=n, sampling=grpo_sampling(setup.cfg), seed=12345)
    metrics = drafter.on_rollouts(engine, prompts, [c.token_ids for c in gen.completions], [c.prompt_index for c in gen.completions])
    log(f"{drafter.name}: index of one earlier epoch, {metrics['drafter/index_rollouts']:.0f} rollouts, {metrics['drafter/index_tokens']:.0f} tokens")


def bench_target(name: str, args: BenchArgs, log=print) -> TargetResult:
    from codraft.vllm_engine import VLLMEngine

    setup = setup_target(name, args.preset, args.overrides, args.eager, max(args.batches + (64,)), log)
    cfg = setup.cfg
    result = TargetResult(name, setup.parameters)
    log(f"[{name}] {result.parameters / 1e6:.1f}M parameters")
    plain = VLLMEngine(cfg, setup.policy_dir)
    sampling = dataclasses.replace(grpo_sampling(cfg), temperature=1.0, max_new_tokens=args.tokens)
    pairs: dict[int, list] = {}
    for kind in args.kinds:
        kcfg, drafter, path = drafter_for(setup, kind, max(args.ks), log)
        spec = drafter.speculative_config(path, max(args.ks))
        spec["num_speculative_tokens_per_batch_size"] = [[1, kcfg.rollout.max_num_seqs, max(args.ks)]]
        engine = VLLMEngine(kcfg, setup.policy_dir, speculative=spec, target_overrides=drafter.target_overrides())
        if isinstance(drafter, IndexRefresh):  # suffix, hybrid: an index of one earlier epoch
            _earlier_epoch(plain, engine, drafter, setup, max(args.batches), log)
        if args.profile:
            result.profiles[kind] = _profile(engine, kcfg, drafter, setup, log)
        for k in args.ks:
            engine.set_k_schedule([(1, kcfg.rollout.max_num_seqs, k)])
            for b in args.batches:
                timing = time_pair(plain, engine, setup.prompts[:b], sampling, args.repeats, args.min_seconds, seed=1)
                pairs.setdefault(b, []).append(timing)
                cell = spec_cell(name, kind, k, b, timing)
                result.cells.append(cell)
                log(f"[{name}] {kind} k={k} b={b}: accept {cell.accept_len:.2f}, c {cell.c_ratio:.2f}, speedup {cell.speedup:.2f}x "
                    f"({cell.speedup_low:.2f}-{cell.speedup_high:.2f}, spread {cell.spread:.0%}, {cell.calls} calls per repeat)")
        cells = plain_cells(name, pairs) + [c for c in result.cells if c.kind == kind]
        result.grpo[kind] = _grpo_rows(plain, engine, setup, kcfg, args, cells, log)
        engine.close()
    plain.close()
    result.cells = plain_cells(name, pairs) + [c for c in result.cells if c.kind != "none"]
    predict_cells(result)
    return result


# ---------------------------------------------------------------------------------- tables


def _x(value: float) -> str:
    return f"{value:.2f}x" if value == value else ""


def _cells_table(res: TargetResult, where: str):
    from rich.table import Table

    table = Table(title=f"{res.name} target ({res.parameters / 1e6:.1f}M parameters) on {where}: tokens/s and speedup over plain decoding "
                        "(median of paired repeats, range, spread = range / median)")
    for col in ("kind", "k", "batch", "tokens/s", "accept len", "c", "speedup", "range", "spread", "cost model", "error", "left out", "error",
                "profiled", "error", "profiled + rest", "error"):
        table.add_column(col, justify="right")
    for c in res.cells:
        def shown(p):
            return (_x(p), f"{(p - c.speedup) / c.speedup:+.0%}") if c.k and p == p else ("", "")
        rng = f"{c.speedup_low:.2f}-{c.speedup_high:.2f}" if c.k and c.speedup_low == c.speedup_low else ""
        table.add_row(c.kind, str(c.k), str(c.batch), f"{c.tokens / c.seconds:.0f}", f"{c.accept_len:.2f}" if c.k else "",
                      f"{c.c_ratio:.2f}" if c.k else "", _x(c.speedup) if c.k else "", rng, f"{c.spread:.0%}" if c.spread == c.spread else "",
                      *shown(c.predicted), *shown(c.loo), *shown(c.profiled), *shown(c.profiled_loo))
    return table


def _grpo_table(res: TargetResult, where: str):
    from rich.table import Table

    grpo = Table(title=f"{res.name} on {where}: one GRPO rollout batch (natural lengths, long tail included), seconds; speedups are "
                       "medians of run-by-run ratios to a plain engine timed alternately")
    for col in ("kind", "plain", "fixed k", "fixed", "fixed vs plain", "range", "auto schedule", "auto", "auto vs plain", "range", "spread"):
        grpo.add_column(col, justify="right")
    for kind, g in res.grpo.items():
        if kind == "cost_model":
            continue
        sched = ",".join(f"{lo}-{hi}:{k}" for lo, hi, k in g["auto_schedule"])
        def rng(key):  # files written before the paired timing lack these
            lo, hi = g.get(key, ["", ""])
            return f"{lo:.2f}-{hi:.2f}" if lo != "" else ""
        spr = g.get("auto_vs_plain_spread", float("nan"))
        grpo.add_row(kind, f"{g['plain_s']:.2f}", str(g["fixed_k"]), f"{g['fixed_s']:.2f}", _x(g.get("fixed_vs_plain", g["plain_s"] / g["fixed_s"])),
                     rng("fixed_vs_plain_range"), sched, f"{g['auto_s']:.2f}", _x(g.get("auto_vs_plain", g["plain_s"] / g["auto_s"])),
                     rng("auto_vs_plain_range"), f"{spr:.0%}" if spr == spr else "")
    return grpo


FORECASTS = (("predicted", "calibrated on all of its kind's cells"), ("loo", "each cell left out of the calibration that predicts it"),
             ("profiled", "the engine-start profile alone"), ("profiled_loo", "the profile refined with every other cell"))


def error_summary(cells: list[Cell]) -> list[tuple[str, str]]:
    """(what, text) per forecast that has predictions: median and max error, cells within 15%."""
    lines = []
    for field, what in FORECASTS:
        errors = prediction_errors(cells, field)
        if errors:
            lines.append((field, f"cost model, {what}: {len(errors)} cells, median error {statistics.median(errors):.0%}, max {max(errors):.0%}, "
                                 f"within 15%: {sum(e <= 0.15 for e in errors)}/{len(errors)}"))
    return lines


def print_tables(results: list[TargetResult], hardware: dict | None = None) -> None:
    from rich.console import Console

    console = Console(width=200)
    where = hardware_label(hardware)
    for res in results:
        console.print(_cells_table(res, where))
        console.print(_grpo_table(res, where))
        spreads = [c.spread for c in res.cells if c.k and c.spread == c.spread]
        if spreads:
            console.print(f"repeat-to-repeat spread of the paired ratios: median {statistics.median(spreads):.0%}, max {max(spreads):.0%}, "
                          f"under 10%: {sum(s < 0.10 for s in spreads)}/{len(spreads)} cells")
        for _, text in error_summary(res.cells):
            console.print(text)


def print_cpu_summary(files: list[tuple[dict | None, list[TargetResult]]]) -> None:
    """Forecast errors grouped by CPU type over several benchmark files."""
    from rich.console import Console
    from rich.table import Table

    from codraft.hardware import cpu_class

    groups: dict[str, list[Cell]] = {}
    for hardware, results in files:
        groups.setdefault(cpu_class(hardware) if hardware else "not recorded", []).extend(c for r in results for c in r.cells)
    table = Table(title="cost-model forecast error by CPU type: median error, cells within 15%")
    for col in ("CPU type", *(f for f, _ in FORECASTS)):
        table.add_column(col, justify="right")
    for cls, cells in groups.items():
        row = []
        for field, _ in FORECASTS:
            errors = prediction_errors(cells, field)
            row.append(f"{statistics.median(errors):.0%}, {sum(e <= 0.15 for e in errors)}/{len(errors)}" if errors else "")
        table.add_row(cls, *row)
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    import os

    import tyro

    args = tyro.cli(BenchArgs, args=sys.argv[1:] if argv is None else argv, prog="python -m analysis.bench_rollout")
    if args.refit:
        files = []
        for path in args.refit:
            if not path.is_file():
                raise SystemExit(f"--refit {path}: no such benchmark file")
            results = load_results(path)
            for result in results:
                predict_cells(result)
            files.append((load_hardware(path), results))
            print_tables(results, files[-1][0])
        if len(files) > 1:
            print_cpu_summary(files)
        return 0
    if args.baseline not in ("", "vanilla"):
        raise SystemExit(f"--baseline {args.baseline!r}: the only baseline is `vanilla`")
    if argv is None:  # timing vLLM from the command line: preload Intel OpenMP first
        from codraft.openmp import reexec_with_intel_openmp

        reexec_with_intel_openmp()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from codraft.hardware import describe

    hardware = describe(engine_mode="eager" if args.eager else "compiled")
    if args.baseline == "vanilla":
        from analysis.bench_vanilla import run_vanilla

        return run_vanilla(args, hardware)
    results = [bench_target(name, args) for name in args.targets]
    write_results(args.out, results, hardware)
    print_tables(results, hardware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
