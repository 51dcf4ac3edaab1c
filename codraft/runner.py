"""A run: build the components, loop over GRPO steps, checkpoint, evaluate at the end.

    run = Run(cfg, Path("runs/x"))
    run.train()            # writes config.toml, metrics.jsonl, samples.jsonl, policy/, checkpoints/

Output directory layout:
    config.toml     the resolved configuration
    hardware.json   the machine the run ran on (codraft.hardware)
    metrics.jsonl   one line per step (flat namespaced keys), plus a final evaluation line
    samples.jsonl   a few rollouts per step: prompt, completion, reward
    policy/         the latest policy (Hugging Face format, with tokenizer)
    drafter/        the serving drafter, in vLLM's format (when speculating)
    checkpoints/    the resumable state: versioned directories and a `latest` pointer (codraft.checkpoint)
    error.log       the full traceback of a failed step, if one failed
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from codraft import checkpoint
from codraft.build import build_parts
from codraft.config import Config
from codraft.distributed import init_from_env, prepare_engine_environment
from codraft.io import atomic_write_text
from codraft.loop import grpo_step
from codraft.metrics import stage_shares
from codraft.parts import Parts
from codraft.rundir import check_resumable, preflight, prepare_new
from codraft.scoring import evaluate

logger = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """A step failed; the message says what was saved, where the traceback is and how to continue."""

    user_facing = True


class Run:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.dir = cfg, Path(run_dir)
        dist = init_from_env(cfg.dist)  # one process, or a rank of a torchrun job
        prepare_engine_environment(dist)
        task, splits = preflight(cfg)  # bad input fails here, before any output is touched
        if dist.is_main:
            check_resumable(self.dir, cfg, dist.world_size) if resume else prepare_new(self.dir)
        self.parts: Parts = build_parts(cfg, self.dir, task, splits, dist)
        self.start_step = 0
        if resume:
            self.start_step = checkpoint.load(self.dir, self.parts.stateful(), dist)
            if dist.is_main and self.start_step > 0:
                checkpoint.truncate_logs(self.dir, self.start_step - 1)
        self.records: list[dict[str, Any]] = self.parts.outputs.sink.records() if resume and dist.is_main else []

    @property
    def is_main(self) -> bool:
        return self.parts.is_main

    @property
    def policy_dir(self) -> Path:
        return self.parts.policy_dir

    def train(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        cfg, parts = self.cfg, self.parts
        bar = tqdm(range(self.start_step, cfg.run.steps), desc="grpo", initial=self.start_step, total=cfg.run.steps, disable=not (cfg.output.progress and self.is_main), dynamic_ncols=True)
        for step in bar:
            record = self._step(step)
            if record is not None:
                self._log(step, record, bar)
            self._checkpoint(step)
            every = cfg.output.save_policy_every
            if every and (step + 1) % every == 0:
                self.save_policy()
        weights = parts.policy.full_weights()
        if self.is_main:
            parts.engine.load_policy_weights(weights.items())
            final = {"step": cfg.run.steps, "final": True, **evaluate(parts.engine, parts.scorer, parts.prompts.held_out, cfg)}
            final.update(evaluate(parts.engine, parts.scorer, parts.prompts.test, cfg, split="test"))
            parts.outputs.write(final)
            self.records.append(final)
        self.save_policy()
        return self.records

    def _step(self, step: int) -> dict[str, Any] | None:
        """One step; a failure is reported with the last saved step and the full traceback in DIR/error.log."""
        try:
            return grpo_step(step, self.parts)
        except Exception as err:
            if not self.is_main:
                raise
            log = self.dir / "error.log"
            atomic_write_text(log, f"step {step} failed\n\n{traceback.format_exc()}")
            done = checkpoint.last_step(self.dir)
            raise RunFailed(
                f"step {step} failed ({type(err).__name__}: {err}); traceback in {log}; outputs up to step {done} are saved; "
                f"continue with `codraft run --resume {self.dir}`"
            ) from err

    def _log(self, step: int, record: dict[str, Any], bar) -> None:
        """Write the step's record and show progress."""
        self.parts.outputs.write(record)
        self.records.append(record)
        evals = [r["eval/accuracy"] for r in self.records if "eval/accuracy" in r]
        shares = stage_shares([record])
        bar.set_postfix_str(
            f"reward {record['reward/mean']:.2f} acc {evals[-1] if evals else float('nan'):.2f} "
            + " ".join(f"{s} {shares[s]:.0%}" for s in ("gen", "logprob", "train") if s in shares)
            + (f" accept {record['spec/accept_len']:.2f}" if "spec/accept_len" in record else "")
        )

    def _checkpoint(self, step: int) -> None:
        """Checkpoint when due, on every rank: rank 0 writes the state, and under FSDP2 each rank its shard."""
        every = self.cfg.output.checkpoint_every
        if every and ((step + 1) % every == 0 or step == self.cfg.run.steps - 1):
            checkpoint.save(self.dir, step, self.parts.stateful(), dist=self.parts.dist)

    def save_policy(self) -> None:
        """`RUN_DIR/policy/`: the current policy (LoRA merged). A collective under FSDP2."""
        weights = self.parts.policy.full_weights()
        if self.is_main:
            self.parts.outputs.save_policy(self.parts.trainer, weights)

    def close(self) -> None:
        self.parts.close()


def summary_rows(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) rows describing a finished run: accuracy, reward, stage shares."""
    steps = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    rows = []
    if evals:
        rows.append(("held-out accuracy first -> last", f"{evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}"))
    tests = [r for r in records if "test/accuracy" in r]
    if tests:  # prompts never used to choose a setting
        rows.append(("test accuracy first -> last", f"{tests[0]['test/accuracy']:.3f} -> {tests[-1]['test/accuracy']:.3f}"))
    if steps:
        k = max(1, len(steps) // 5)
        first = sum(r["reward/mean"] for r in steps[:k]) / k
        last = sum(r["reward/mean"] for r in steps[-k:]) / k
        rows.append((f"reward (mean of first / last {k} steps)", f"{first:.3f} -> {last:.3f}"))
        spec = [r for r in steps if r.get("spec/drafts")]
        if spec:  # acceptance length from summed counts
            def accept_len(rs):
                return 1 + sum(r["spec/accepted"] for r in rs) / sum(r["spec/drafts"] for r in rs)

            rows.append(("acceptance length first / mean / last", f"{accept_len(spec[:1]):.2f} / {accept_len(spec):.2f} / {accept_len(spec[-1:]):.2f}"))
        total = sum(r["time/step_s"] for r in steps)
        rows.append(("step time mean (s)", f"{total / len(steps):.2f}"))
        for stage, share in stage_shares(steps).items():
            rows.append((f"  share {stage}", f"{share:.1%}"))
    return rows
