"""A run: the objects a GRPO step works with, its outputs, and the loop over steps.

    run = Run(cfg, Path("runs/x"))
    run.train()            # writes config.toml, metrics.jsonl, samples.jsonl, policy/

Output directory layout:
    config.toml     the resolved configuration
    metrics.jsonl   one line per step (flat namespaced keys), plus a final evaluation line
    samples.jsonl   a few rollouts per step: prompt, completion, reward
    policy/         the latest policy (Hugging Face format, with tokenizer)
    drafter/        the serving drafter, in vLLM's format (when speculating)
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from codraft import checkpoint
from codraft.batch import TokenBatch
from codraft.config import Config, ConfigError
from codraft.configfile import write_config
from codraft.distributed import DistributedTrainer, barrier, broadcast_object, full_state_dict, init_from_env, is_fsdp, prepare_engine_environment, unwrap, wrap_policy
from codraft.drafter import TargetParts, target_parts
from codraft.engine import Generation, Sampling, make_engine
from codraft.grpo import GRPOTrainer, Scored
from codraft.io import append_jsonl, atomic_dir, read_jsonl
from codraft.lora import apply_lora, is_lora
from codraft.loop import follow_step, grpo_step
from codraft.metrics import MetricsSink, stage_shares
from codraft.tasks import MixedTask, make_task
from codraft.testbed import policy_source


class RunFailed(RuntimeError):
    """A step failed; the message says what was saved and how to continue."""

    user_facing = True


class NoController:
    """No speculation: nothing to observe, nothing to refresh."""

    def on_policy_forward(self, batch, gen):
        return None

    def after_step(self, step, gen, timer) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Run:
    def __init__(self, cfg: Config, run_dir: Path, log=print, resume: bool = False):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.log = log
        self.dist = init_from_env(cfg.dist)  # one process, or a rank of a torchrun job
        self.is_main = self.dist.is_main
        prepare_engine_environment(self.dist)
        self.task, (train, held_out) = preflight(cfg)  # bad input fails here, before any output is touched
        if self.dist.distributed and cfg.dist.strategy == "fsdp" and cfg.output.checkpoint_every:
            raise ConfigError("output.checkpoint_every: checkpoints of FSDP-sharded runs are not implemented; set output.checkpoint_every=0 or dist.strategy='ddp'")
        if self.is_main:
            if resume:
                self._check_resumable()
            else:
                self._prepare_dir()
        torch.manual_seed(cfg.run.seed)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if self.is_main:  # the main rank builds (or finds) the testbed; the others then read the cache
            self.policy_dir = policy_source(cfg, self.task, log=log)
        barrier(self.dist)
        if not self.is_main:
            self.policy_dir = policy_source(cfg, self.task, log=lambda *a: None)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.policy_dir)
        except (OSError, ValueError) as err:
            raise ValueError(f"model.path: cannot load the tokenizer from {self.policy_dir}: {str(err).splitlines()[0]}") from None
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"model.path: the tokenizer in {self.policy_dir} has no end-of-sequence token")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.train_prompts = self._encode(train, "train")
        self.eval_prompts = self._encode(held_out, "held-out")

        device = self.dist.device
        attention = "eager" if device.type == "cpu" else "sdpa"  # eager attention trains faster on CPU here
        policy = apply_lora(load_policy(self.policy_dir, attention).to(device), cfg.lora)  # LoRA: only adapters train
        self.policy_config = policy.config
        self._parts = target_parts(policy)
        reference = None
        if cfg.grpo.kl_coef > 0:
            reference = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=torch.float32, attn_implementation=attention).to(device).eval()
            reference.requires_grad_(False)

        # the main rank owns the drafter and the engine; the controller warm-starts on the unwrapped policy
        self.controller = self._make_controller(policy) if self.is_main else NoController()
        policy = wrap_policy(policy, self.dist, cfg.dist.strategy)  # DDP / FSDP2 under torchrun, else as is
        if self.dist.distributed:
            self.trainer: GRPOTrainer = DistributedTrainer(policy, cfg.grpo, self.dist, cfg.rollout.temperature, reference)
        else:
            self.trainer = GRPOTrainer(policy, cfg.grpo, cfg.rollout.temperature, reference)
        self.engine = None
        if self.is_main:
            drafter = getattr(self.controller, "serving", None)
            self.engine = make_engine(cfg, self.policy_dir, drafter, getattr(self.controller, "dir", None), getattr(self.controller, "k_schedule", None))
            write_config(cfg, self.dir / "config.toml")  # last: a run that failed to start leaves no config behind
            self.sink = MetricsSink(self.dir / "metrics.jsonl", tensorboard=cfg.output.tensorboard)
        self.start_step = checkpoint.load(self) if resume else 0
        self.records: list[dict[str, Any]] = self.sink.records() if resume and self.is_main else []

    # ------------------------------------------------------------------ set-up helpers
    def _prepare_dir(self) -> None:
        if (self.dir / "config.toml").exists() or (self.dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"output directory {self.dir} already holds a run (config.toml / metrics.jsonl); "
                f"continue it with `codraft run --resume {self.dir}` or pick another --out"
            )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise PermissionError(f"output directory {self.dir} is not writable: {err.strerror}") from None

    def _check_resumable(self) -> None:
        if not (self.dir / "config.toml").is_file():
            raise FileNotFoundError(f"--resume {self.dir}: no run there (config.toml missing)")
        if (self.dir / "metrics.jsonl").exists() and any(r.get("final") for r in read_jsonl(self.dir / "metrics.jsonl")):
            if checkpoint.last_step(self.dir) >= self.cfg.run.steps - 1:
                raise FileExistsError(f"--resume {self.dir}: the run already finished all {self.cfg.run.steps} steps (raise run.steps to continue it)")

    def _encode(self, ds, split: str) -> list[dict[str, Any]]:
        ids = self.tokenizer(list(ds["prompt"]), add_special_tokens=False).input_ids
        check_prompt_lengths([len(x) for x in ids], self.cfg.model.max_len, self.cfg.rollout.max_new_tokens, split)
        return [{**row, "ids": prompt_ids} for row, prompt_ids in zip(ds, ids)]

    def _make_controller(self, policy: torch.nn.Module):
        if self.cfg.drafter.kind == "none":
            return NoController()
        from codraft.controller import Controller

        return Controller(self, policy)

    # ------------------------------------------------------------------ the policy as the engine and drafters see it
    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The full policy in Hugging Face names (LoRA merged) on the main rank, {} on the others.

        A collective under FSDP2: every rank calls it at the same point of a step."""
        weights = full_state_dict(self.trainer.policy, self.dist)
        if weights and is_fsdp(unwrap(self.trainer.policy)):  # sharded model: keep gathered copies for the drafters
            embed = weights["model.embed_tokens.weight"]
            self._parts = TargetParts(embed, weights.get("lm_head.weight", embed))
        return weights

    def target_parts(self) -> TargetParts:
        """The current policy's token embedding and output head (what drafters share with it)."""
        local = unwrap(self.trainer.policy)
        return self._parts if is_fsdp(local) else target_parts(local)

    def share(self, payload: Any) -> Any:
        """The main rank's step batch, on every rank (a broadcast under torchrun)."""
        return broadcast_object(payload, self.dist) if self.dist.distributed else payload

    # ------------------------------------------------------------------ what a step asks for
    def prompts_for_step(self, step: int) -> list[dict[str, Any]]:
        """P prompts for this step: an epoch-wise shuffle of the training prompts (seeded). With a
        task mixture, a step's share of second-task prompts follows `MixedTask.share_at`."""
        P = self.cfg.rollout.prompts_per_step
        if not isinstance(self.task, MixedTask):
            return [self._draw(self.train_prompts, "all", k) for k in range(step * P, (step + 1) * P)]
        main = [p for p in self.train_prompts if p["task"] == self.cfg.task.name]
        extra = [p for p in self.train_prompts if p["task"] != self.cfg.task.name]
        n_extra = round(self.task.share_at(step) * P)
        drawn_extra = sum(round(self.task.share_at(s) * P) for s in range(step))
        return [self._draw(main, "main", step * P - drawn_extra + i) for i in range(P - n_extra)] + [self._draw(extra, "extra", drawn_extra + i) for i in range(n_extra)]

    def _draw(self, pool: list[dict[str, Any]], name: str, k: int) -> dict[str, Any]:
        """The k-th prompt of an endless, epoch-wise shuffled stream over `pool`."""
        epoch, pos = divmod(k, len(pool))
        order = list(range(len(pool)))
        random.Random(f"{self.cfg.run.seed}-{name}-{epoch}").shuffle(order)
        return pool[order[pos]]

    def warm_start_prompts(self) -> list[list[int]]:
        """Prompts of the policy before any RL step: the drafter's warm start samples on these."""
        return [p["ids"] for p in self.train_prompts if p.get("task", self.cfg.task.name) == self.cfg.task.name]

    def seed_for(self, step: int) -> int:
        return self.cfg.run.seed * 1_000_003 + step

    def should_eval(self, step: int) -> bool:
        every = self.cfg.run.eval_every
        return every > 0 and step % every == 0

    def score(self, prompts: list[dict[str, Any]], gen: Generation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rewards, correct, formatted = [], [], []
        texts = self.tokenizer.batch_decode([c.token_ids for c in gen.completions], skip_special_tokens=True)
        for c, text in zip(gen.completions, texts):
            p = prompts[c.prompt_index]
            s = self.task.score(text, p["prompt"], p["answer"], c.finished)
            rewards.append(self.task.reward(s))
            correct.append(float(s.correct))
            formatted.append(float(s.formatted))
        self._last_texts = texts
        self.last_rewards = torch.tensor(rewards)
        return self.last_rewards, torch.tensor(correct), torch.tensor(formatted)

    def evaluate(self) -> dict[str, Any]:
        """Accuracy on the held-out prompts, sampled at `run.eval_temperature`."""
        t0 = time.perf_counter()
        n = self.cfg.run.eval_samples
        sampling = Sampling(self.cfg.run.eval_temperature, 1.0, self.cfg.rollout.max_new_tokens)
        gen = self.engine.generate([p["ids"] for p in self.eval_prompts], n=n, sampling=sampling, seed=10**9 + self.cfg.run.seed)
        _, correct, formatted = self.score(self.eval_prompts, gen)
        out = {
            "eval/accuracy": correct.mean().item(),
            "eval/format": formatted.mean().item(),
            "eval/mean_len": gen.num_tokens / len(gen.completions),
            "time/eval_s": time.perf_counter() - t0,
        }
        if gen.acceptance is not None:
            out["eval/accept_len"] = gen.acceptance.accept_len
        return out

    def engine_logp(self, batch: TokenBatch, gen: Generation) -> torch.Tensor:
        """The engine's sampled-token log-probs laid out like `Scored.old_logp` [B, T-1]."""
        out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
        for i, c in enumerate(gen.completions):
            start = int(batch.completion_mask[i].nonzero()[0]) - 1 if c.token_ids else 0
            out[i, start : start + len(c.logprobs)] = torch.tensor(c.logprobs)
        return out

    def logprob_gap(self, batch: TokenBatch, scored: Scored, gen: Generation) -> float:
        """Mean |engine log-prob - trainer log-prob| over completion tokens (bf16 engine vs fp32 trainer)."""
        mask = batch.target_mask.float()
        return float(((self.engine_logp(batch, gen) - scored.old_logp).abs() * mask).sum() / mask.sum().clamp(min=1))

    def write_samples(self, step: int, prompts, gen: Generation, rewards: torch.Tensor, correct: torch.Tensor) -> None:
        G = self.cfg.rollout.group_size
        for k in range(min(self.cfg.output.samples_per_step, len(gen.completions))):
            i = (k * G + k) % len(gen.completions)  # spread over groups
            c = gen.completions[i]
            append_jsonl(
                self.dir / "samples.jsonl",
                {"step": step, "prompt": prompts[c.prompt_index]["prompt"], "completion": self._last_texts[i], "reward": rewards[i].item(), "correct": bool(correct[i])},
            )

    # ------------------------------------------------------------------ the loop
    def save_policy(self) -> None:
        """`RUN_DIR/policy/`: the current policy (LoRA merged) as a plain Hugging Face checkpoint."""
        weights = self.policy_weights()
        if not self.is_main:
            return
        model = unwrap(self.trainer.policy)
        model = model.get_base_model() if is_lora(model) else model
        with atomic_dir(self.dir / "policy") as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            self.tokenizer.save_pretrained(tmp)

    def train(self) -> list[dict[str, Any]]:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(range(self.start_step, cfg.run.steps), desc="grpo", initial=self.start_step, total=cfg.run.steps, disable=not cfg.output.progress, dynamic_ncols=True)
        acc = float("nan")
        for step in bar:
            if not self.is_main:  # other ranks train on the main rank's batch; it logs and saves
                follow_step(self, step)
                if cfg.output.save_policy_every and (step + 1) % cfg.output.save_policy_every == 0:
                    self.save_policy()
                continue
            try:
                record = grpo_step(self, step)
            except Exception as err:
                done = checkpoint.last_step(self.dir)
                raise RunFailed(
                    f"step {step} failed ({type(err).__name__}: {err}); outputs up to step {done} are saved; "
                    f"continue with `codraft run --resume {self.dir}`"
                ) from err
            self.sink.write(record)
            self.records.append(record)
            every = cfg.output.checkpoint_every
            if every and ((step + 1) % every == 0 or step == cfg.run.steps - 1):
                checkpoint.save(self, step)
            acc = record.get("eval/accuracy", acc)
            shares = stage_shares([record])
            bar.set_postfix_str(
                f"reward {record['reward/mean']:.2f} acc {acc:.2f} "
                + " ".join(f"{s} {shares[s]:.0%}" for s in ("gen", "logprob", "train") if s in shares)
                + (f" accept {record['spec/accept_len']:.2f}" if "spec/accept_len" in record else "")
            )
            if cfg.output.save_policy_every and (step + 1) % cfg.output.save_policy_every == 0:
                self.save_policy()
        weights = self.policy_weights()
        if self.is_main:
            self.engine.load_policy_weights(weights.items())
            final = {"step": cfg.run.steps, "final": True, **self.evaluate()}
            self.sink.write(final)
            self.records.append(final)
        self.save_policy()
        return self.records

    def close(self) -> None:
        self.controller.close()
        if self.engine is not None:
            self.engine.close()


def preflight(cfg: Config):
    """Check everything that can be checked without building models, before touching the output
    directory: the task's data, the model path, plug-in names and their settings."""
    from codraft.testbed import check_checkpoint

    task = make_task(cfg.task, cfg.task.seed)
    splits = task.splits()
    for name, ds in zip(("training", "held-out"), splits):
        if len(ds) == 0:
            raise ValueError(f"the task yielded no {name} prompts")
    if cfg.model.path:
        check_checkpoint(Path(cfg.model.path).expanduser())
    if cfg.drafter.kind != "none":
        from codraft.controller import parse_k_schedule
        from codraft.drafter import DRAFTERS
        from codraft.refresh import make_refresh_policy

        DRAFTERS.get(cfg.drafter.kind)
        make_refresh_policy(cfg.controller.policy, cfg.controller.args)
        parse_k_schedule(cfg.drafter.k_schedule, cfg.drafter.num_speculative_tokens, cfg.rollout.max_num_seqs)
        if cfg.drafter.path and not Path(cfg.drafter.path).is_dir():
            raise FileNotFoundError(f"drafter.path: no such directory: {cfg.drafter.path}")
    return task, splits


def check_prompt_lengths(lengths: list[int], max_len: int, max_new_tokens: int, split: str) -> None:
    limit = max_len - max_new_tokens
    for i, n in enumerate(lengths):
        if n > limit:
            raise ConfigError(
                f"{split} prompt {i} has {n} tokens; with rollout.max_new_tokens={max_new_tokens} it does not fit "
                f"model.max_len={max_len} (raise model.max_len, lower rollout.max_new_tokens or shorten the prompts)"
            )


def load_policy(path: Path, attention: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"model.path: cannot load the policy from {path}: {str(err).splitlines()[0]}") from None


def summary_rows(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) rows describing a finished run: accuracy, reward, stage shares."""
    steps = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    rows = []
    if evals:
        rows.append(("held-out accuracy first -> last", f"{evals[0]['eval/accuracy']:.3f} -> {evals[-1]['eval/accuracy']:.3f}"))
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
