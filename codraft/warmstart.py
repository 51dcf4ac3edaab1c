"""Warm-starting a drafter: distil it from the SFT policy on the policy's own samples, before RL.

    drafter_dir = warm_drafter(cfg, policy, tokenizer, prompts, policy_dir)   # cached on disk

The policy samples completions for training prompts (plain PyTorch sampling, so no engine is
needed yet), one forward pass records what the drafter reads, and the drafter is distilled for
`drafter.warmup_steps`. The result is cached under `<cache>/drafters/<key>` keyed by the policy
checkpoint and the drafter settings, so the next run with the same testbed starts at once.
A kind that learns nothing (`Drafter.learned = False`) is only built and exported (every time).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from codraft.batch import make_batch
from codraft.config import Config
from codraft.distill import DistillExample, distill, examples_from_forward, teacher_forced_alpha
from codraft.drafter import Drafter, build_drafter, drafter_settings, features_from_forward, load_drafter, target_parts
from codraft.testbed import cache_root

logger = logging.getLogger(__name__)

WARMSTART_VERSION = 2  # bump when a drafter's architecture or its warm start changes


@torch.no_grad()
def sample_completions(policy, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int, eos_id: int, pad_id: int, seed: int, batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) pairs sampled from `policy` with Hugging Face `generate`."""
    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    jobs = [p for p in prompts for _ in range(n)]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding for generation
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen = policy.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=temperature > 0, temperature=temperature or None, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
        ).cpu()
        for i, p in enumerate(chunk):
            completion = gen[i, width:].tolist()
            if eos_id in completion:
                completion = completion[: completion.index(eos_id) + 1]
            else:
                completion = [t for t in completion if t != pad_id]
            out.append((p, completion))
    return out


@torch.no_grad()
def record_examples(policy, pairs: list[tuple[list[int], list[int]]], drafter: Drafter, pad_id: int, temperature: float = 1.0, top_k: int = 0, batch_size: int = 32) -> list[DistillExample]:
    """One policy forward per batch: the drafter's features and the policy's next-token distributions."""
    examples = []
    device = next(policy.parameters()).device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = make_batch([p for p, _ in chunk], [c for _, c in chunk], pad_id)
        out = policy(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), output_hidden_states=True)
        feats = features_from_forward(batch.input_ids.to(device), batch.attention_mask.to(device), out.hidden_states, drafter.aux_layers, drafter.needs_last)
        target_mask = torch.zeros_like(batch.completion_mask)
        target_mask[:, :-1] = batch.completion_mask[:, 1:]  # position t predicts a completion token
        examples += examples_from_forward(feats, target_mask.to(device), out.logits / max(temperature, 1e-6), top_k)
    return examples


def drafter_key(cfg: Config, policy_dir: Path) -> str:
    weights = sorted(Path(policy_dir).glob("*.safetensors"))
    stamp = [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]
    d = dataclasses.asdict(cfg.drafter)
    d.pop("path", None)
    d.pop("k_schedule", None)
    blob = json.dumps({"v": WARMSTART_VERSION, "policy": str(Path(policy_dir).resolve()), "stamp": stamp, "drafter": d, "temperature": cfg.rollout.temperature, "max_new": cfg.rollout.max_new_tokens}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_drafter(cfg: Config, policy, prompts: list[list[int]], policy_dir: Path, eos_id: int, pad_id: int, log=None) -> tuple[Path, dict]:
    """The warm-started drafter's directory (cached), and facts about its warm start (progress to `log`, default: the logger)."""
    log = log or logger.info
    path = cache_root(cfg.model) / "drafters" / f"{cfg.drafter.kind}-{drafter_key(cfg, policy_dir)}"
    dcfg = cfg.drafter
    if not drafter_settings(dcfg)[0].learned:  # nothing to distil: exported as configured (cheap, so never stale)
        facts = {"kind": dcfg.kind, "learned": False}
        build_drafter(policy, dcfg).export(path)
        (path / "warmstart.json").write_text(json.dumps(facts, indent=2))
        return path, facts
    if (path / "warmstart.json").is_file():
        return path, json.loads((path / "warmstart.json").read_text())
    n_prompts = min(len(prompts), max(dcfg.warmup_prompts, dcfg.batch_size * 4))
    log(f"warm-starting the {dcfg.kind} drafter: sampling {n_prompts} x 4 completions from the SFT policy, {dcfg.warmup_steps} distillation steps")
    pairs = sample_completions(policy, prompts[:n_prompts], 4, cfg.rollout.temperature, cfg.rollout.max_new_tokens, eos_id, pad_id, seed=cfg.run.seed)
    counts = torch.zeros(policy.config.vocab_size)
    for p, c in pairs:
        counts.index_add_(0, torch.tensor(p + c), torch.ones(len(p) + len(c)))
    drafter = build_drafter(policy, dcfg, token_counts=counts).to(next(policy.parameters()).device)
    examples = record_examples(policy, pairs, drafter, pad_id, cfg.rollout.temperature, top_k=cfg.controller.teacher_top_k)
    held_out, train = examples[: len(examples) // 8], examples[len(examples) // 8 :]
    parts = target_parts(policy)
    vocab = policy.config.vocab_size
    k = dcfg.num_speculative_tokens
    before = teacher_forced_alpha(drafter, held_out, parts, k, vocab)
    stats = distill(drafter, train, parts, steps=dcfg.warmup_steps, k=k, loss=dcfg.loss, lr=dcfg.lr, batch_size=dcfg.batch_size, vocab=vocab, seed=cfg.run.seed)
    after = teacher_forced_alpha(drafter, held_out, parts, k, vocab)
    facts = {
        "kind": dcfg.kind,
        "examples": len(train),
        "steps": stats.steps,
        "loss_first": stats.loss_first,
        "loss_last": stats.loss_last,
        "seconds": round(stats.seconds, 1),
        "alpha_before": before.greedy,
        "alpha_after": after.greedy,
        "accept_len_before": before.accept_len,
        "accept_len_after": after.accept_len,
    }
    drafter.export(path)
    (path / "warmstart.json").write_text(json.dumps(facts, indent=2))
    log(f"drafter warm start: teacher-forced acceptance length {before.accept_len:.2f} -> {after.accept_len:.2f} at k={k} ({stats.seconds:.0f} s)")
    return path, facts


def initial_drafter(cfg: Config, policy, prompts, policy_dir: Path, eos_id: int, pad_id: int, log=None) -> tuple[Drafter, Path]:
    """`drafter.path` if given (checked against the policy), else the cached warm start."""
    if cfg.drafter.path:
        path = Path(cfg.drafter.path)
    else:
        path, _ = warm_drafter(cfg, policy, prompts, policy_dir, eos_id, pad_id, log)
    drafter = load_drafter(path, policy).to(next(policy.parameters()).device)  # the policy's device (a GPU when there is one)
    if drafter.name != cfg.drafter.kind:
        from codraft.drafter import DrafterMismatch

        raise DrafterMismatch(f"drafter.path {path} holds a {drafter.name!r} drafter but drafter.kind is {cfg.drafter.kind!r}")
    return drafter, path
