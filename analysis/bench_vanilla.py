"""codraft's rollout engine against vanilla vLLM, side by side (`python -m analysis.bench_rollout --baseline vanilla`).

    python -m analysis.bench_rollout --baseline vanilla --targets testbed --kinds eagle3 mtp draft_model --ks 1 3 --batches 1 16 64

Per target: a plain `vllm.LLM` built with the arguments codraft's engine builds its own with
(`codraft.vllm_engine._llm_kwargs`: dtype, eager or compiled, max_model_len, max_num_seqs, KV-cache
bytes, chunked prefill off on CPU, seed, stats logging, log-prob mode) less codraft's scheduler
class, and no codraft hook but the CPU rejection-sampler fix (`vllm_compat.apply_rejection_fix`
through `llm.collective_rpc`, as codraft's engine applies it); next to it codraft's `VLLMEngine` at
the same settings. Both serve the same exported policy and drafter: without a drafter (k = 0), and
for each drafter kind at each fixed k (no k table, drafter on). Both send the same requests (per
request seeds, the sampled token's log-prob, no detokenization) and are timed alternately per
running batch (analysis/bench_cells.py: median, range and spread of the paired ratios), and on a
GRPO rollout batch (k = 0 and the largest k <= 3). The ratio is codraft's throughput over vanilla's;
the goal is within 5% in every cell. Each pair's per-call extras of codraft's engine (the fix check
before a batch, the acceptance counters after it) are timed alone as well.

A control first: a second vanilla engine against the first, plain decoding of the GRPO batch, timed
the same way. Two identical engines differ only by noise and build order, so its range is what a
cell's ratio can move by on this machine without any difference between the engines (on a shared
2-core VM: 0.93-1.30 over 7 repeats, median 0.99).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from analysis.bench_cells import (PairTiming, Setup, TargetResult, drafter_for, grpo_sampling, hardware_label, setup_target,
                                  time_pair, write_results)

GOAL = 0.05
"""codraft's throughput within this share of vanilla vLLM's."""


class VanillaEngine:
    """A plain `vllm.LLM` with codraft's engine settings and no codraft hook but the CPU rejection fix."""

    def __init__(self, cfg, policy_dir: Path, speculative: dict | None = None, target_overrides: dict | None = None):
        from codraft import vllm_compat
        from codraft.vllm_engine import _llm_kwargs, _prepare_environment

        _prepare_environment()  # the environment codraft's engine runs in (in-process engine core, log level)
        self.cpu = vllm_compat.is_cpu_platform()
        self.kwargs = _llm_kwargs(cfg, policy_dir, dict(speculative) if speculative else None, target_overrides, self.cpu)
        self.kwargs.pop("scheduler_cls", None)  # codraft's k-table scheduler: a hook
        from vllm import LLM

        self.llm = LLM(**self.kwargs)
        self.speculative = speculative
        if self.cpu and speculative and not self.fix():
            raise RuntimeError("the CPU rejection-sampler fix did not apply to the vanilla engine")

    def fix(self) -> bool:
        """Register the CPU rejection-sampler fix (process-wide: another engine's start-up undoes it)."""
        from codraft import vllm_compat

        return all(self.llm.collective_rpc(vllm_compat.apply_rejection_fix, args=(True,)))

    def ensure_fix(self) -> None:
        """Before a cell, untimed: the fix in place (codraft's engine checks it before every batch)."""
        from codraft import vllm_compat

        if self.cpu and self.speculative and not all(self.llm.collective_rpc(vllm_compat.rejection_fix_in_place)) and not self.fix():
            raise RuntimeError("the CPU rejection-sampler fix did not apply to the vanilla engine")

    def acceptance(self):
        """Cumulative acceptance counters (read outside the timed calls)."""
        from codraft.acceptance import AcceptanceStats, read_vllm_counters

        return read_vllm_counters(self.llm.get_metrics()) if self.speculative else AcceptanceStats()

    def generate(self, prompts: list[list[int]], n: int, sampling, seed: int):
        """The requests codraft's engine sends, through `llm.generate` and nothing else."""
        from vllm import SamplingParams

        from codraft.engine import Completion, Generation, request_seeds

        seeds = request_seeds(seed, len(prompts) * n)
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(n)]
        params = [SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=s,
                                 logprobs=0, detokenize=False) for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return Generation([Completion(i // n, list(o.outputs[0].token_ids), [], o.outputs[0].finish_reason == "stop") for i, o in enumerate(outputs)])

    def close(self) -> None:
        from codraft import vllm_compat

        vllm_compat.shutdown_engine_core(self.llm)


@dataclass
class VanillaCell:
    """codraft's engine against vanilla vLLM at one (kind, k, running batch); batch 0: the GRPO batch."""

    target: str
    kind: str
    k: int
    batch: int
    codraft_tps: float
    vanilla_tps: float
    ratio: float
    """Median over repeats of codraft's throughput / vanilla's, timed alternately."""
    low: float
    high: float
    spread: float
    calls: int
    repeats: int
    accept_codraft: float = float("nan")
    accept_vanilla: float = float("nan")


def vanilla_cell(name: str, kind: str, k: int, batch: int, timing: PairTiming, accept_vanilla: float) -> VanillaCell:
    """From a paired timing of vanilla (a) and codraft (b)."""
    ratio = timing.ratio
    rate = lambda side: statistics.median(t / s for s, t in zip(side.seconds, side.tokens))  # noqa: E731
    acc = timing.b.acceptance
    return VanillaCell(name, kind, k, batch, rate(timing.b), rate(timing.a), ratio.median, ratio.low, ratio.high, ratio.spread, timing.calls,
                       len(ratio.ratios), acc.accept_len if acc is not None else float("nan"), accept_vanilla)


def hook_costs(engine, calls: int = 20) -> dict[str, float]:
    """Milliseconds of each per-call extra of codraft's `generate` (untimed in the cells, timed alone):
    the fix check before a speculative batch, the acceptance counters read after it."""
    from codraft import vllm_compat

    extras = {"rejection_fix_in_place_ms": lambda: engine.llm.collective_rpc(vllm_compat.rejection_fix_in_place),
              "get_metrics_ms": lambda: engine.llm.get_metrics()}
    out = {}
    for name, call in extras.items():
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        out[name] = (time.perf_counter() - t0) / calls * 1e3
    return out


def _pair(name: str, setup: Setup, args, kind: str, k: int, log) -> tuple[list[VanillaCell], dict]:
    """Build vanilla, then codraft's engine (its start-up re-registers vLLM's kernel and then its fix),
    time every running batch and, at k = 0 and the largest k <= 3, the GRPO batch."""
    from codraft.engine import Sampling
    from codraft.vllm_engine import VLLMEngine

    cfg, spec, overrides = setup.cfg, None, None
    if kind != "none":
        cfg, drafter, path = drafter_for(setup, kind, k, log)
        spec, overrides = drafter.speculative_config(path, k), drafter.target_overrides()
    vanilla = VanillaEngine(cfg, setup.policy_dir, spec, overrides)
    codraft = VLLMEngine(cfg, setup.policy_dir, speculative=dict(spec) if spec else None, target_overrides=overrides)
    cells, sampling = [], Sampling(1.0, 1.0, args.tokens)
    fixed = max((x for x in args.ks if x <= 3), default=min(args.ks))
    batches = [(b, setup.prompts[:b], 1, sampling) for b in args.batches]
    if k in (0, fixed):
        batches.append((0, setup.grpo_prompts, cfg.rollout.group_size, grpo_sampling(cfg)))
    for b, prompts, n, samp in batches:
        vanilla.ensure_fix()
        before = vanilla.acceptance()
        timing = time_pair(vanilla, codraft, prompts, samp, args.repeats, args.min_seconds, seed=1 if b else 100, n=n)
        cell = vanilla_cell(name, kind, k, b, timing, (vanilla.acceptance() - before).accept_len)
        cells.append(cell)
        log(f"vanilla vs codraft, {kind} k={k} " + (f"b={b}" if b else "GRPO batch") + f": codraft/vanilla {cell.ratio:.3f} "
            f"({cell.low:.3f}-{cell.high:.3f}, spread {cell.spread:.0%}; {cell.codraft_tps:.0f} vs {cell.vanilla_tps:.0f} tokens/s)")
    extras = {"kind": kind, "k": k, "hooks": dict(codraft.hooks), **(hook_costs(codraft) if spec else {}), "vanilla_kwargs": sorted(vanilla.kwargs)}
    codraft.close()
    vanilla.close()
    return cells, extras


CONTROL = "vanilla A/A"
"""The kind of the control cell: a second vanilla engine against the first."""


def control(name: str, setup: Setup, args, log) -> VanillaCell:
    """Vanilla against vanilla (kind `vanilla A/A`): plain decoding of the GRPO batch, built one after
    the other and timed alternately like every cell; its ratio is the second over the first."""
    first, second = VanillaEngine(setup.cfg, setup.policy_dir), VanillaEngine(setup.cfg, setup.policy_dir)
    try:
        timing = time_pair(first, second, setup.grpo_prompts, grpo_sampling(setup.cfg), args.repeats, args.min_seconds, seed=100, n=setup.cfg.rollout.group_size)
    finally:
        second.close()
        first.close()
    cell = vanilla_cell(name, CONTROL, 0, 0, timing, float("nan"))
    log(f"control, vanilla against vanilla, GRPO batch: {cell.ratio:.3f} ({cell.low:.3f}-{cell.high:.3f}, spread {cell.spread:.0%})")
    return cell


def bench_vanilla(name: str, args, log=print) -> TargetResult:
    setup = setup_target(name, args.preset, args.overrides, args.eager, max(args.batches + (64,)), log)
    result = TargetResult(name, setup.parameters)
    result.vanilla.append(asdict(control(name, setup, args, log)))
    extras = []
    for kind, ks in [("none", (0,))] + [(kind, tuple(args.ks)) for kind in args.kinds]:
        for k in ks:
            cells, extra = _pair(name, setup, args, kind, k, log)
            result.vanilla.extend(asdict(c) for c in cells)
            extras.append(extra)
    result.grpo["vanilla_pairs"] = extras
    return result


def print_vanilla(results: list[TargetResult], hardware: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for res in results:
        table = Table(title=f"{res.name} target on {hardware_label(hardware)}: codraft's engine / vanilla vLLM, tokens/s "
                            f"(median of paired repeats; goal within {GOAL:.0%}); batch 'GRPO' = one GRPO rollout batch")
        for col in ("kind", "k", "batch", "codraft tok/s", "vanilla tok/s", "codraft/vanilla", "range", "spread", "accept codraft / vanilla", "goal"):
            table.add_column(col, justify="right")
        cells = [c for c in res.vanilla if c["kind"] != CONTROL]
        for c in [c for c in res.vanilla if c["kind"] == CONTROL] + cells:
            ok = "control" if c["kind"] == CONTROL else "ok" if abs(c["ratio"] - 1) <= GOAL else "MISSED"
            accept = f"{c['accept_codraft']:.2f} / {c['accept_vanilla']:.2f}" if c["k"] else ""
            table.add_row(c["kind"], str(c["k"]), str(c["batch"]) if c["batch"] else "GRPO", f"{c['codraft_tps']:.0f}", f"{c['vanilla_tps']:.0f}",
                          f"{c['ratio']:.3f}", f"{c['low']:.3f}-{c['high']:.3f}", f"{c['spread']:.0%}", accept, ok)
        console.print(table)
        missed = [c for c in cells if abs(c["ratio"] - 1) > GOAL]
        console.print(f"within {GOAL:.0%} of vanilla: {len(cells) - len(missed)}/{len(cells)} cells")
        for c in res.vanilla:
            if c["kind"] == CONTROL:
                console.print(f"noise floor: vanilla against vanilla on the GRPO batch {c['ratio']:.3f} (range {c['low']:.3f}-{c['high']:.3f}); "
                              f"a cell whose range covers 1.0 as widely is within noise")
        for extra in res.grpo.get("vanilla_pairs", []):
            if "get_metrics_ms" in extra:
                console.print(f"  {extra['kind']} k={extra['k']}: codraft per-call extras {extra['rejection_fix_in_place_ms']:.2f} ms (fix check), "
                              f"{extra['get_metrics_ms']:.2f} ms (counters); hooks {extra['hooks']}")


def run_vanilla(args, hardware: dict) -> int:
    results = [bench_vanilla(name, args) for name in args.targets]
    out = args.out if args.out != Path("runs/bench_rollout.json") else Path("runs/bench_vanilla.json")
    write_results(out, results, hardware, baseline="vanilla")
    print_vanilla(results, hardware)
    return 0
