"""The embedded testbed: a locally built tokenizer and a tiny Qwen3 policy that half-solves the task.

With `model.path` empty, `policy_source(cfg)` builds (once) and returns a directory holding:
- a byte-level BPE tokenizer trained on the task's text (digits split one per token),
- a Qwen3-architecture causal LM of a few million parameters,
- warm-started by supervised training on worked solutions, briefly, so that it solves part of the
  task at temperature 1 and leaves room for RL.
The directory is cached under `<cache>/testbed/<key>`, the key hashing every setting that shapes it,
so a second run starts at once. With `model.path` set, that checkpoint is checked and used instead.

    python -m codraft.testbed --preset default   # build (or find) the default testbed and print its path
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
import logging
from pathlib import Path

import torch

from codraft import precision
from codraft.batch import make_batch, token_logprobs
from codraft.config import Config, ModelConfig
from codraft.io import atomic_dir
from codraft.task import Task, make_task

logger = logging.getLogger(__name__)

TESTBED_VERSION = 4
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]


def cache_root(model_cfg: ModelConfig) -> Path:
    root = model_cfg.cache_dir or os.environ.get("CODRAFT_CACHE") or Path.home() / ".cache" / "codraft"
    return Path(root)


def testbed_key(model_cfg: ModelConfig, task: Task) -> str:
    """Hash of every setting that shapes the testbed: the model's, and what identifies the task's
    data (`Task.data_key`; settings that only shape RL, such as rewards, are not part of it)."""
    shape = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("path", "cache_dir")}
    # the warm start's matmul precision depends on the CPU (codraft.precision): a testbed built in
    # bf16 on one machine is not the one fp32 builds on another
    blob = json.dumps({"v": TESTBED_VERSION, "model": shape, "task": task.data_key(), "sft": precision.compute_dtype("cpu")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with one token per digit; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def make_model(model_cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
        max_position_embeddings=model_cfg.max_len,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=eos_id,
    )
    model = Qwen3ForCausalLM(config)
    model.set_attn_implementation("eager")  # trains faster than SDPA on CPU at these sizes
    return model


def encode_examples(tokenizer, examples: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids + eos) per example; prompt and solution are tokenized apart."""
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False).input_ids
    solutions = tokenizer([ex["solution"] for ex in examples], add_special_tokens=False).input_ids
    return [(p, s + [tokenizer.eos_token_id]) for p, s in zip(prompts, solutions)]


def supervised_warm_start(model, data: list[tuple[list[int], list[int]]], pad_id: int, steps: int, batch_size: int, lr: float, seed: int = 0, desc: str = "sft") -> list[float]:
    """Cross-entropy on solution tokens with AdamW and a warmup + cosine schedule; returns losses."""
    from tqdm import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
    model.train()
    losses = []
    queue: list[list[tuple[list[int], list[int]]]] = []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=steps < 20)
    for _ in bar:
        if not queue:  # length-bucketed batches: draw 8 batches' worth, sort by length, split
            pool = sorted(rng.sample(data, min(8 * batch_size, len(data))), key=lambda ex: len(ex[0]) + len(ex[1]))
            queue = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(queue)
        chunk = queue.pop()
        batch = make_batch([p for p, _ in chunk], [c for _, c in chunk], pad_id)
        with precision.autocast("cpu"):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        logp = token_logprobs(logits, batch.targets)
        mask = batch.target_mask.float()
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def sft_rows(cfg: Config, task: Task, train, held_out) -> list[dict[str, str]] | None:
    """The warm start's rows (None: the task warm-starts on its training rows), disjoint from the
    RL and held-out prompts. A function of the settings alone, so a run can tell which prompts the
    testbed saw without reading it."""
    exclude = set(held_out["prompt"]) | set(train["prompt"])  # RL and held-out prompts stay unseen
    return task.sft_examples(max(4 * len(train), cfg.model.sft_steps * cfg.model.sft_batch_size // 4), exclude)


def build_testbed(cfg: Config, task: Task, out: Path) -> dict:
    """Tokenizer + SFT'd tiny Qwen3 into `out`; returns build facts."""
    t0 = time.time()
    model_cfg = cfg.model
    train, held_out = task.splits()
    sft = sft_rows(cfg, task, train, held_out)
    if sft is None:  # the task warm-starts on its training rows
        sft = list(train)
    texts = [ex["prompt"] + ex["solution"] for ex in sft[:20000]] + list(held_out["prompt"])
    tokenizer = train_tokenizer(texts, model_cfg.vocab_size)
    model = make_model(model_cfg, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    data = [ex for ex in encode_examples(tokenizer, sft) if len(ex[0]) + len(ex[1]) <= model_cfg.max_len]
    losses = supervised_warm_start(model, data, tokenizer.pad_token_id, model_cfg.sft_steps, model_cfg.sft_batch_size, model_cfg.sft_lr)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = {
        "testbed_version": TESTBED_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "sft_examples": len(data),
        "sft_loss_first": losses[0] if losses else None,
        "sft_loss_last": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "sft_precision": precision.compute_dtype("cpu"),
        "build_seconds": round(time.time() - t0, 1),
    }
    (out / "testbed.json").write_text(json.dumps(facts, indent=2))
    return facts


def check_checkpoint(path: Path) -> None:
    """A local Hugging Face checkpoint directory of a supported family, with weights and tokenizer."""
    if not path.is_dir():
        raise FileNotFoundError(f"model.path: no such directory: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.path: {path} has no config.json (not a Hugging Face checkpoint)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in ("qwen3", "qwen2", "llama"):
        raise ValueError(f"model.path: model_type {model_type!r} in {config_file} is not supported (qwen3, qwen2, llama)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"model.path: {path} holds no weights (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} holds no tokenizer (tokenizer.json / tokenizer_config.json)")


def policy_source(cfg: Config, task: Task | None = None, log=None) -> Path:
    """The initial policy's directory: `model.path`, or the cached testbed (built if missing).
    Progress goes to `log` (default: this module's logger)."""
    log = log or logger.info
    if cfg.model.path:
        path = Path(cfg.model.path).expanduser()
        check_checkpoint(path)
        return path
    task = task or make_task(cfg.task, cfg.task.seed)
    path = cache_root(cfg.model) / "testbed" / testbed_key(cfg.model, task)
    if (path / "testbed.json").is_file():
        return path
    log(f"building the testbed (tokenizer + {cfg.model.num_layers}-layer Qwen3, {cfg.model.sft_steps} SFT steps) into {path}")
    with atomic_dir(path) as tmp:
        facts = build_testbed(cfg, task, tmp)
    log(f"testbed built: {facts['parameters'] / 1e6:.1f}M parameters, SFT loss {facts['sft_loss_last']:.3f}, {facts['build_seconds']} s")
    return path


if __name__ == "__main__":
    import argparse

    from codraft.configfile import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    print(policy_source(load_config(args.preset, overrides=args.overrides)))
