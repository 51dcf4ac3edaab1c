"""Step-time projection for synchronous GRPO with speculative rollouts: calibration and reports.

One GRPO step is gen + logprob + train + other, each from the roofline model in
`analysis/roofline.py` (devices, models, engine-step simulation of generation).

Two free parameters are fitted on the published no-speculation figures of arXiv 2604.26779
(Qwen3-8B, RL-Zero, 32 GB200: generation 100.0 s, step 151.2 s): the mean completion length
(the paper does not give it) and the MFU of logprob/train. The speculative figures (56.6 s and
107.5 s at acceptance length 2.05, k = 3) are then predicted, not fitted.

    python -m analysis.projection                       # 8B check against the paper, 235B projection
    python -m analysis.projection --model qwen3-32b --device h100 --gpus 64 --tp 2 --accept-len 2.6
    python -m analysis.projection --report custom --prompts-per-step 128 --k 5 --alpha 0.7
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, replace
from typing import Literal

from scipy.optimize import brentq

from codraft.cliargs import Command

from analysis.tables import num, pct, rich_table

from analysis.roofline import (
    DEVICES,
    MODELS,
    tokens_per_verify,
    alpha_for_accept_len,
    Speculation,
    Efficiency,
    RolloutShape,
    Deployment,
    Workload,
    StageTimes,
    generation_seconds,
    _compute_seconds,
    training_stage_flops,
    optimizer_seconds,
    stage_times,
)


# ----------------------------------------------------------------------------------------------
# Calibration on the paper's no-speculation figures, then prediction of the speculative ones
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperAnchor:
    """Published figures of arXiv 2604.26779, Qwen3-8B, RL-Zero, 32 GB200 GPUs, EAGLE-3."""

    gen_s: float = 100.0
    """Generation seconds without speculation (used for fitting)."""
    step_s: float = 151.2
    """Step seconds without speculation (used for fitting)."""
    gen_spec_s: float = 56.6
    """Generation seconds with EAGLE-3 (predicted, never fitted)."""
    step_spec_s: float = 107.5
    """Step seconds with EAGLE-3 (predicted, never fitted)."""
    accept_len: float = 2.05
    """Measured mean acceptance length (an input to the prediction)."""
    k: int = 3
    """Drafted tokens per verify step."""


PAPER = PaperAnchor()
RL_ZERO_8B = Workload()  # the assumed setup of the paper's RL-Zero run; calibrate() replaces mean_response
ASSUMPTIONS_8B = (
    "Synchronous, colocated: all 32 GB200 GPUs generate (32 vLLM engines, TP 1), then all train.",
    "Step: 512 prompts x 16 completions (as NeMo-RL's recipe dapo-qwen2.5-7b.yaml), prompts of 200 tokens; prefix "
    "caching shares a prompt's prefill across its group.",
    "Completion lengths: lognormal, sigma 1.0, truncated at 16384 tokens (DAPO-style cap); the mean "
    "is not published and is FITTED.",
    "No reference model (KL 0); frozen drafter (no distillation cost in the step).",
    "Other (data, weight refit, reward) = 3 s; Adam moves 32 B/parameter.",
    "Priors, not fitted: decode reaches 80% of peak HBM bandwidth and 60% of peak FLOPs; 1.5 ms "
    "overhead per target step, 0.3 ms per drafter step.",
    "EAGLE-3 head: fc 3H->H, one decoder layer (MLP as the target's), lm_head over 32k draft tokens.",
    "Mean-field acceptance: every sequence advances by the mean acceptance length each verify.",
)


@dataclass(frozen=True)
class Calibration:
    work: Workload
    """The anchor workload with its fitted mean completion length."""
    eff: Efficiency
    """The priors with the fitted MFU."""
    base: StageTimes
    """Model stage times without speculation (match the paper by construction)."""
    spec: StageTimes
    """Model stage times with speculation (predicted)."""
    speculation: Speculation
    """Speculation the prediction used (alpha from the published acceptance length)."""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.work.shape.mean_response)


def fit_mfu(work: Workload, eff: Efficiency, rest_s: float, other_s: float) -> float:
    """MFU at which logprob + train + other take `rest_s` seconds (closed form)."""
    logprob, train = training_stage_flops(work, with_drafter=False)
    return _compute_seconds(logprob + train, work, replace(eff, mfu=1.0)) / (
        rest_s - other_s - optimizer_seconds(work, eff))


def calibrate(work: Workload, priors: Efficiency, other_s: float, anchor: PaperAnchor = PAPER) -> Calibration:
    """Fit the mean completion length so that generation without speculation takes anchor.gen_s,
    and the MFU so that the rest of the step takes anchor.step_s - anchor.gen_s (the MFU enters
    gen through prefill, hence the nesting). Then predict the speculative step at the published
    acceptance length. Only the two no-speculation figures are used. If no mean in
    (prompt_len, 0.9 x max_response) reproduces anchor.gen_s, the result holds NaNs (`ok` False)."""
    rest = anchor.step_s - anchor.gen_s

    def at(mean: float) -> tuple[Workload, Efficiency]:
        w = replace(work, shape=replace(work.shape, mean_response=mean))
        return w, replace(priors, mfu=fit_mfu(w, priors, rest, other_s))

    def gap(mean: float) -> float:
        return generation_seconds(*at(mean), None) - anchor.gen_s

    lo, hi = float(work.shape.prompt_len), 0.9 * work.shape.max_response
    spec = Speculation(anchor.k, alpha_for_accept_len(anchor.accept_len, anchor.k))
    if not gap(lo) < 0 < gap(hi):
        nan = StageTimes(math.nan, math.nan, math.nan, math.nan)
        return Calibration(replace(work, shape=replace(work.shape, mean_response=math.nan)),
                           replace(priors, mfu=math.nan), nan, nan, spec)
    w, eff = at(brentq(gap, lo, hi, xtol=0.01))
    return Calibration(w, eff, stage_times(w, eff, None, other_s), stage_times(w, eff, spec, other_s), spec)


def rel_error(model: float, published: float) -> float:
    """Signed relative error of a model figure, percent."""
    return 100.0 * (model - published) / published


def sensitivity(priors: Efficiency, other_s: float) -> list[tuple[str, Calibration]]:
    """Refit and re-predict with one unpublished assumption or prior changed at a time."""
    s, w = RL_ZERO_8B.shape, RL_ZERO_8B
    cases = [
        ("as assumed", w, priors),
        ("256 prompts/step", replace(w, shape=replace(s, prompts=256)), priors),
        ("1024 prompts/step", replace(w, shape=replace(s, prompts=1024)), priors),
        ("max response 8192", replace(w, shape=replace(s, max_response=8192)), priors),
        ("max response 32768", replace(w, shape=replace(s, max_response=32768)), priors),
        ("length sigma 0.6", replace(w, shape=replace(s, sigma=0.6)), priors),
        ("length sigma 1.4", replace(w, shape=replace(s, sigma=1.4)), priors),
        ("HBM efficiency 0.65", w, replace(priors, hbm=0.65)),
        ("HBM efficiency 0.9", w, replace(priors, hbm=0.9)),
        ("decode compute 40%", w, replace(priors, decode_compute=0.4)),
        ("decode compute 85%", w, replace(priors, decode_compute=0.85)),
        ("step overhead 0.5 ms", w, replace(priors, step_overhead_s=0.5e-3)),
        ("step overhead 3 ms", w, replace(priors, step_overhead_s=3e-3)),
        ("draft overhead 0.1 ms", w, replace(priors, draft_overhead_s=0.1e-3)),
        ("draft overhead 1 ms", w, replace(priors, draft_overhead_s=1e-3)),
    ]
    return [(label, calibrate(work, eff, other_s)) for label, work, eff in cases]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

MOE_235B = Workload(
    model="qwen3-235b-a22b",
    shape=RolloutShape(prompts=2048),
    deploy=Deployment(device="gb200", gpus=2048, tp=8),
)
ASSUMPTIONS_235B = (
    "Qwen3-235B-A22B in bf16 (470 GB) on 2048 GB200 GPUs (the GPU count secondary reports give for the "
    "paper's simulation): 256 engines of 8 GPUs (TP/EP 8 inside an NVL72), 10% communication slowdown.",
    "MoE weights read per engine step: 8B of non-expert weights plus each of the 128 experts per layer "
    "that one of the step's T routed tokens hits, 1 - (1 - 8/128)^T of them; FLOPs use the 22B active "
    "parameters; expert load balanced across the 8 GPUs.",
    "Step: 2048 prompts x 16 completions (128 per engine), the length distribution fitted on the 8B run; "
    "acceptance length 2.05 at k = 3 (the 8B RL-Zero figure); a dense EAGLE-3 head (~0.4B).",
    "Efficiencies and overheads as for the 8B run (MoE training usually reaches a lower MFU).",
    "Read: a verify of k+1 tokens per sequence routes k+1 times the tokens, so at the small running batches "
    "of the tail it reads far more expert weights than a decode step does; this caps the MoE speedup.",
)


@dataclass
class ProjectArgs:
    """Project GRPO step time and speedup with speculative rollouts (roofline model, calibrated on arXiv 2604.26779)."""

    report: Literal["auto", "paper", "custom"] = "auto"
    """`paper`: the 8B check and the 235B projection; `custom`: only the projection of the options
    below; `auto`: paper, plus custom when a workload option differs from its default."""
    model: str = RL_ZERO_8B.model
    """Target model: one of MODELS (qwen3-1.7b, -4b, -8b, -14b, -32b, -30b-a3b, -235b-a22b)."""
    device: str = RL_ZERO_8B.deploy.device
    """GPU: one of DEVICES (h100, h200, b200, gb200, cpu-2core)."""
    gpus: int = RL_ZERO_8B.deploy.gpus
    """GPUs of the synchronous, colocated job."""
    tp: int = RL_ZERO_8B.deploy.tp
    """GPUs per rollout engine (tensor / expert parallel)."""
    prompts_per_step: int = RL_ZERO_8B.shape.prompts
    """Prompts per GRPO step."""
    group_size: int = RL_ZERO_8B.shape.group_size
    """Completions per prompt."""
    prompt_len: int = RL_ZERO_8B.shape.prompt_len
    """Prompt tokens."""
    mean_response: float | None = None
    """Mean completion tokens after truncation (default: the value fitted on the 8B paper figures)."""
    max_response: int = RL_ZERO_8B.shape.max_response
    """Completion cap, tokens."""
    length_sigma: float = RL_ZERO_8B.shape.sigma
    """Lognormal shape of completion lengths."""
    max_num_seqs: int = RL_ZERO_8B.deploy.max_num_seqs
    """vLLM's cap on an engine's running batch."""
    k: int = PAPER.k
    """Drafted tokens per verify step."""
    accept_len: float = PAPER.accept_len
    """Mean acceptance length (tokens per verify, bonus token included) at k."""
    alpha: float | None = None
    """Per-token acceptance; overrides accept_len when given."""
    drafter_train_fraction: float = RL_ZERO_8B.drafter_train_fraction
    """Drafter distillation per step as a fraction of the step's tokens (0 = frozen drafter)."""
    mfu: float | None = None
    """MFU of prefill/logprob/train (default: fitted on the 8B no-speculation step time)."""
    hbm_eff: float = Efficiency.hbm
    """Prior: fraction of peak HBM bandwidth decode reaches."""
    decode_compute_eff: float = Efficiency.decode_compute
    """Prior: fraction of peak FLOPs decode/verify GEMMs reach."""
    step_overhead_ms: float = Efficiency.step_overhead_s * 1e3
    """Prior: fixed milliseconds per target engine step."""
    draft_overhead_ms: float = Efficiency.draft_overhead_s * 1e3
    """Prior: fixed milliseconds per drafter step."""
    tp_comm: float = Efficiency.tp_comm
    """Prior: fractional slowdown of a forward sharded over tp > 1 GPUs."""
    other_s: float = 3.0
    """Prior: seconds per step outside gen/logprob/train (data, weight refit, reward)."""

    def priors(self) -> Efficiency:
        return Efficiency(hbm=self.hbm_eff, decode_compute=self.decode_compute_eff,
                          step_overhead_s=self.step_overhead_ms / 1e3, draft_overhead_s=self.draft_overhead_ms / 1e3,
                          tp_comm=self.tp_comm)

    def workload(self, fitted_mean_response: float) -> Workload:
        mean = self.mean_response if self.mean_response is not None else fitted_mean_response
        shape = RolloutShape(self.prompts_per_step, self.group_size, self.prompt_len, mean,
                             self.max_response, self.length_sigma)
        deploy = Deployment(self.device, self.gpus, self.tp, self.max_num_seqs)
        return Workload(self.model, shape, deploy, drafter_train_fraction=self.drafter_train_fraction)

    def speculation(self, k: int | None = None) -> Speculation:
        alpha = self.alpha if self.alpha is not None else alpha_for_accept_len(self.accept_len, self.k)
        return Speculation(self.k if k is None else k, alpha)

    def is_custom(self) -> bool:
        """Whether a workload option (not a prior, not `report`) differs from its default."""
        priors = {"report", "hbm_eff", "decode_compute_eff", "step_overhead_ms", "draft_overhead_ms", "tp_comm", "other_s"}
        default = ProjectArgs()
        return any(getattr(self, f.name) != getattr(default, f.name) for f in dataclasses.fields(self) if f.name not in priors)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; known: {', '.join(DEVICES)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must lie in [0, 1]")
        if self.gpus % self.tp:
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of tp ({self.tp})")


def _breakdown_table(title: str, base: StageTimes, spec: StageTimes, paper: dict[str, str] | None = None):
    table = rich_table(title, ["stage", "no spec (s)", "share", "spec (s)", "share", "speedup"] + (["paper"] if paper else []))
    for stage in ("gen", "logprob", "train", "other", "step"):
        b, s = getattr(base, f"{stage}_s"), getattr(spec, f"{stage}_s")
        shares = [f"{100 * t.share(stage):.0f}%" if stage != "step" else "100%" for t in (base, spec)]
        row = [stage, num(b), shares[0], num(s), shares[1], f"{b / s:.2f}x"]
        table.add_row(*row, *([paper.get(stage, "")] if paper else []))
    return table


def _print_paper(console, priors: Efficiency, other_s: float, cal: Calibration) -> None:
    devices = rich_table("Devices (per GPU; dense BF16)", ["key", "device", "HBM TB/s", "BF16 TFLOP/s", "memory GB", "source"])
    for key, d in DEVICES.items():
        devices.add_row(key, d.name, f"{d.hbm_tb_s:g}", f"{d.bf16_tflops:g}", f"{d.memory_gb:g}", d.source)
    console.print(devices)

    console.print("\n[bold]Qwen3-8B, RL-Zero, 32 GB200: assumptions[/bold] (the paper's setup is not fully public)")
    for line in ASSUMPTIONS_8B:
        console.print(f"  - {line}")
    console.print(f"  - Fitted on the two no-speculation figures only: mean completion "
                  f"{cal.work.shape.mean_response:.0f} tokens (gen {PAPER.gen_s} s), MFU {cal.eff.mfu:.3f} "
                  f"(step {PAPER.step_s} s).")
    console.print(f"  - Predicted at acceptance length {PAPER.accept_len}, k = {PAPER.k} (alpha = "
                  f"{cal.speculation.alpha:.4f}); EAGLE-3 head {MODELS['qwen3-8b'].drafter().params_b:.2f}B.\n")

    check = rich_table("Qwen3-8B RL-Zero: model vs arXiv 2604.26779", ["figure", "paper", "model", "error", "role"])
    rows = [
        ("gen, no spec (s)", PAPER.gen_s, cal.base.gen_s, "fitted (mean length)"),
        ("step, no spec (s)", PAPER.step_s, cal.base.step_s, "fitted (MFU)"),
        ("gen, spec (s)", PAPER.gen_spec_s, cal.spec.gen_s, "predicted"),
        ("step, spec (s)", PAPER.step_spec_s, cal.spec.step_s, "predicted"),
        ("gen speedup (x)", PAPER.gen_s / PAPER.gen_spec_s, cal.base.gen_s / cal.spec.gen_s, "predicted"),
        ("step speedup (x)", PAPER.step_s / PAPER.step_spec_s, cal.base.step_s / cal.spec.step_s, "predicted"),
    ]
    for label, paper, model, role in rows:
        digits = 2 if "speedup" in label else 1
        check.add_row(label, num(paper, digits), num(model, digits), pct(rel_error(model, paper)), role)
    console.print(check)
    console.print(_breakdown_table("Qwen3-8B RL-Zero: stage breakdown (model)", cal.base, cal.spec))

    sens = rich_table("Sensitivity: one assumption or prior changed, refitted, re-predicted",
                  ["assumption", "fitted mean", "fitted MFU", "gen spec (s)", "error", "step spec (s)", "error"])
    for label, c in sensitivity(priors, other_s):
        sens.add_row(label, num(c.work.shape.mean_response, 0), num(c.eff.mfu, 3), num(c.spec.gen_s),
                     pct(rel_error(c.spec.gen_s, PAPER.gen_spec_s)), num(c.spec.step_s),
                     pct(rel_error(c.spec.step_s, PAPER.step_spec_s)))
    console.print(sens)
    console.print("  The step error follows the gen error: logprob/train/other are fitted and do not change with "
                  "speculation. nan = no mean completion length reproduces 100 s under that assumption.\n")


def _print_235b(console, cal: Calibration, other_s: float) -> None:
    work = replace(MOE_235B, shape=replace(MOE_235B.shape, mean_response=cal.work.shape.mean_response))
    base = stage_times(work, cal.eff, None, other_s)
    spec = stage_times(work, cal.eff, cal.speculation, other_s)
    console.print("[bold]Qwen3-235B-A22B on GB200: assumptions[/bold]")
    for line in ASSUMPTIONS_235B:
        console.print(f"  - {line}")
    paper = {"gen": "3.5x (async, 2nd-hand)", "step": "2.5x (async)"}
    console.print(_breakdown_table("Qwen3-235B-A22B, synchronous GRPO (model) next to the paper's simulator",
                                   base, spec, paper))
    overlap = max(spec.gen_s, spec.step_s - spec.gen_s)
    console.print(
        "  NOT COMPARABLE as such: the paper's 2.5x end-to-end figure (and the 3.5x rollout figure that secondary "
        "reports quote) come from its non-public simulator of an ASYNCHRONOUS pipeline that overlaps generation "
        "with training; this model computes a synchronous step as the sum of its stages. For orientation only: "
        f"ideally overlapped, the spec step would take {num(overlap)} s ({base.step_s / overlap:.2f}x vs the "
        "synchronous no-spec step).\n")


def _print_custom(console, args: ProjectArgs, cal: Calibration) -> None:
    eff = replace(cal.eff, mfu=args.mfu or cal.eff.mfu)
    work, spec = args.workload(cal.work.shape.mean_response), args.speculation()
    model, dev = MODELS[work.model], DEVICES[work.deploy.device]
    base, sp = stage_times(work, eff, None, args.other_s), stage_times(work, eff, spec, args.other_s)
    console.print(
        f"[bold]Projection: {model.name} on {work.deploy.gpus} x {dev.name}, TP {work.deploy.tp}[/bold]: "
        f"{work.shape.prompts} x {work.shape.group_size} completions, mean {work.shape.mean_response:.0f} / max "
        f"{work.shape.max_response} tokens; k = {spec.k}, alpha = {spec.alpha:.3f}, acceptance length "
        f"{spec.accept_len:.2f}; HBM eff. {eff.hbm:.2f}, MFU {eff.mfu:.3f}.")
    console.print(_breakdown_table("Stage breakdown", base, sp))
    sweep = rich_table(f"Draft length sweep at alpha = {spec.alpha:.3f}",
                   ["k", "accept len", "gen (s)", "gen speedup", "step (s)", "step speedup"])
    for k in range(1, 8):
        s = stage_times(work, eff, args.speculation(k), args.other_s)
        sweep.add_row(str(k), f"{tokens_per_verify(spec.alpha, k):.2f}", num(s.gen_s), f"{base.gen_s / s.gen_s:.2f}x",
                      num(s.step_s), f"{base.step_s / s.step_s:.2f}x")
    console.print(sweep)


def project(args: ProjectArgs) -> int:
    """Print the projection tables for `args`; the body of `codraft project`."""
    from rich.console import Console

    args.validate()
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    cal = calibrate(RL_ZERO_8B, args.priors(), args.other_s)
    if not cal.ok:
        console.print("calibration failed: no mean completion length reproduces the 8B generation time "
                      "under these priors")
        return 1
    if args.report in ("auto", "paper"):
        _print_paper(console, args.priors(), args.other_s, cal)
        _print_235b(console, cal, args.other_s)
    if args.report == "custom" or (args.report == "auto" and args.is_custom()):
        _print_custom(console, args, cal)
    return 0


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(ProjectArgs, args=sys.argv[1:] if argv is None else argv, prog="python -m analysis.projection")
    try:
        return project(args)
    except ValueError as err:
        print(f"projection: error: {err}", file=sys.stderr)
        return 2


COMMAND = Command("project", ProjectArgs, project)

if __name__ == "__main__":
    sys.exit(main())
