"""Typed run configuration: one frozen dataclass per component, TOML in, TOML out.

A run's configuration is `Config`, one section per component. It is built from a named preset
(`codraft/presets/<name>.toml`), then an optional TOML file, then `--set section.key=value`
overrides, in that order. Every key is checked against the dataclasses: an unknown key or a value
of the wrong type raises `ConfigError` naming the key and the closest valid ones.

Reading, overriding and writing configs lives in `codraft.configfile`:

    cfg = load_config(preset="smoke", overrides=["grpo.lr=3e-4", "run.steps=4"])
    write_config(cfg, out_dir / "config.toml")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value that does not fit the typed config."""


@dataclass(frozen=True)
class RunConfig:
    steps: int = 40
    """Number of GRPO steps."""
    seed: int = 0
    """Seed for prompts, sampling, initialisation and training."""
    eval_every: int = 10
    """Evaluate on held-out prompts every this many steps (and before the first and after the last)."""
    eval_temperature: float = 1.0
    """Sampling temperature for held-out evaluation (1.0 = the policy's own distribution)."""
    eval_samples: int = 2
    """Completions sampled per held-out prompt; accuracy is their mean."""
    threads: int = 0
    """Torch threads for training (0 = all cores)."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """Local Hugging Face checkpoint directory (Qwen3 or Llama family, with tokenizer). Empty = build the testbed."""
    config: str = ""
    """The model's config.json for `codraft plan` (memory per GPU) where `model.path` holds none (a
    placeholder): a bundled name (`qwen3-8b`, codraft/model_configs/) or a path. Runs read `model.path`."""
    cache_dir: str = ""
    """Where built testbeds are cached (empty = $CODRAFT_CACHE or ~/.cache/codraft)."""
    vocab_size: int = 384
    """Testbed: byte-level BPE vocabulary size (special tokens included)."""
    hidden_size: int = 256
    """Testbed: model width."""
    num_layers: int = 6
    """Testbed: decoder layers."""
    num_heads: int = 4
    """Testbed: attention heads (head_dim = 64)."""
    num_kv_heads: int = 2
    """Testbed: key/value heads (grouped-query attention)."""
    head_dim: int = 64
    """Testbed: per-head width; vLLM's CPU attention needs 32, 64, 80, 96, 112, 128, ..."""
    intermediate_size: int = 768
    """Testbed: MLP width."""
    max_len: int = 320
    """Context length (prompt + completion) of the testbed and the engine."""
    sft_steps: int = 600
    """Testbed: supervised warm-start steps on worked solutions."""
    sft_batch_size: int = 16
    """Testbed: sequences per supervised step."""
    sft_lr: float = 1e-3
    """Testbed: peak learning rate of the supervised warm start (cosine decay). At 3e-3 the default
    testbed never learned to read operands from the prompt in 1000 steps; at 1e-3 it does in 400."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "arith"
    """Task, by registered name: `arith` (multi-step arithmetic), `countdown`, `reverse`, `gsm8k` (local
    file), ... (`codraft.task.describe_tasks` lists them with their settings)."""
    seed: int = 0
    """Seed of the synthetic problems (fixed across run seeds, so runs share prompts and testbed)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The task's own settings (`task.args.<field>`, e.g. `task.args.max_ops=6`, `task.args.path=...`)."""
    num_train: int = 4000
    """Training prompts (synthetic tasks generate this many)."""
    num_eval: int = 64
    """Held-out evaluation prompts, disjoint from training prompts."""
    num_test: int = 64
    """Test prompts: never trained on and never used to choose any setting (defaults are chosen on the
    held-out `num_eval` prompts); evaluated at the first and the last step (`test/accuracy`)."""
    mix_task: str = ""
    """A second task whose prompts join training part-way through (a data-mixture shift; empty = none).
    The policy is warm-started on both; the drafter only on the main task's rollouts."""
    mix_args: dict[str, Any] = field(default_factory=dict)
    """The second task's own settings (`task.mix_args.<field>`)."""
    mix_share: float = 0.5
    """Share of training prompts drawn from `mix_task` once it has fully entered."""
    mix_start: int = 10
    """Step at which `mix_task` prompts start to enter training."""
    mix_ramp: int = 5
    """Steps over which their share grows from 0 to `mix_share`."""
    mix_sft_share: float = 0.1
    """Share of the warm-start (SFT) examples drawn from `mix_task`."""
    answer_reward: float = 1.0
    """Reward for an exactly correct final answer."""
    format_reward: float = 0.1
    """Reward for a well-formed completion (`#### <number>` and a stop token)."""


@dataclass(frozen=True)
class RolloutConfig:
    backend: Literal["vllm", "reference"] = "vllm"
    """Rollout engine: `vllm` (in-process vLLM) or `reference` (plain PyTorch, slow; for tests)."""
    prompts_per_step: int = 8
    """Prompts per GRPO step."""
    group_size: int = 8
    """Completions per prompt (G); advantages are normalised within a group."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold of rollouts (1.0 = off)."""
    max_new_tokens: int = 256
    """Longest completion; longer ones are cut and get no format reward."""
    dtype: str = "bfloat16"
    """Engine weight dtype."""
    engine_mode: Literal["auto", "eager", "compiled"] = "auto"
    """vLLM without torch.compile (`eager`: fast start-up) or with it (`compiled`: a compile at start,
    cheaper steps), or `auto`: on a CPU, both timed once per machine and model (cached) and compiled
    chosen when the run's steps repay the compile; on a GPU, compiled (codraft/engine_mode.py)."""
    kv_cache_gib: float = 0.5
    """CPU backend: memory reserved for the KV cache, GiB."""
    gpu_memory_utilization: float = 0.5
    """GPU backend: fraction of GPU memory vLLM may use (shared with training when colocated)."""
    tensor_parallel_size: int = 1
    """GPU backend: vLLM tensor parallelism of the rollout engine."""
    max_num_seqs: int = 256
    """Most sequences the engine runs at once."""
    engines: int = 1
    """Rollout engines of a torchrun job, each with its own copy of the drafter: ranks 0, W/E, 2W/E, ...
    each own one, and a step's prompts are split between them (codraft/rollouts.py). On GPUs one per
    node (its local rank 0, `tensor_parallel_size` GPUs of that node). The other owners read the
    policy and RUN_DIR/drafter from the paths rank 0 uses (a shared filesystem). 1: rank 0's engine
    generates everything."""
    cpu_rejection_fix: bool = True
    """CPU backend: replace vLLM's broken per-token expansion in the rejection sampler (see codraft/vllm_compat/).
    Turn off only to demonstrate the bug."""


@dataclass(frozen=True)
class GRPOConfig:
    lr: float = 3e-5
    """AdamW learning rate of the policy (the peak, under `lr_decay`)."""
    lr_decay: Literal["constant", "cosine"] = "constant"
    """Learning rate over the run's steps: constant, or cosine decay from `lr` to 0 at the last step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    clip_low: float = 0.2
    """PPO clip range below 1 for the importance ratio."""
    clip_high: float = 0.28
    """PPO clip range above 1 (asymmetric, as in DAPO)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen reference (k3 estimator); 0 skips the reference."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus per completion token (keeps the policy from only sharpening; 0 = none)."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's standard deviation."""
    mini_batches: int = 1
    """Optimizer steps per GRPO step (the rollout batch is split into this many mini-batches)."""
    micro_batch_tokens: int = 4096
    """Most (padded) tokens per forward/backward micro-batch."""
    behavior_logprobs: Literal["recompute", "engine"] = "recompute"
    """Log-probs of the generating policy: recomputed by the trainer in fp32, or the engine's."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of keeping its activations (Hugging
    Face gradient checkpointing, non-reentrant): a micro-batch keeps one layer's activations plus every
    layer's input, for about a third more training compute. For long sequences on real checkpoints."""
    autocast_bf16: bool = True
    """Train and score under bf16 autocast where the device runs bf16 natively (GPUs; CPUs with AMX,
    AVX512-BF16 or Arm BF16), fp32 elsewhere, where emulated bf16 is slower; master weights stay fp32."""


@dataclass(frozen=True)
class DrafterConfig:
    kind: str = "none"
    """Drafter kind: `none` (no speculation) or a registered drafter kind (`codraft drafters` lists them)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The drafter kind's own settings (`drafter.args.<field>`; `codraft drafters` lists them)."""
    num_speculative_tokens: int = 3
    """Tokens drafted per verify step (k)."""
    k_schedule: str = ""
    """k by running batch size, `lo-hi:k,...` (e.g. `1-8:3,9-1024:0`), `auto`, or empty (always k)."""
    path: str = ""
    """Start from this drafter checkpoint instead of warm-starting one."""
    warmup_steps: int = 150
    """Distillation steps of the warm start against the SFT policy."""
    warmup_prompts: int = 64
    """Training prompts the warm start samples 4 completions each for (at least 4 x `batch_size`,
    at most the training split); an eighth of the completions is held out to measure it."""
    lr: float = 1e-3
    """Drafter learning rate: the warm start's, and the refreshes' unless `controller.distill_lr` is set."""
    batch_size: int = 16
    """Sequences per distillation step."""
    loss: Literal["fkl", "rkl", "tv", "ce"] = "fkl"
    """Distillation loss: forward KL, reverse KL, total variation, or hard-token cross-entropy."""


@dataclass(frozen=True)
class ControllerConfig:
    policy: str = "never"
    """Refresh policy, by registered name (`codraft policies` lists them)."""
    args: dict[str, Any] = field(default_factory=dict)
    """The refresh policy's own config fields (`controller.args.<field>`)."""
    cost_profile: bool = True
    """Start the cost model (the `auto` k table, cost-aware refresh policies, predicted generation
    times) from a short profile of this machine's engine at start (codraft/costprofile.py: plain and
    speculative batches, about 10 s, cached per hardware, engine, model and drafter). False: the
    built-in priors, one CPU's figures. Either way it keeps calibrating from the run's own steps."""
    distill_steps: int = 15
    """Distillation steps per refresh, unless the refresh policy sets a budget."""
    distill_lr: float = 0.0
    """AdamW learning rate of a refresh's distillation (0 = `drafter.lr`, the warm start's): the
    refreshes' rate can then be tuned for a refresh policy without changing the drafter it starts from."""
    distill_tokens: int = 0
    """Stop a refresh's distillation after this many aligned positions (0 = no token budget)."""
    buffer_steps: int = 3
    """Recent GRPO steps whose rollouts (features + policy distributions) are kept for distillation."""
    teacher_top_k: int = -1
    """Policy next-token distributions kept per position for distillation: k > 0 the top k (log-probs
    plus the mass left out), 0 the full distribution, -1 automatic (full up to 4096 tokens, the top
    128 above; `codraft.distill.resolve_top_k`). Sparse teachers report `drafter/teacher_mass`."""
    holdout_fraction: float = 0.25
    """Share of each step's rollouts held out to measure teacher-forced acceptance and gate swaps."""
    reward_weighting: float = 0.0
    """Weight rollouts by exp(reward_weighting * reward) in distillation (0 = uniform)."""
    gate: bool = True
    """Gate swaps: a refreshed drafter is swapped in only if its teacher-forced acceptance on held-out
    gate groups passes `gate_margin` against the serving one's (false: every candidate is swapped)."""
    gate_margin: float = 0.05
    """Swap a candidate only if its gate acceptance length > (1 - gate_margin) x the serving drafter's
    (0 = it must beat it, the rule before 2026-12-02). Each swap is judged against the drafter then
    serving, so a chain of swaps may drift down by up to this much each. The gate decides on few
    prompt groups (2 at the default scale), where a strict comparison refused as many better
    candidates as worse ones; 0.05 was adopted on the smoke validation scenario
    (analysis/grids/smoke_gate_margin.toml)."""
    gate_steps: int = 1
    """Steps whose held-out gate groups the swap gate pools: the candidate is compared with the
    serving drafter on the gate groups of the last `gate_steps` steps (none of them is ever trained
    on). 1 = this step's alone (2 prompt groups at the default scale: a noisy gate). Above 1 the pool
    holds groups on which the serving drafter itself won its swap, which favours it (selection)."""
    policy_kl: bool = True
    """Log `drafter/policy_kl`: KL of the current policy from the one the serving drafter was distilled
    against, on the held-out rollouts (keeps a CPU copy of the policy: for testbed-scale studies)."""
    watchdog: float = 0.5
    """Republish the drafter, then turn drafting off, when live per-token acceptance stays below this
    fraction of its teacher-forced prediction (0 = no watchdog; see codraft/watchdog.py)."""
    watchdog_patience: int = 2
    """Consecutive low steps before the watchdog acts."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/latest"
    """Run directory (overridden by `--out`)."""
    samples_per_step: int = 4
    """Rollouts written to samples.jsonl per step."""
    save_policy_every: int = 0
    """Also save the policy every this many steps (0 = only at the end)."""
    checkpoint_every: int = 1
    """Write a resumable checkpoint every this many steps (0 = never; the last step always)."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = False
    """Also write TensorBoard scalars (needs the `tensorboard` package)."""


@dataclass(frozen=True)
class DistConfig:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism of the policy under torchrun: `ddp` (a full replica per rank) or `fsdp`
    (FSDP2: weights, gradients and AdamW states sharded over ranks). Ignored in one process."""
    backend: str = ""
    """torch.distributed backend; empty = `nccl` on CUDA, `gloo` on CPU."""
    timeout_minutes: float = 60.0
    """How long a collective waits before failing; ranks wait for the main rank's rollouts in one."""
    nodes: int = 1
    """Nodes of the job, for `codraft plan` (torchrun's --nnodes decides the real run)."""
    gpus_per_node: int = 1
    """GPUs (training ranks) per node, for `codraft plan` (torchrun's --nproc-per-node decides the real run)."""
    gpu: str = ""
    """GPU type for `codraft plan`: gb200, h200, h100-80gb, a100-80gb, a100-40gb (codraft/plan_table.py); empty = h100-80gb."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 0
    """LoRA rank r of every adapted projection (peft); 0 = no LoRA (full fine-tuning)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Names of the linear layers that get adapters (Qwen3 / Llama attention and MLP projections)."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)


ADDED_FIELDS: dict[str, Any] = {"controller.gate_steps": 1, "controller.gate_margin": 0.0, "controller.distill_lr": 0.0}
"""Fields added after runs were written, with the value a run whose config.toml lacks one ran with:
resuming such a run keeps it (`codraft.configfile.config_from_toml`), and analysis reads the run so."""


def validate(cfg: Config) -> None:
    """Range checks that types cannot express; each error names the key."""
    checks = [
        ("run.steps", cfg.run.steps >= 1, "must be >= 1"),
        ("run.eval_every", cfg.run.eval_every >= 0, "must be >= 0"),
        ("run.eval_samples", cfg.run.eval_samples >= 1, "must be >= 1"),
        ("rollout.group_size", cfg.rollout.group_size >= 2, "must be >= 2 (advantages are relative within a group)"),
        ("rollout.prompts_per_step", cfg.rollout.prompts_per_step >= 1, "must be >= 1"),
        ("rollout.temperature", cfg.rollout.temperature >= 0, "must be >= 0"),
        ("rollout.top_p", 0 < cfg.rollout.top_p <= 1, "must be in (0, 1]"),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens >= 1, "must be >= 1"),
        ("rollout.engines", cfg.rollout.engines >= 1, "must be >= 1"),
        ("grpo.lr", cfg.grpo.lr > 0, "must be > 0"),
        ("grpo.clip_low", 0 <= cfg.grpo.clip_low < 1, "must be in [0, 1)"),
        ("grpo.clip_high", cfg.grpo.clip_high >= 0, "must be >= 0"),
        ("grpo.kl_coef", cfg.grpo.kl_coef >= 0, "must be >= 0"),
        ("grpo.entropy_coef", cfg.grpo.entropy_coef >= 0, "must be >= 0"),
        ("grpo.mini_batches", cfg.grpo.mini_batches >= 1, "must be >= 1"),
        ("grpo.max_grad_norm", cfg.grpo.max_grad_norm > 0, "must be > 0"),
        ("lora.rank", cfg.lora.rank >= 0, "must be >= 0 (0 = no LoRA)"),
        ("lora.alpha", cfg.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= cfg.lora.dropout < 1, "must be in [0, 1)"),
        ("dist.timeout_minutes", cfg.dist.timeout_minutes > 0, "must be > 0"),
        ("dist.nodes", cfg.dist.nodes >= 1, "must be >= 1"),
        ("dist.gpus_per_node", cfg.dist.gpus_per_node >= 1, "must be >= 1"),
        ("drafter.num_speculative_tokens", cfg.drafter.num_speculative_tokens >= 1, "must be >= 1 (use drafter.kind=none for no speculation)"),
        ("drafter.lr", cfg.drafter.lr > 0, "must be > 0"),
        ("drafter.warmup_steps", cfg.drafter.warmup_steps >= 0, "must be >= 0"),
        ("drafter.warmup_prompts", cfg.drafter.warmup_prompts >= 1, "must be >= 1"),
        ("controller.distill_steps", cfg.controller.distill_steps >= 1, "must be >= 1"),
        ("controller.distill_lr", cfg.controller.distill_lr >= 0, "must be >= 0 (0 = drafter.lr)"),
        ("controller.buffer_steps", cfg.controller.buffer_steps >= 1, "must be >= 1"),
        ("controller.holdout_fraction", 0 < cfg.controller.holdout_fraction < 1, "must be in (0, 1)"),
        ("controller.gate_steps", cfg.controller.gate_steps >= 1, "must be >= 1"),
        ("controller.gate_margin", 0 <= cfg.controller.gate_margin < 1, "must be in [0, 1) (0 = the candidate must beat the serving drafter)"),
        ("controller.teacher_top_k", cfg.controller.teacher_top_k >= -1, "must be >= -1 (-1 = automatic, 0 = the full distribution)"),
        ("controller.watchdog", 0 <= cfg.controller.watchdog < 1, "must be in [0, 1) (0 = off)"),
        ("controller.watchdog_patience", cfg.controller.watchdog_patience >= 1, "must be >= 1"),
        ("model.sft_lr", cfg.model.sft_lr > 0, "must be > 0"),
        ("model.head_dim", cfg.model.head_dim in (32, 64, 80, 96, 112, 128, 256), "must be one of 32, 64, 80, 96, 112, 128, 256 (vLLM CPU attention)"),
        ("task.num_eval", cfg.task.num_eval >= 1, "must be >= 1"),
        ("task.num_test", cfg.task.num_test >= 0, "must be >= 0 (0 = no test evaluation)"),
        ("task.mix_share", 0 <= cfg.task.mix_share <= 1, "must be in [0, 1]"),
        ("task.mix_sft_share", 0 <= cfg.task.mix_sft_share < 1, "must be in [0, 1)"),
        ("task.mix_ramp", cfg.task.mix_ramp >= 0, "must be >= 0"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {message}")
