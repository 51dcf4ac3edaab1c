"""Memory per GPU of a run's configuration, from the model's config.json alone (`codraft plan`).

    codraft plan --preset qwen3-8b-8gpu                             # prints the table, exits 0 if it fits
    codraft plan --preset qwen3-8b-8gpu --set dist.strategy=ddp     # exits 1 naming the component
    codraft plan --set model.path=/models/Qwen3-32B --set dist.gpus_per_node=8 --set dist.gpu=h200

The model is built on torch's meta device (`AutoModelForCausalLM.from_config`: no weights, no
memory) to count its parameters, layers and head; the drafter is built the same way. The config
comes from `model.path`/config.json, else `model.config` (a bundled name such as `qwen3-8b`, from
codraft/model_configs/, or a path), else the testbed's sizes. The job's shape comes from
`[dist] nodes`, `gpus_per_node`, `gpu` (see `codraft.plan_table.GPUS`), `strategy`.

What is counted, per kind of GPU (rank 0: trainer + vLLM worker + drafter; other GPUs of node 0:
trainer + vLLM worker; GPUs of other nodes: trainer), by stage of a step:
  all       vLLM's share (gpu_memory_utilization x GPU), policy weights / grads / AdamW (16 B per
            trained parameter, sharded over all ranks by FSDP2, a full replica under DDP plus its
            gradient buckets; LoRA: frozen fp32 base + adapters), a reference model, the serving
            drafter, the CUDA context and allocator slack
  logprob   FSDP2's gathered layers, logits (and on rank 0 the hidden states the drafter reads)
  train     FSDP2's gathered layers and gradients, autocast's bf16 weight copies kept for backward,
            activations of one micro-batch (grpo.micro_batch_tokens, at least model.max_len: a longer
            sequence is a micro-batch of its own), its logits and loss chain
  control   the drafter refresh on rank 0: a candidate copy, its gradients and AdamW, the policy's
            embedding and head gathered for it, distillation activations of drafter.batch_size
            sequences of model.max_len tokens (or teacher-forced acceptance, whichever is larger)
A GPU's peak is `all` plus its largest stage. Sequences are taken at model.max_len (worst case).
Host memory per node: checkpoint loading, the engine's weight syncs, the distillation buffer
(rank 0's rollouts of the last controller.buffer_steps steps, dense vs sparse teachers).
The drafter is assumed to live on rank 0's GPU.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from codraft import plan_table as pt
from codraft.config import Config, ConfigError

BUNDLED = Path(__file__).parent / "model_configs"


@dataclass
class ModelFacts:
    params: int
    embed: int
    head: int  # 0 when tied to the embedding
    layer: int  # parameters of the largest decoder layer
    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    kv_heads: int
    vocab: int
    trainable: int  # parameters the optimizer holds (LoRA: the adapters)
    drafter: int = 0
    drafter_width: int = 0  # hidden + intermediate of the draft layer(s)
    drafter_layers: int = 0
    drafter_feature: int = 0  # per-token width of the features it reads (EAGLE-3: 3H)


def model_config_file(cfg: Config) -> Path | None:
    """The config.json `codraft plan` reads (None: the testbed, built from the model section)."""
    if cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
        return Path(cfg.model.path) / "config.json"
    if cfg.model.config:
        for path in (BUNDLED / f"{cfg.model.config}.json", Path(cfg.model.config), Path(cfg.model.config) / "config.json"):
            if path.is_file():
                return path
        names = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.json")))
        raise ConfigError(f"config key 'model.config': {cfg.model.config!r} is neither a bundled config ({names}) nor a config.json")
    if cfg.model.path:
        raise ConfigError(f"config key 'model.path': {cfg.model.path} holds no config.json; set model.config (a bundled name or a path) for `codraft plan`")
    return None


def hf_config(cfg: Config):
    from transformers import AutoConfig, Qwen3Config

    path = model_config_file(cfg)
    if path is None:
        m = cfg.model
        return Qwen3Config(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                           num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, max_position_embeddings=m.max_len, tie_word_embeddings=False)
    data = json.loads(path.read_text())
    return AutoConfig.for_model(**data)


def model_facts(cfg: Config, config=None) -> ModelFacts:
    """Counts from the model built on the meta device (and the configured drafter, likewise)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config or hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    layers = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers][0]
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    params = sum(p.numel() for p in model.parameters())
    facts = ModelFacts(
        params=params, embed=embed.numel(), head=0 if head is embed else head.numel(), layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size, q_dim=heads * head_dim, kv_dim=kv * head_dim, kv_heads=kv,
        vocab=config.vocab_size, trainable=lora_params(model, cfg) if cfg.lora.rank else params,
    )
    if cfg.drafter.kind != "none":
        _add_drafter(facts, model, cfg)
    return facts


def lora_params(model, cfg: Config) -> int:
    """Adapter parameters: r (in + out) per adapted linear layer."""
    import torch

    targets = set(cfg.lora.target_modules)
    return sum(cfg.lora.rank * (m.in_features + m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def _add_drafter(facts: ModelFacts, model, cfg: Config) -> None:
    import torch

    from codraft.drafter import build_drafter

    with torch.device("meta"):
        drafter = build_drafter(model, cfg.drafter, token_counts=torch.zeros(facts.vocab, device="cpu"))
    hf = drafter.hf_config() if hasattr(drafter, "hf_config") else {}
    facts.drafter = sum(p.numel() for p in drafter.parameters())
    facts.drafter_width = hf.get("hidden_size", facts.hidden) + hf.get("intermediate_size", facts.intermediate)
    facts.drafter_layers = hf.get("num_hidden_layers", 1) if facts.drafter else 0
    facts.drafter_feature = len(getattr(drafter, "aux_layers", ())) * facts.hidden + (facts.hidden if getattr(drafter, "needs_last", False) else 0)


@dataclass
class Role:
    name: str
    engine: bool  # hosts a vLLM worker (node 0, one per tensor-parallel rank)
    trainer: bool
    main: bool  # rank 0: the drafter and the controller


@dataclass
class Plan:
    title: str
    gpu: str
    gpu_bytes: float
    roles: list[Role]
    rows: list[tuple[str, str, list[float]]]  # (component, stage, bytes per role)
    host: list[tuple[str, float, float]]  # (what, node 0 bytes, other nodes bytes)
    notes: list[str]
    problems: list[str]

    def peak(self, i: int) -> tuple[float, str]:
        """Role i's peak bytes and the stage where it is reached."""
        base = sum(v[i] for _, stage, v in self.rows if stage == "all")
        stages = {s: sum(v[i] for _, stage, v in self.rows if stage == s) for s in ("logprob", "train", "control")}
        stage = max(stages, key=stages.get)
        return base + stages[stage], stage

    @property
    def fits(self) -> bool:
        return not self.problems


def roles_of(cfg: Config) -> list[Role]:
    world, tp = cfg.dist.nodes * cfg.dist.gpus_per_node, cfg.rollout.tensor_parallel_size
    engine = cfg.rollout.backend == "vllm"
    everywhere = engine and cfg.rollout.engines > 1  # one engine per node: every node's GPUs host one
    roles = [Role("rank 0", engine, True, True)]
    if engine and tp > 1:
        roles.append(Role("node-0 GPU" if world > 1 else "engine-only GPU", True, world > 1, False))
    if world > max(tp if engine else 1, 1):
        roles.append(Role("other GPU" if cfg.dist.nodes == 1 else "other-node GPU", everywhere, True, False))
    return roles


def engine_layout_problems(cfg: Config) -> list[str]:
    """What keeps the rollout engines from fitting the job: more tensor-parallel GPUs than a node, or
    engines that do not divide the ranks or would share GPUs."""
    world, tp, engines = cfg.dist.nodes * cfg.dist.gpus_per_node, cfg.rollout.tensor_parallel_size, cfg.rollout.engines
    if cfg.rollout.backend != "vllm":
        return []
    out = []
    if tp > cfg.dist.gpus_per_node:
        out.append(f"rollout engine: rollout.tensor_parallel_size {tp} > dist.gpus_per_node {cfg.dist.gpus_per_node} (an engine stays within its node)")
    if world % engines or engines * tp > world:
        out.append(f"rollout engines: rollout.engines {engines} x rollout.tensor_parallel_size {tp} GPUs do not fit the job's {world} GPUs as equal groups")
    elif engines not in (1, cfg.dist.nodes):
        out.append(f"rollout engines: rollout.engines {engines} on {cfg.dist.nodes} node(s); on GPUs an engine is owned by a node's local rank 0 "
                   f"(its GPUs from device 0): 1 or one per node ({cfg.dist.nodes})")
    return out


def policy_rows(cfg: Config, f: ModelFacts, world: int) -> list[tuple[str, str, callable]]:
    """(component, stage, bytes of a role) for the policy's training and scoring."""
    fsdp, ddp, auto = world > 1 and cfg.dist.strategy == "fsdp", world > 1 and cfg.dist.strategy == "ddp", cfg.grpo.autocast_bf16
    shard, frac = (world if fsdp else 1), f.trainable / f.params
    mbt = max(cfg.grpo.micro_batch_tokens, cfg.model.max_len)  # a longer sequence gets a micro-batch of its own
    layer_act = pt.layer_activation_bytes(f.hidden, f.intermediate, f.q_dim, f.kv_dim, auto)
    ckpt = cfg.grpo.gradient_checkpointing  # each layer's fp32 input kept, one layer's activations rebuilt at a time
    act = (f.layers * 4 * f.hidden + layer_act if ckpt else f.layers * layer_act) + pt.OUTSIDE_LAYERS_PER_TOKEN_H * f.hidden
    hook = (f.layers + 1) * 4 * f.hidden + 4 * f.drafter_feature + pt.HOOK_LOGITS_PER_TOKEN_V * f.vocab
    strategy = "FSDP2 / %d" % world if fsdp else ("DDP replica" if ddp else "one process")
    lora = f", LoRA r={cfg.lora.rank}: {f.trainable / 1e6:.0f}M trained" if cfg.lora.rank else ""
    return [
        (f"policy weights, fp32 ({strategy})", "all", lambda r: f.params * 4 / shard if r.trainer else 0),
        (f"policy gradients, fp32{lora}", "all", lambda r: f.trainable * 4 / shard if r.trainer else 0),
        ("AdamW m and v, fp32", "all", lambda r: f.trainable * 8 / shard if r.trainer else 0),
        ("DDP gradient buckets", "all", lambda r: f.trainable * 4 if r.trainer and ddp else 0),
        ("reference policy, fp32 (grpo.kl_coef > 0)", "all", lambda r: f.params * 4 if r.trainer and cfg.grpo.kl_coef > 0 else 0),
        ("FSDP2 gathered: embedding, head, 2 layers", "logprob", lambda r: (f.embed + f.head + 2 * f.layer) * 4 if r.trainer and fsdp else 0),
        ("logits, logprob stage", "logprob", lambda r: mbt * pt.SCORE_LOGITS_PER_TOKEN_V[auto] * f.vocab if r.trainer else 0),
        ("hidden states + teacher for the drafter", "logprob", lambda r: mbt * hook if r.main and f.drafter else 0),
        ("FSDP2 gathered: embedding, head, 2 layers", "train", lambda r: (f.embed + f.head + 2 * f.layer) * 4 if r.trainer and fsdp else 0),
        ("FSDP2 unsharded gradients: root + 1 layer", "train", lambda r: (f.embed + f.head + f.layer) * 4 * frac if r.trainer and fsdp else 0),
        ("bf16 weight copies kept for backward", "train", lambda r: (f.layer if ckpt else f.params - f.embed) * 2 if r.trainer and auto else 0),
        (f"activations, {mbt} tokens x {f.layers} layers{' (bf16 autocast)' if auto else ' (fp32)'}{', checkpointed' if ckpt else ''}", "train", lambda r: mbt * act if r.trainer else 0),
        ("logits and loss chain", "train", lambda r: mbt * pt.TRAIN_LOGITS_PER_TOKEN_V[auto] * f.vocab if r.trainer else 0),
    ]


def distill_bytes(cfg: Config, f: ModelFacts, sparse: bool) -> tuple[float, float]:
    """(distillation step, teacher-forced acceptance) activation bytes on the drafter's GPU."""
    from codraft.distill import ALPHA_BATCH_ELEMENTS

    k, T, V = cfg.drafter.num_speculative_tokens, cfg.model.max_len, f.vocab
    per_pos = k * (pt.DISTILL_PER_STEP_V[sparse] * V + pt.DISTILL_PER_STEP_HIDDEN * f.drafter_width) + pt.DISTILL_BACKWARD_V * V
    per_pos += 0 if sparse else pt.DISTILL_DENSE_TEACHER_V * V
    positions = min(pt.ALPHA_BATCH_SEQUENCES, max(1, ALPHA_BATCH_ELEMENTS // (T * V))) * T  # at least one sequence per batch
    return cfg.drafter.batch_size * T * per_pos, positions * 4 * V * (k + pt.ALPHA_TENSORS_V + (0 if sparse else 2))


def drafter_rows(cfg: Config, f: ModelFacts, world: int, sparse: bool) -> list[tuple[str, str, callable]]:
    fsdp = world > 1 and cfg.dist.strategy == "fsdp"
    distill, alpha = distill_bytes(cfg, f, sparse)
    teacher = "sparse" if sparse else "dense"
    on = lambda r: r.main and f.drafter > 0  # noqa: E731
    return [
        (f"drafter ({f.drafter / 1e6:.0f}M), serving copy fp32", "all", lambda r: f.drafter * 4 if on(r) else 0),
        ("drafter refresh: candidate + grads + AdamW", "control", lambda r: f.drafter * 16 if on(r) else 0),
        ("policy embedding + head gathered for it", "control", lambda r: (f.embed + f.head) * 4 if on(r) and fsdp else 0),
        (f"distillation, {cfg.drafter.batch_size} x {cfg.model.max_len} tokens, {teacher} teachers", "control", lambda r: max(distill, alpha) if on(r) else 0),
    ]


def engine_notes(cfg: Config, f: ModelFacts, gpu_bytes: float) -> tuple[list[str], list[str]]:
    """vLLM's share split into weights, runtime and KV cache; problems when the share cannot hold them."""
    if cfg.rollout.backend != "vllm":
        return ["rollout engine: the reference engine runs on the CPU (no GPU share)"], []
    tp, r = cfg.rollout.tensor_parallel_size, cfg.rollout
    share = r.gpu_memory_utilization * gpu_bytes
    weights = (f.params + f.drafter) * 2 / tp
    sampler = r.max_num_seqs * (cfg.drafter.num_speculative_tokens + 1) * f.vocab * 4 * 2
    runtime = pt.ENGINE_RUNTIME_GIB * pt.GIB + sampler
    kv_heads_split = min(tp, f.kv_heads)  # heads beyond the split are replicated
    per_token = 2 * (f.layers + f.drafter_layers) * f.kv_dim * 2 / kv_heads_split
    kv = share - weights - runtime
    need = r.max_num_seqs * cfg.model.max_len
    notes = [f"rollout engines: {r.engines} x TP {tp}; per vLLM worker: share {share / pt.GIB:.1f} GiB = weights {weights / pt.GIB:.1f} (policy + drafter, bf16 / TP)"
             f" + runtime {runtime / pt.GIB:.1f} + KV cache {kv / pt.GIB:.1f} GiB; {per_token / 1024:.0f} KiB/token -> {max(kv, 0) / per_token / 1e6:.2f}M tokens"
             f" (max_num_seqs x max_len = {need / 1e6:.2f}M{'' if kv >= need * per_token else ': vLLM will queue/preempt sequences'})"]
    problems = [] if kv > 0 else [f"rollout engine: weights {weights / pt.GIB:.1f} GiB + runtime {runtime / pt.GIB:.1f} GiB exceed its share "
                                  f"{share / pt.GIB:.1f} GiB (rollout.gpu_memory_utilization {r.gpu_memory_utilization})"]
    return notes, problems


def host_rows(cfg: Config, f: ModelFacts, world: int, sparse: bool) -> list[tuple[str, float, float]]:
    """(what, node 0 bytes, other nodes' bytes) of host memory."""
    from codraft.distill import resolve_top_k

    gpn, fsdp = cfg.dist.gpus_per_node, world > 1 and cfg.dist.strategy == "fsdp"
    rows0 = math.ceil(cfg.rollout.prompts_per_step * cfg.rollout.group_size / world)
    tokens = cfg.controller.buffer_steps * rows0 * cfg.model.max_len
    k = resolve_top_k(cfg.controller.teacher_top_k, f.vocab) or pt_k(f)
    per_token = 16 + 2 * f.drafter_feature
    dense, sparse_b = tokens * (per_token + 2 * f.vocab), tokens * (per_token + 6 * k + 4)
    buffer = (sparse_b if sparse else dense) if f.drafter else 0
    return [
        ("checkpoint loading: fp32 per rank (at start)", gpn * f.params * 4, gpn * f.params * 4 if cfg.dist.nodes > 1 else 0),
        ("full state dict for the engines (FSDP2, each engine's rank)", f.params * 4 if fsdp else 0, f.params * 4 if fsdp and cfg.rollout.engines > 1 else 0),
        ("reference engine's policy (rollout.backend = reference)", f.params * 4 if cfg.rollout.backend == "reference" else 0, 0),
        (f"distillation buffer ({'sparse' if sparse else 'dense'} teachers; dense {dense / pt.GIB:.1f} / sparse {sparse_b / pt.GIB:.1f} GiB)", buffer, 0),
    ]


def pt_k(f: ModelFacts) -> int:
    """The k a sparse alternative would keep (for the dense-vs-sparse comparison)."""
    from codraft.distill import AUTO_TOP_K

    return min(AUTO_TOP_K, f.vocab)


def estimate(cfg: Config, facts: ModelFacts | None = None) -> Plan:
    """The plan of `cfg`: memory per kind of GPU by component, host memory, and what does not fit."""
    from codraft.distill import resolve_top_k

    f = facts or model_facts(cfg)
    gpu_name, spec = pt.gpu_spec(cfg.dist.gpu)
    gpu_bytes, world = spec.gib * pt.GIB, cfg.dist.nodes * cfg.dist.gpus_per_node
    sparse = resolve_top_k(cfg.controller.teacher_top_k, f.vocab) > 0
    roles = roles_of(cfg)
    share = cfg.rollout.gpu_memory_utilization * gpu_bytes if cfg.rollout.backend == "vllm" else 0
    specs = [("vLLM share (rollout.gpu_memory_utilization)", "all", lambda r: share if r.engine else 0)]
    specs += policy_rows(cfg, f, world) + drafter_rows(cfg, f, world, sparse)
    specs.append(("CUDA context (trainer process)", "all", lambda r: pt.CUDA_CONTEXT_GIB * pt.GIB if r.trainer else 0))
    rows = [(name, stage, [float(fn(r)) for r in roles]) for name, stage, fn in specs]
    plan = Plan("", gpu_name, gpu_bytes, roles, [r for r in rows if any(r[2])], host_rows(cfg, f, world, sparse), [], [])
    slack = [pt.ALLOCATOR_SLACK * (plan.peak(i)[0] - (share if r.engine else 0)) for i, r in enumerate(roles)]
    plan.rows.append((f"allocator slack ({pt.ALLOCATOR_SLACK:.0%} of the trainer's peak)", "all", slack))
    notes, plan.problems = engine_notes(cfg, f, gpu_bytes)
    count = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"  # noqa: E731
    plan.notes = notes + [f"model: {count(f.params)} parameters ({f.layers} layers, hidden {f.hidden}, vocabulary {f.vocab}); drafter {cfg.drafter.kind}: {count(f.drafter)}"]
    plan.problems += engine_layout_problems(cfg)
    plan.problems += overflows(plan)
    plan.title = f"codraft plan: {world} x {spec.name} ({cfg.dist.nodes} node(s) x {cfg.dist.gpus_per_node}), {gpu_bytes / pt.GIB:.1f} GiB each, dist.strategy = {cfg.dist.strategy}"
    return plan


STATE_ROWS = ("policy weights", "policy gradients", "AdamW", "DDP gradient buckets")


def overflows(plan: Plan) -> list[str]:
    """One line per kind of GPU whose peak exceeds the GPU: the training state when it alone does not
    fit, else the largest component at the stage of the peak."""
    out = []
    for i, role in enumerate(plan.roles):
        peak, stage = plan.peak(i)
        if peak <= plan.gpu_bytes:
            continue
        state = sum(v[i] for name, _, v in plan.rows if name.startswith(STATE_ROWS))
        if state > plan.gpu_bytes:
            reason = f"training state (policy weights + gradients + AdamW{' + DDP buckets: a full replica per GPU' if any(n.startswith('DDP') for n, _, _ in plan.rows) else ''}) {state / pt.GIB:.1f} GiB alone"
        else:
            name, _, values = max((r for r in plan.rows if r[1] in ("all", stage)), key=lambda r: r[2][i])
            reason = f"largest: {name} ({values[i] / pt.GIB:.1f} GiB)"
        out.append(f"{role.name}: needs {peak / pt.GIB:.1f} GiB of {plan.gpu_bytes / pt.GIB:.1f} GiB at the {stage} stage; {reason}")
    return out


def render(plan: Plan) -> str:
    peaks, n = [plan.peak(i) for i in range(len(plan.roles))], range(len(plan.roles))
    stage_sum = lambda st: [pt.gib(sum(v[i] for _, s, v in plan.rows if s == st)) for i in n]  # noqa: E731
    totals = [(f"sum [{st}]", stage_sum(st)) for st in ("all", "logprob", "train", "control")] + [("peak", [pt.gib(p) for p, _ in peaks]), ("  reached at the stage", [s for _, s in peaks]), ("GPU memory", [pt.gib(plan.gpu_bytes)] * len(peaks))]
    table = pt.format_plan(plan.title, [r.name for r in plan.roles], plan.rows, totals, plan.notes)
    host = [f"{'host memory per node, GiB':<72}{'node 0':>10}{'other nodes':>14}"] + [f"{what:<72}{pt.gib(a):>10}{pt.gib(b):>14}" for what, a, b in plan.host if a or b]
    verdict = ["fits: every GPU's peak is within its memory"] if plan.fits else ["DOES NOT FIT:"] + [f"  {p}" for p in plan.problems]
    return "\n".join([table, "", *host, "", *verdict])
