"""The core `codraft` subcommands: `run`, `config`, `check-lossless`, and the plug-in listings
`policies`, `drafters`, `tasks`.

    codraft run --preset smoke --out runs/smoke --set grpo.lr=3e-4 --set run.steps=4
    codraft config --preset default                                      # the resolved config
    codraft check-lossless --preset smoke --set drafter.kind=eagle3      # exits 1 if a test fails
    codraft check-lossless --biased --no-cpu-fix                         # shows vLLM's CPU bug
    codraft policies                                                     # registered refresh policies
    codraft plan --preset qwen3-8b-8gpu                                  # memory per GPU; exits 1 if it does not fit
    codraft export-drafter runs/smoke --out eagle3-speculators          # the run's drafter in vLLM's speculators format
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from codraft.cliargs import Command, ConfigArgs


@dataclass
class RunArgs(ConfigArgs):
    """Run synchronous GRPO (with speculative rollouts and drafter co-training when configured)."""

    out: Path | None = None
    """Run directory (default: `output.dir` of the config)."""
    resume: Path | None = None
    """Continue the run in this directory from its last checkpoint (its config.toml; `--set run.steps=N` may extend it)."""


RESUMABLE_OVERRIDES = ("run.steps", "output.progress", "output.tensorboard")


def resume_config(args: RunArgs):
    from codraft.config import ConfigError
    from codraft.configfile import config_from_toml

    if not (args.resume / "config.toml").is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no run there (config.toml missing)")
    bad = [o for o in args.set if o.split("=", 1)[0].strip() not in RESUMABLE_OVERRIDES]
    if bad or args.config or args.preset != "default":
        raise ConfigError(f"--resume keeps the run's own config; only {', '.join(RESUMABLE_OVERRIDES)} may be changed (got {bad or '--config/--preset'})")
    return config_from_toml(args.resume / "config.toml", overrides=args.set)  # validates the file, then the overrides


def cmd_run(args: RunArgs) -> int:
    from rich.console import Console
    from rich.table import Table

    from codraft.distributed import shutdown
    from codraft.runner import Run, summary_rows

    if args.resume:
        cfg, out = resume_config(args), args.resume
    else:
        cfg = args.load()
        out = args.out or Path(cfg.output.dir)
    if str(out) != cfg.output.dir:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out)))
    run = Run(cfg, out, resume=args.resume is not None)
    finished = False
    try:
        records = run.train()
        finished = True
    finally:
        run.close()
        shutdown(drain=finished)  # leave the torchrun process group, if any
    if not run.is_main:
        return 0
    table = Table(title=f"codraft run: {out}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = summary_rows(records) + [(k, v) for k, v in run.parts.controller.summary().items()]
    for label, value in rows:
        table.add_row(label, str(value))
    Console().print(table)
    return 0


@dataclass
class ShowConfigArgs(ConfigArgs):
    """Print the resolved configuration as TOML, or the documented fields of every section."""

    fields: bool = False
    """List each section's fields with type, default and help instead."""


def cmd_config(args: ShowConfigArgs) -> int:
    import tomli_w

    from codraft.config import Config
    from codraft.configfile import section_fields, to_dict

    if args.fields:
        for section in dataclasses.fields(Config):
            print(f"[{section.name}]")
            for name, tp, default, doc in section_fields(section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))):
                print(f"  {name}: {tp} = {default!r}\n      {doc}")
        return 0
    print(tomli_w.dumps(to_dict(args.load())))
    return 0


@dataclass
class LosslessArgs(ConfigArgs):
    """Test that speculative sampling leaves the sampled distribution unchanged (chi-square, per position)."""

    kind: str = ""
    """Drafter kind to check (default: drafter.kind of the config, `eagle3` if that is `none`)."""
    biased: bool = False
    """Use a deliberately biased EAGLE-3 drafter that always proposes the same token."""
    no_cpu_fix: bool = False
    """Leave vLLM's CPU rejection-sampler kernel unfixed (to demonstrate that the check catches it)."""
    prompts: int = 8
    """Held-out prompts to sample from."""
    samples: int = 256
    """Completions per prompt and per arm."""
    positions: int = 64
    """Leading completion tokens compared (one chi-square test per position)."""
    top_p: tuple[float, ...] = (1.0, 0.9)
    """Nucleus thresholds to check at (temperature 1); one report each, all must pass."""
    alpha: float = 0.01
    """Significance level of each report (Bonferroni over its tests)."""
    seed: int = 0
    """Sampling seed."""


def cmd_check_lossless(args: LosslessArgs) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.lossless import biased_eagle3, check_lossless, format_report
    from codraft.task import make_task
    from codraft.testbed import policy_source
    from codraft.warmstart import initial_drafter

    cfg = args.load()
    kind = args.kind or (cfg.drafter.kind if cfg.drafter.kind != "none" else "eagle3")
    cfg = dataclasses.replace(cfg, drafter=dataclasses.replace(cfg.drafter, kind=kind), rollout=dataclasses.replace(cfg.rollout, cpu_rejection_fix=not args.no_cpu_fix))
    task = make_task(cfg.task, cfg.task.seed)
    train, held_out = task.splits()
    policy_dir = policy_source(cfg, task)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    prompts = [tok(p, add_special_tokens=False).input_ids for p in held_out["prompt"][: args.prompts]]
    if args.biased:
        drafter = biased_eagle3(policy, tok(" 7", add_special_tokens=False).input_ids[-1])
        path = policy_dir.parent / f"biased-{policy_dir.name}"
        drafter.export(path)
    else:
        train_ids = [tok(p, add_special_tokens=False).input_ids for p in train["prompt"]]
        drafter, path = initial_drafter(cfg, policy, train_ids, policy_dir, tok.eos_token_id, tok.pad_token_id)
    from codraft.engines import make_engine

    plain = make_engine(cfg, policy_dir)
    spec = make_engine(cfg, policy_dir, drafter, path)
    title = f"check-lossless {'biased ' if args.biased else ''}{kind}, k={cfg.drafter.num_speculative_tokens}, CPU fix {'off' if args.no_cpu_fix else 'on'}"
    passed = True
    try:
        for top_p in args.top_p:
            report = check_lossless(plain, spec, prompts, args.samples, args.positions, args.alpha, args.seed, top_p=top_p)
            print(format_report(report, title))
            passed &= report.passed
    finally:
        spec.close()
        plain.close()
    return 0 if passed else 1


@dataclass
class PoliciesArgs:
    """List the registered refresh policies with their config fields."""


def cmd_policies(args: PoliciesArgs) -> int:
    from codraft.refresh import describe_policies

    print(describe_policies())
    return 0


@dataclass
class DraftersArgs:
    """List the registered drafter kinds with their settings."""


def cmd_drafters(args: DraftersArgs) -> int:
    from codraft.drafter import describe_drafters

    print(describe_drafters())
    return 0


@dataclass
class TasksArgs:
    """List the registered tasks with their settings."""


def cmd_tasks(args: TasksArgs) -> int:
    from codraft.task import describe_tasks

    print(describe_tasks())
    return 0


@dataclass
class PlanArgs(ConfigArgs):
    """Memory per GPU (and per host) of the configured run, from the model's config.json alone (no weights):
    prints the table and exits 1 naming what does not fit. The job: [dist] nodes, gpus_per_node, strategy and
    gpu (gb200, h200, h100-80gb, a100-80gb, a100-40gb); the model: model.path's config.json, else model.config."""


def cmd_plan(args: PlanArgs) -> int:
    from codraft.plan import estimate, render

    plan = estimate(args.load())
    print(render(plan))
    return 0 if plan.fits else 1


@dataclass
class ExportDrafterArgs:
    """Write a run's serving drafter (RUN_DIR/drafter) as a checkpoint vLLM serves. `speculators`: the format of
    vLLM's speculators library, naming the run's policy as its verifier (`vllm serve DIR`, `LLM(model=DIR)`);
    `vllm`: the plain one codraft serves (`speculative_config={"method": "eagle3", "model": DIR, ...}`)."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """The run directory (holds drafter/ and policy/)."""
    out: Path
    """Directory to write (new, or one holding only a drafter checkpoint, which is replaced)."""
    format: Literal["speculators", "vllm"] = "speculators"
    """Checkpoint format."""
    verifier: str = ""
    """Verifier (target) name or path written into a speculators config (default: RUN_DIR/policy, absolute)."""
    k: int = 0
    """Draft tokens per step written into a speculators config (default: the run's drafter.num_speculative_tokens)."""


def cmd_export_drafter(args: ExportDrafterArgs) -> int:
    import json
    import tomllib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from codraft.drafter import load_drafter

    policy_dir, drafter_dir, out = args.run_dir / "policy", args.run_dir / "drafter", Path(args.out)
    for needed in (policy_dir / "config.json", drafter_dir / "config.json"):
        if not needed.is_file():
            raise FileNotFoundError(f"export-drafter {args.run_dir}: no {needed.relative_to(args.run_dir)} (not a run directory with a drafter)")
    if out.exists() and (out.resolve() == drafter_dir.resolve() or not out.is_dir() or {p.name for p in out.iterdir()} - {"config.json", "model.safetensors"}):
        raise FileExistsError(f"--out {out} is the run's drafter or holds other files; choose a new directory")
    target = AutoConfig.from_pretrained(policy_dir)
    with torch.device("meta"):  # the target's config and shapes only, no weights
        policy = AutoModelForCausalLM.from_config(target)
    drafter = load_drafter(drafter_dir, policy)
    run_config = args.run_dir / "config.toml"
    k = args.k or (tomllib.loads(run_config.read_text()).get("drafter", {}).get("num_speculative_tokens", 3) if run_config.is_file() else 3)
    verifier = {"name_or_path": args.verifier or str(policy_dir.resolve()), "architectures": list(target.architectures or [])}
    drafter.export(out, fmt=args.format, verifier=verifier, k=k)
    serve = f"LLM(model={str(out)!r})" if args.format == "speculators" else f"speculative_config={json.dumps(drafter.speculative_config(out, k))}"
    print(f"wrote the {drafter.name} drafter of {args.run_dir} to {out} ({args.format} format); vLLM serves it with {serve}")
    return 0


CORE_COMMANDS = (
    Command("run", RunArgs, cmd_run),
    Command("config", ShowConfigArgs, cmd_config),
    Command("check-lossless", LosslessArgs, cmd_check_lossless),
    Command("policies", PoliciesArgs, cmd_policies),
    Command("drafters", DraftersArgs, cmd_drafters),
    Command("tasks", TasksArgs, cmd_tasks),
    Command("plan", PlanArgs, cmd_plan),
    Command("export-drafter", ExportDrafterArgs, cmd_export_drafter),
)
