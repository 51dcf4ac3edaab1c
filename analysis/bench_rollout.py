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
speedup predicted by codraft's cost model (calibrated on all cells of that target) from the
measured acceptance. Then a whole GRPO rollout batch (natural lengths, its long tail included) is
timed plain, at fixed k and with the `auto` k schedule the cost model derives.
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


@dataclass
class TargetResult:
    name: str
    parameters: int
    cells: list[Cell] = field(default_factory=list)
    grpo: dict = field(default_factory=dict)


def _long_prompts(cfg, tok, n: int) -> list[list[int]]:
    """Held-out (then training) prompts whose worked solutions outrun the token budget."""
    from codraft.tasks import make_task

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
    from codraft.costmodel import CostModel, alpha_from_accept_len
    from codraft.testbed import policy_source
    from codraft.vllm_engine import VLLMEngine
    from codraft.warmstart import initial_drafter

    overrides = (LARGE if name == "large" else []) + [f"rollout.enforce_eager={str(args.eager).lower()}", f"rollout.max_num_seqs={max(args.batches + (64,))}"]
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
    model = CostModel()
    for b in args.batches:
        secs, gen = _time(plain, prompts[:b], args.tokens, args.repeats, seed=1)
        base[b] = (secs, gen.num_tokens)
        result.cells.append(Cell(name, "none", 0, b, secs, gen.num_tokens))
        model.observe([len(c.token_ids) for c in gen.completions], float("nan"), 0, secs, False)
    grpo_prompts = [p["ids"] for p in _grpo_batch(cfg, tok)]
    grpo_plain, grpo_gen = _time_grpo(plain, grpo_prompts, cfg, args.repeats)
    plain.close()

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
                model.observe([len(c.token_ids) for c in gen.completions], alpha, k, secs, True)
                log(f"[{name}] {kind} k={k} b={b}: accept {cell.accept_len:.2f}, c {cell.c_ratio:.2f}, speedup {cell.speedup:.2f}x")
        alpha = statistics.median(a for a in alphas if a == a)
        fixed = max(k for k in args.ks if k <= 3)
        engine.set_k_schedule([(1, kcfg.rollout.max_num_seqs, fixed)])
        t_fixed, g_fixed = _time_grpo(engine, grpo_prompts, cfg, args.repeats)
        grpo_lengths = [len(c.token_ids) for c in grpo_gen.completions]
        auto = list(model.best_k_schedule(alpha, range(1, kcfg.rollout.max_num_seqs + 1), ks=tuple(sorted({0, *args.ks})), lengths=grpo_lengths))
        engine.set_k_schedule(auto)
        t_auto, g_auto = _time_grpo(engine, grpo_prompts, cfg, args.repeats)
        result.grpo[kind] = {
            "plain_s": grpo_plain, "fixed_k": fixed, "fixed_s": t_fixed, "auto_schedule": auto, "auto_s": t_auto,
            "tokens": grpo_gen.num_tokens, "max_len": max(len(c.token_ids) for c in grpo_gen.completions),
            "accept_fixed": g_fixed.acceptance.accept_len, "accept_auto": g_auto.acceptance.accept_len if g_auto.acceptance.drafts else float("nan"),
        }
        engine.close()
    predict_cells(result)
    return result


def predict_cells(result: TargetResult) -> None:
    """Calibrate a cost model on all of a target's cells (each sequence runs the full token budget,
    so a cell's lengths are tokens / batch) and set every speculative cell's predicted speedup from
    its measured acceptance."""
    from codraft.costmodel import CostModel, alpha_from_accept_len

    model = CostModel()
    cells = [(c, [round(c.tokens / c.batch)] * c.batch, alpha_from_accept_len(c.accept_len, c.k) if c.k else float("nan")) for c in result.cells]
    for c, lengths, alpha in cells:
        model.observe(lengths, alpha, c.k, c.seconds, c.kind != "none")
    for c, lengths, alpha in cells:
        if c.kind != "none":
            c.predicted = model.predict_gen_s(lengths, float("nan"), 0) / model.predict_gen_s(lengths, alpha, c.k)
    result.grpo["cost_model"] = dataclasses.asdict(model.costs)


def load_results(path: Path) -> list[TargetResult]:
    """A benchmark JSON as written by `main`, back as `TargetResult`s."""
    data = json.loads(path.read_text())
    return [TargetResult(t["name"], t["parameters"], [Cell(**c) for c in t["cells"]], t.get("grpo", {})) for t in data]


def _grpo_batch(cfg, tok):
    from codraft.tasks import make_task

    train, _ = make_task(cfg.task, cfg.task.seed).splits()
    return [{"ids": tok(r["prompt"], add_special_tokens=False).input_ids} for r in list(train)[: cfg.rollout.prompts_per_step]]


def _time_grpo(engine, prompts, cfg, repeats):
    from codraft.engine import Sampling

    times, gen = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        gen = engine.generate(prompts, n=cfg.rollout.group_size, sampling=Sampling(cfg.rollout.temperature, 1.0, cfg.rollout.max_new_tokens), seed=100 + r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), gen


def print_tables(results: list[TargetResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for res in results:
        table = Table(title=f"{res.name} target ({res.parameters / 1e6:.1f}M parameters): tokens/s and speedup over plain decoding")
        for col in ("kind", "k", "batch", "tokens/s", "accept len", "c = draft/target", "speedup", "cost model", "error"):
            table.add_column(col, justify="right")
        for c in res.cells:
            err = f"{(c.predicted - c.speedup) / c.speedup:+.0%}" if c.predicted == c.predicted else ""
            table.add_row(c.kind, str(c.k), str(c.batch), f"{c.tokens / c.seconds:.0f}", f"{c.accept_len:.2f}" if c.k else "",
                          f"{c.c_ratio:.2f}" if c.k else "", f"{c.speedup:.2f}x" if c.k else "", f"{c.predicted:.2f}x" if c.k else "", err)
        console.print(table)
        grpo = Table(title=f"{res.name}: one GRPO rollout batch (natural lengths, long tail included), seconds")
        for col in ("kind", "plain", "fixed k", "fixed", "auto schedule", "auto", "auto vs plain"):
            grpo.add_column(col, justify="right")
        for kind, g in res.grpo.items():
            if kind == "cost_model":
                continue
            sched = ",".join(f"{lo}-{hi}:{k}" for lo, hi, k in g["auto_schedule"])
            grpo.add_row(kind, f"{g['plain_s']:.2f}", str(g["fixed_k"]), f"{g['fixed_s']:.2f}", sched, f"{g['auto_s']:.2f}", f"{g['plain_s'] / g['auto_s']:.2f}x")
        console.print(grpo)
        errors = [abs(c.predicted - c.speedup) / c.speedup for c in res.cells if c.k and c.predicted == c.predicted]
        if errors:
            console.print(f"cost-model error over {len(errors)} cells: median {statistics.median(errors):.0%}, max {max(errors):.0%}, within 15%: {sum(e <= 0.15 for e in errors)}/{len(errors)}")


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
