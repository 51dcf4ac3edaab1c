"""Rollout benchmark: tokens/s without speculation and with each drafter kind, by k and running batch.

    python -m analysis.bench_rollout                       # testbed and a ~4x larger target, compiled vLLM
    python -m analysis.bench_rollout --targets testbed --ks 1 3 --batches 1 16 --repeats 2

For each target (the testbed policy and one built the same way with ~4x the parameters, both
SFT-warm-started, their drafters distilled before timing), in one process and in vLLM's compiled
mode: a plain engine and one engine per drafter kind (built with the largest k, switched to each k
through the live scheduler's k-by-batch-size table). Each cell times `b` held-out prompts whose
solutions are longer than the token budget, so the running batch stays at `b` throughout; the
median of `repeats` runs is kept. Per cell it prints the measured acceptance length, the measured
draft/target step-cost ratio c = (T_spec - T_plain) / (k T_plain), the measured speedup, and the
speedup predicted by codraft's cost model from the measured acceptance: one model per drafter kind,
calibrated on the target's plain cells and that kind's cells, and, as a forecast, the same model
calibrated without the cell it predicts (leave one out). Then a whole GRPO rollout batch (natural
lengths, its long tail included) is timed at fixed k and with the `auto` k schedule the cost model
derives, each alternated run by run with the plain engine (kept up beside the speculative one), so
that its speedup is a median of paired ratios that a shared machine's load swings move together.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LARGE = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=4", "model.intermediate_size=1536"]


@dataclass
class BenchArgs:
    """Time speculative rollouts (tokens/s, acceptance, cost ratio, speedup vs the cost model)."""

    targets: tuple[str, ...] = ("testbed", "large")
    """Targets: `testbed` (the default preset's policy) and `large` (~4x parameters, built the same way)."""
    kinds: tuple[str, ...] = ("eagle3", "mtp", "draft_model")
    """Drafter kinds to time."""
    ks: tuple[int, ...] = (1, 2, 3, 5)
    """Draft lengths k."""
    batches: tuple[int, ...] = (1, 4, 16, 64)
    """Running batch sizes (64 = the default preset's GRPO batch)."""
    tokens: int = 48
    """Tokens generated per sequence in a cell."""
    repeats: int = 3
    """Timed repetitions per cell (median kept)."""
    eager: bool = False
    """Use vLLM's eager mode instead of compiled mode."""
    out: Path = Path("runs/bench_rollout.json")
    """Where the measurements are written (JSON)."""
    preset: str = "default"
    """Config preset the targets start from."""
    refit: Path | None = None
    """Time nothing: recompute the cost model's predictions for a saved benchmark JSON (e.g. after
    changing `codraft/costmodel.py`) and print its tables."""


@dataclass
class Cell:
    target: str
    kind: str
    k: int
    batch: int
    seconds: float
    tokens: int
    accept_len: float = float("nan")
    c_ratio: float = float("nan")
    speedup: float = float("nan")
    predicted: float = float("nan")
    loo: float = float("nan")


@dataclass
class TargetResult:
    name: str
    parameters: int
    cells: list[Cell] = field(default_factory=list)
    grpo: dict = field(default_factory=dict)


def _long_prompts(cfg, tok, n: int) -> list[list[int]]:
    """Held-out (then training) prompts whose worked solutions outrun the token budget."""
    from codraft.task import make_task

    train, held = make_task(cfg.task, cfg.task.seed).splits()
    rows = list(held) + list(train)
    rows.sort(key=lambda r: -len(r["solution"]))
    return [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows[:n]]


def _time(engine, prompts, tokens: int, repeats: int, seed: int):
    from codraft.engine import Sampling

    # untimed warm-up: the first batch of a new size compiles and captures vLLM's graphs (seen: plain
    # decoding at batch 1 timed at 32 tokens/s cold, which made speculation look 7x faster)
    engine.generate(prompts, n=1, sampling=Sampling(1.0, 1.0, tokens), seed=seed - 1)
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        gen = engine.generate(prompts, n=1, sampling=Sampling(1.0, 1.0, tokens), seed=seed + r)
        runs.append((time.perf_counter() - t0, gen))
    runs.sort(key=lambda x: x[0])
    seconds, gen = runs[len(runs) // 2]
    return seconds, gen


def bench_target(name: str, args: BenchArgs, log=print) -> TargetResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.configfile import load_config
    from codraft.costmodel import alpha_from_accept_len
    from codraft.testbed import policy_source
    from codraft.vllm_engine import VLLMEngine
    from codraft.warmstart import initial_drafter

    # the plain engine stays up beside each speculative one (each GRPO row is timed alternately with
    # it): on a GPU each takes 40% of its memory
    overrides = (LARGE if name == "large" else []) + [f"rollout.enforce_eager={str(args.eager).lower()}", f"rollout.max_num_seqs={max(args.batches + (64,))}",
                                                      "rollout.gpu_memory_utilization=0.4"]
    cfg = load_config(args.preset, overrides=overrides)
    policy_dir = policy_source(cfg, log=log)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    result = TargetResult(name, sum(p.numel() for p in policy.parameters()))
    prompts = _long_prompts(cfg, tok, max(args.batches))
    train_ids = [p for p in _long_prompts(cfg, tok, 512)]
    log(f"[{name}] {result.parameters / 1e6:.1f}M parameters; timing plain decoding")

    plain = VLLMEngine(cfg, policy_dir)
    base: dict[int, tuple[float, int]] = {}
    for b in args.batches:
        secs, gen = _time(plain, prompts[:b], args.tokens, args.repeats, seed=1)
        base[b] = (secs, gen.num_tokens)
        result.cells.append(Cell(name, "none", 0, b, secs, gen.num_tokens))
    grpo_prompts = [p["ids"] for p in _grpo_batch(cfg, tok)]
    grpo_lengths = [len(c.token_ids) for c in plain.generate(grpo_prompts, n=cfg.rollout.group_size, sampling=_grpo_sampling(cfg), seed=99).completions]

    for kind in args.kinds:
        kcfg = dataclasses.replace(cfg, drafter=dataclasses.replace(cfg.drafter, kind=kind, num_speculative_tokens=max(args.ks)))
        drafter, path = initial_drafter(dataclasses.replace(kcfg, drafter=dataclasses.replace(kcfg.drafter, num_speculative_tokens=cfg.drafter.num_speculative_tokens)),
                                        policy, train_ids, policy_dir, tok.eos_token_id, tok.pad_token_id, log=log)
        spec = drafter.speculative_config(path, max(args.ks))
        spec["num_speculative_tokens_per_batch_size"] = [[1, kcfg.rollout.max_num_seqs, max(args.ks)]]
        engine = VLLMEngine(kcfg, policy_dir, speculative=spec, target_overrides=drafter.target_overrides())
        alphas = []
        for k in args.ks:
            engine.set_k_schedule([(1, kcfg.rollout.max_num_seqs, k)])
            for b in args.batches:
                secs, gen = _time(engine, prompts[:b], args.tokens, args.repeats, seed=1)
                acc = gen.acceptance
                t_plain = base[b][0] / (base[b][1] / b)  # seconds per plain step
                t_spec = secs / max(1, acc.drafts / b)  # seconds per verify step
                cell = Cell(name, kind, k, b, secs, gen.num_tokens, acc.accept_len, (t_spec - t_plain) / (k * t_plain), (gen.num_tokens / secs) / (base[b][1] / base[b][0]))
                result.cells.append(cell)
                alpha = alpha_from_accept_len(acc.accept_len, k)
                alphas.append(alpha)
                log(f"[{name}] {kind} k={k} b={b}: accept {cell.accept_len:.2f}, c {cell.c_ratio:.2f}, speedup {cell.speedup:.2f}x")
        alpha = statistics.median(a for a in alphas if a == a)
        fixed = max(k for k in args.ks if k <= 3)
        engine.set_k_schedule([(1, kcfg.rollout.max_num_seqs, fixed)])
        at_fixed = _time_grpo_beside(plain, engine, grpo_prompts, cfg, args.repeats)
        model = _calibrated(_cell_rows([c for c in result.cells if c.kind in ("none", kind)]))  # what a run with this drafter learns
        auto = list(model.best_k_schedule(alpha, range(1, kcfg.rollout.max_num_seqs + 1), ks=tuple(sorted({0, *args.ks})), lengths=grpo_lengths))
        engine.set_k_schedule(auto)
        at_auto = _time_grpo_beside(plain, engine, grpo_prompts, cfg, args.repeats)
        g_fixed, g_auto = at_fixed["gen"], at_auto["gen"]
        result.grpo[kind] = {
            "plain_s": at_auto["plain_s"], "fixed_k": fixed, "fixed_s": at_fixed["spec_s"], "fixed_vs_plain": at_fixed["ratio"],
            "auto_schedule": auto, "auto_s": at_auto["spec_s"], "auto_vs_plain": at_auto["ratio"],
            "auto_vs_plain_range": [at_auto["ratio_min"], at_auto["ratio_max"]],
            "tokens": g_auto.num_tokens, "max_len": max(len(c.token_ids) for c in g_auto.completions),
            "accept_fixed": g_fixed.acceptance.accept_len, "accept_auto": g_auto.acceptance.accept_len if g_auto.acceptance.drafts else float("nan"),
        }
        engine.close()
    plain.close()
    predict_cells(result)
    return result


def _cell_rows(cells: list[Cell]) -> list[tuple[Cell, list[int], float]]:
    """(cell, its sequences' lengths, its alpha): each sequence runs the full token budget."""
    from codraft.costmodel import alpha_from_accept_len

    return [(c, [round(c.tokens / c.batch)] * c.batch, alpha_from_accept_len(c.accept_len, c.k) if c.k else float("nan")) for c in cells]


def _calibrated(rows):
    from codraft.costmodel import CostModel

    model = CostModel()
    for c, lengths, alpha in rows:
        model.observe(lengths, alpha, c.k, c.seconds, c.kind != "none")
    return model


def _predicted_speedup(model, lengths, alpha, k) -> float:
    return model.predict_gen_s(lengths, float("nan"), 0) / model.predict_gen_s(lengths, alpha, k)


def predict_cells(result: TargetResult) -> None:
    """Per drafter kind, calibrate a cost model on the target's plain cells and that kind's cells (a
    run's controller only ever times its own drafter: its costs are the drafter's), and set every
    speculative cell's predicted speedup from its measured acceptance. Also predict each cell from a
    model calibrated without it (`loo`, leave one out): what the model forecasts for a cell it has
    not seen."""
    plain = [c for c in result.cells if c.kind == "none"]
    result.grpo["cost_model"] = {}
    for kind in dict.fromkeys(c.kind for c in result.cells if c.kind != "none"):
        rows = _cell_rows(plain + [c for c in result.cells if c.kind == kind])
        model = _calibrated(rows)
        for i, (c, lengths, alpha) in enumerate(rows):
            if c.kind != "none":
                c.predicted = _predicted_speedup(model, lengths, alpha, c.k)
                c.loo = _predicted_speedup(_calibrated(rows[:i] + rows[i + 1:]), lengths, alpha, c.k)
        result.grpo["cost_model"][kind] = dataclasses.asdict(model.costs)


def prediction_errors(cells: list[Cell], field: str = "predicted") -> list[float]:
    """|predicted - measured| / measured over the speculative cells that have a prediction."""
    return [abs(getattr(c, field) - c.speedup) / c.speedup for c in cells if c.k and getattr(c, field) == getattr(c, field)]


def load_results(path: Path) -> list[TargetResult]:
    """A benchmark JSON as written by `main`, back as `TargetResult`s."""
    data = json.loads(path.read_text())
    return [TargetResult(t["name"], t["parameters"], [Cell(**c) for c in t["cells"]], t.get("grpo", {})) for t in data]


def _grpo_batch(cfg, tok):
    from codraft.task import make_task

    train, _ = make_task(cfg.task, cfg.task.seed).splits()
    return [{"ids": tok(r["prompt"], add_special_tokens=False).input_ids} for r in list(train)[: cfg.rollout.prompts_per_step]]


def _grpo_sampling(cfg):
    from codraft.engine import Sampling

    return Sampling(cfg.rollout.temperature, 1.0, cfg.rollout.max_new_tokens)


def _time_grpo_beside(plain, engine, prompts, cfg, repeats) -> dict:
    """One GRPO rollout batch on `engine` and on the plain engine, alternated run by run (after an
    untimed run of each), so that both see the same load on a shared machine. Returns the medians
    and the median of the per-run ratios plain / engine, with their range."""
    runs = {"plain": [], "spec": []}
    for r in range(-1, repeats):
        for name, eng in (("plain", plain), ("spec", engine)):
            t0 = time.perf_counter()
            gen = eng.generate(prompts, n=cfg.rollout.group_size, sampling=_grpo_sampling(cfg), seed=100 + r)
            if r >= 0:
                runs[name].append(time.perf_counter() - t0)
    ratios = [p / q for p, q in zip(runs["plain"], runs["spec"])]
    return {"plain_s": statistics.median(runs["plain"]), "spec_s": statistics.median(runs["spec"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "gen": gen}  # the last run: the engine's


def print_tables(results: list[TargetResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for res in results:
        table = Table(title=f"{res.name} target ({res.parameters / 1e6:.1f}M parameters): tokens/s and speedup over plain decoding")
        for col in ("kind", "k", "batch", "tokens/s", "accept len", "c = draft/target", "speedup", "cost model", "error", "left out", "error"):
            table.add_column(col, justify="right")
        for c in res.cells:
            def shown(p):
                return (f"{p:.2f}x", f"{(p - c.speedup) / c.speedup:+.0%}") if c.k and p == p else ("", "")
            table.add_row(c.kind, str(c.k), str(c.batch), f"{c.tokens / c.seconds:.0f}", f"{c.accept_len:.2f}" if c.k else "",
                          f"{c.c_ratio:.2f}" if c.k else "", f"{c.speedup:.2f}x" if c.k else "", *shown(c.predicted), *shown(c.loo))
        console.print(table)
        grpo = Table(title=f"{res.name}: one GRPO rollout batch (natural lengths, long tail included), seconds; "
                           "speedups are medians of run-by-run ratios to a plain engine timed alternately")
        for col in ("kind", "plain", "fixed k", "fixed", "fixed vs plain", "auto schedule", "auto", "auto vs plain", "range"):
            grpo.add_column(col, justify="right")
        for kind, g in res.grpo.items():
            if kind == "cost_model":
                continue
            sched = ",".join(f"{lo}-{hi}:{k}" for lo, hi, k in g["auto_schedule"])
            lo, hi = g.get("auto_vs_plain_range", ["", ""])  # files written before the paired timing lack these
            grpo.add_row(kind, f"{g['plain_s']:.2f}", str(g["fixed_k"]), f"{g['fixed_s']:.2f}", f"{g.get('fixed_vs_plain', g['plain_s'] / g['fixed_s']):.2f}x",
                         sched, f"{g['auto_s']:.2f}", f"{g.get('auto_vs_plain', g['plain_s'] / g['auto_s']):.2f}x", f"{lo:.2f}-{hi:.2f}" if lo != "" else "")
        console.print(grpo)
        for field, what in (("predicted", "calibrated on all of its kind's cells"), ("loo", "each cell left out of the calibration that predicts it")):
            errors = prediction_errors(res.cells, field)
            if errors:
                console.print(f"cost-model error over {len(errors)} cells, {what}: median {statistics.median(errors):.0%}, max {max(errors):.0%}, "
                              f"within 15%: {sum(e <= 0.15 for e in errors)}/{len(errors)}")


def main(argv: list[str] | None = None) -> int:
    import os

    import tyro

    args = tyro.cli(BenchArgs, args=sys.argv[1:] if argv is None else argv, prog="python -m analysis.bench_rollout")
    if args.refit is not None:
        if not args.refit.is_file():
            raise SystemExit(f"--refit {args.refit}: no such benchmark file")
        results = load_results(args.refit)
        for result in results:
            predict_cells(result)
        print_tables(results)
        return 0
    if argv is None:  # timing vLLM from the command line: preload Intel OpenMP first
        from codraft.openmp import reexec_with_intel_openmp

        reexec_with_intel_openmp()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    results = [bench_target(name, args) for name in args.targets]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str))
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
