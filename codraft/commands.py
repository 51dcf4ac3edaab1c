"""Subcommands beyond `run`: `check-lossless` and `policies`.

    codraft check-lossless --preset smoke --set drafter.kind=eagle3      # exits 1 if a test fails
    codraft check-lossless --biased --no-cpu-fix                         # shows vLLM's CPU bug
    codraft policies                                                     # registered refresh policies
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from codraft.cli import ConfigArgs, register_command


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
    positions: int = 12
    """Leading completion tokens compared (one chi-square test per position)."""
    alpha: float = 0.01
    """Significance level of the whole check (Bonferroni over its tests)."""
    seed: int = 0
    """Sampling seed."""


def cmd_check_lossless(args: LosslessArgs) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.lossless import biased_eagle3, check_lossless, format_report
    from codraft.tasks import make_task
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
    report = check_lossless(plain, spec, prompts, args.samples, args.positions, args.alpha, args.seed)
    title = f"check-lossless {'biased ' if args.biased else ''}{kind}, k={cfg.drafter.num_speculative_tokens}, CPU fix {'off' if args.no_cpu_fix else 'on'}"
    print(format_report(report, title))
    spec.close()
    plain.close()
    return 0 if report.passed else 1


@dataclass
class PoliciesArgs:
    """List the registered refresh policies with their config fields."""


def cmd_policies(args: PoliciesArgs) -> int:
    from codraft.refresh import describe_policies

    print(describe_policies())
    return 0


register_command("check-lossless", LosslessArgs, cmd_check_lossless)
register_command("policies", PoliciesArgs, cmd_policies)

if __name__ == "__main__":
    from codraft.cli import main

    sys.exit(main(["check-lossless", *sys.argv[1:]]))
