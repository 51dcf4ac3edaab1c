"""Distributed GRPO: 2 gloo processes on their shards take the same step as one process on the whole batch.

Each spawned rank builds the same tiny Qwen3 (seeded), receives the global batch from rank 0 by
broadcast, scores and updates its rows with DistributedTrainer (plain, with a KL term, with LoRA),
and rank 0 writes the diagnostics and the gathered full (LoRA-merged) weights to a file; the parent compares them with GRPOTrainer's update on the
same batch. fp32, autocast off; tolerance atol 1e-5 on weights and log-probs, 1e-5 relative on stats.
"""
import faulthandler
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from codraft.batch import make_batch
from codraft.config import GRPOConfig
from codraft.distributed import DistConfig, DistributedTrainer, DistState, broadcast_object, full_state_dict, init_from_env, left_group, shard_rows, shutdown, wrap_policy
from codraft.grpo import GRPOTrainer
from codraft.lora import LoRAConfig, apply_lora, merged_state_dict
from codraft.process_exit import exit_skipping_finalization
from conftest import child_env

VOCAB = 64
ROWS = 8
MINI_BATCHES = 2

# (name, config, use a reference model, LoRA rank): the first leaves rank 1 without active rows in
# one mini-batch (zero advantages, no KL) and clips; the second trains every row with a KL term to a
# reference; the third trains LoRA adapters and compares the merged weights.
SCENARIOS = [
    ("zero_adv", GRPOConfig(lr=1e-2, mini_batches=MINI_BATCHES, micro_batch_tokens=20, max_grad_norm=0.05, autocast_bf16=False), False, 0),
    ("kl", GRPOConfig(lr=1e-2, mini_batches=MINI_BATCHES, micro_batch_tokens=24, max_grad_norm=10.0, kl_coef=0.1, autocast_bf16=False), True, 0),
    ("lora", GRPOConfig(lr=1e-2, mini_batches=1, micro_batch_tokens=24, autocast_bf16=False), False, 4),
]


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(config).eval()


def minis() -> list[list[int]]:
    """The trainer's mini-batches of a ROWS batch at step 0 of seed 0 (the trainers here are built with those)."""
    from codraft.grpo import minibatch_split

    return minibatch_split(ROWS, MINI_BATCHES, seed=0, step=0)


def global_batch():
    """A fixed batch of ROWS sequences of uneven lengths, and advantages: in the first mini-batch
    every row of rank 1 (odd rows) has advantage 0."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist() for _ in range(ROWS)]
    completions = [torch.randint(1, VOCAB, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist() for _ in range(ROWS)]
    adv = torch.randn(ROWS, generator=gen)
    for r in minis()[0]:
        if r % 2 == 1:
            adv[r] = 0.0
    return make_batch(prompts, completions, pad_id=0), adv


def run_step(trainer, batch, adv):
    scored = trainer.score(batch, force=True)
    return scored, trainer.update(batch, scored, adv)


def start_rank(rank: int, world: int, port: int, strategy: str) -> DistState:
    """Join a spawned rank to the gloo group of `world` on localhost:`port` (one thread each); a
    crash prints every thread's Python stack (faulthandler; see end_rank)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.enable()
    return init_from_env(DistConfig(strategy=strategy, timeout_minutes=2))


def _rank_main(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    state = start_rank(rank, world, port, strategy)
    finished = False
    try:
        results = {}
        for name, cfg, use_ref, rank_lora in SCENARIOS:
            policy = wrap_policy(apply_lora(tiny_qwen3(), LoRAConfig(rank=rank_lora)), state, strategy)
            reference = tiny_qwen3(seed=1).requires_grad_(False) if use_ref else None
            trainer = DistributedTrainer(policy, cfg, state, reference=reference)
            batch, adv = broadcast_object(global_batch() if state.is_main else None, state)
            scored, stats = run_step(trainer, batch, adv)
            results[name] = {"stats": stats, "old_logp": scored.old_logp, "weights": full_state_dict(policy, state)}
        if state.is_main:
            torch.save(results, out)
        finished = True
    finally:
        end_rank(finished)


def end_rank(finished: bool) -> None:
    """Leave the process group; a rank that finished then exits without interpreter finalization,
    as a `codraft` torchrun rank does (codraft.process_exit says why: once, in CI,
    2026-12-02, rank 1 of test_two_fsdp_ranks_resume_exactly aborted with "terminate called without
    an active exception"). It does not help if an abort comes earlier, which the faulthandler each
    rank enables would then show. A rank that raised, or whose shutdown raised, still leaves with
    its exception, which spawn reports."""
    shutdown(drain=finished)
    if finished:
        assert left_group(), "shutdown did not record leaving the group init_from_env joined"
        exit_skipping_finalization(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process():
    """GRPOTrainer on the whole batch, per scenario: the result the ranks must reproduce."""
    out = {}
    for name, cfg, use_ref, rank_lora in SCENARIOS:
        policy = apply_lora(tiny_qwen3(), LoRAConfig(rank=rank_lora))
        trainer = GRPOTrainer(policy, cfg, reference=tiny_qwen3(seed=1).requires_grad_(False) if use_ref else None)
        scored, stats = run_step(trainer, *global_batch())
        weights = merged_state_dict(policy) if rank_lora else policy.state_dict()
        out[name] = {"stats": stats, "old_logp": scored.old_logp, "weights": weights}
    return out


def has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(not has_fsdp2(), reason="no FSDP2 (fully_shard) in this torch"))])
def test_two_ranks_match_one_process(strategy, single_process, tmp_path):
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), strategy, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    for name, *_ in SCENARIOS:
        want = single_process[name]
        assert torch.allclose(got[name]["old_logp"], want["old_logp"], atol=1e-5)
        for key in ("loss", "clip_frac", "kl", "entropy", "grad_norm", "skipped_updates", "trained_frac"):
            assert got[name]["stats"][key] == pytest.approx(want["stats"][key], rel=1e-5, abs=1e-6), (name, key)
        assert got[name]["weights"].keys() == want["weights"].keys()  # HF names (no `module.`, LoRA merged)
        for key, value in want["weights"].items():
            assert torch.allclose(got[name]["weights"][key], value, atol=1e-5), (name, key)
    # the scenarios exercise what they are meant to: clipping of the full gradient and a KL term
    assert single_process["zero_adv"]["stats"]["grad_norm"] > SCENARIOS[0][1].max_grad_norm
    assert single_process["kl"]["stats"]["kl"] > 0


def test_plans_cover_active_rows_once_with_equal_pass_counts():
    batch, adv = global_batch()
    cfg = SCENARIOS[0][1]
    for active in ([r for r in mini if float(adv[r]) != 0.0] for mini in minis()):
        plans = [DistributedTrainer(tiny_qwen3(), cfg, DistState(rank=k, world_size=2))._plan(batch, active) for k in range(2)]
        assert len(plans[0]) == len(plans[1])  # the same number of passes: collectives stay in step
        assert sorted(r for plan in plans for rows in plan for r in rows) == sorted(active)
    first = [r for r in minis()[0] if float(adv[r]) != 0.0]
    rank1 = DistributedTrainer(tiny_qwen3(), cfg, DistState(rank=1, world_size=2))._plan(batch, first)
    assert rank1 and all(rows == [] for rows in rank1)  # rank 1 only joins with zero-weight passes


@pytest.mark.parametrize("n_rows, world", [(8, 2), (7, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_rows_assigns_every_row_once(n_rows, world):
    shards = [shard_rows(n_rows, DistState(rank=r, world_size=world)) for r in range(world)]
    assert sorted(r for s in shards for r in s) == list(range(n_rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    state = init_from_env()
    assert (state.rank, state.world_size, state.is_main) == (0, 1, True)
    assert not torch.distributed.is_initialized()
    model = tiny_qwen3()
    assert wrap_policy(model, state, "fsdp") is model
    assert broadcast_object("batch", state) == "batch"
    # at world size 1 the distributed trainer is the plain one
    cfg = replace(SCENARIOS[1][1], mini_batches=1)
    batch, adv = global_batch()
    plain, dist_model = tiny_qwen3(), tiny_qwen3()
    _, want = run_step(GRPOTrainer(plain, cfg, reference=tiny_qwen3(seed=1)), batch, adv)
    _, got = run_step(DistributedTrainer(dist_model, cfg, state, reference=tiny_qwen3(seed=1)), batch, adv)
    assert got == pytest.approx(want, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), dist_model.parameters()))


def test_exit_skipping_finalization_runs_exit_handlers_and_keeps_output():
    """exit_skipping_finalization keeps the exit code, runs the atexit handlers (logging's among
    them: a MemoryHandler delivers its record only when logging shuts down) and flushes stdout to a
    pipe, but does not wait for a running non-daemon thread, as interpreter finalization would."""
    script = (
        "import atexit, logging, logging.handlers, sys, threading, time\n"
        "from codraft.process_exit import exit_skipping_finalization\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "logging.getLogger('x').addHandler(logging.handlers.MemoryHandler(1000, logging.CRITICAL, logging.StreamHandler(sys.stderr)))\n"
        "logging.getLogger('x').warning('logged')\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
        "print('written')\n"
        "exit_skipping_finalization(3)\n"
    )
    env = {k: v for k, v in child_env().items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is then block-buffered
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 3
    assert proc.stdout.splitlines()[-2:] == ["written", "exit handler ran"]
    assert "logged" in proc.stderr.splitlines()
