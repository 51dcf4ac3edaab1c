"""Checkpoints of sharded state (FSDP2): every rank writes its shard with torch.distributed.checkpoint
into the step directory, rank 0 publishes, and a resume restores it exactly on the same world size.

- One process, a stand-in sharded component: its state goes to `<name>_dcp/`, state.json records the
  world size and the sharded names, and a load restores it.
- A sharded checkpoint resumed by a job of another size is refused, naming both sizes (from
  `checkpoint.load` and, before anything is built, from `rundir.check_resumable`).
- 2 gloo ranks, FSDP2 (plain and LoRA): train a step, checkpoint, train a second step; a fresh
  trainer (other initial weights) loads the checkpoint and trains the same second step. The full
  weights after it must be bitwise equal to the uninterrupted ones.
"""
import dataclasses
import json

import pytest
import torch
from test_distributed import end_rank, free_port, global_batch, has_fsdp2, run_step, start_rank, tiny_qwen3

from codraft import checkpoint
from codraft.config import ConfigError, GRPOConfig
from codraft.distributed import DistributedTrainer, DistState, full_state_dict, wrap_policy
from codraft.lora import LoRAConfig, apply_lora

CFG = GRPOConfig(lr=1e-2, mini_batches=2, micro_batch_tokens=24, autocast_bf16=False)


class ShardBox:
    """A component whose tensor is 'sharded' (saved through DCP) next to a plain counter."""

    def __init__(self, value: float, count: int = 0):
        self.value, self.count = torch.full((4,), value), count

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    def sharded_state_dict(self):
        return {"value": self.value}

    def load_sharded_state_dict(self, state):
        self.value = state["value"]


def test_sharded_state_goes_through_dcp_and_comes_back(tmp_path):
    path = checkpoint.save(tmp_path, 3, {"box": ShardBox(2.5, count=7)})
    assert (path / "box_dcp" / ".metadata").is_file() and (path / "box.pt").is_file()
    meta = json.loads((path / "state.json").read_text())
    assert meta["world_size"] == 1 and meta["sharded"] == ["box"]
    box = ShardBox(0.0)
    assert checkpoint.load(tmp_path, {"box": box}) == 4
    assert box.count == 7 and torch.equal(box.value, torch.full((4,), 2.5))


def test_a_sharded_checkpoint_is_refused_on_another_world_size(tmp_path, tiny_cfg):
    checkpoint.save(tmp_path, 0, {"box": ShardBox(1.0)})  # written by a job of 1 rank
    with pytest.raises(ConfigError, match=r"written by 1 rank\(s\).*this job has 2"):
        checkpoint.load(tmp_path, {"box": ShardBox(0.0)}, DistState(rank=0, world_size=2))
    from codraft.rundir import check_resumable

    (tmp_path / "config.toml").write_text("")
    fsdp = dataclasses.replace(tiny_cfg, dist=dataclasses.replace(tiny_cfg.dist, strategy="fsdp"))
    with pytest.raises(ConfigError, match=r"written by 1 rank\(s\).*this job has 2"):
        check_resumable(tmp_path, fsdp, world_size=2)


def test_an_unsharded_checkpoint_resumes_on_any_world_size_without_sharding(tmp_path):
    checkpoint.save(tmp_path, 0, {"plain": torch.nn.Linear(2, 2)})  # one process or DDP: rank 0 holds everything
    checkpoint.check_world_size(tmp_path, 4, sharded=False)
    with pytest.raises(ConfigError, match="this job has 2"):
        checkpoint.check_world_size(tmp_path, 2, sharded=True)  # an FSDP job cannot start from unsharded state


def _trainer(state: DistState, lora_rank: int, seed: int) -> DistributedTrainer:
    policy = wrap_policy(apply_lora(tiny_qwen3(seed), LoRAConfig(rank=lora_rank)), state, "fsdp")
    return DistributedTrainer(policy, CFG, state)


def _rank_main(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    state = start_rank(rank, world, port, "fsdp")
    finished = False
    try:
        results = {}
        batch, adv = global_batch()
        for lora_rank in (0, 4):
            where = f"{run_dir}/lora{lora_rank}"
            straight = _trainer(state, lora_rank, seed=0)
            run_step(straight, batch, adv)
            checkpoint.save(where, 0, {"trainer": straight}, dist=state)
            run_step(straight, batch, -adv)
            resumed = _trainer(state, lora_rank, seed=5)
            start = checkpoint.load(where, {"trainer": resumed}, state)
            run_step(resumed, batch, -adv)
            results[lora_rank] = {"start": start, "straight": full_state_dict(straight.policy, state), "resumed": full_state_dict(resumed.policy, state)}
        if state.is_main:
            torch.save(results, out)
        finished = True
    finally:
        end_rank(finished)


@pytest.mark.skipif(not has_fsdp2(), reason="no FSDP2 (fully_shard) in this torch")
def test_two_fsdp_ranks_resume_exactly(tmp_path):
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    for lora_rank, result in got.items():
        step_dir = tmp_path / "run" / f"lora{lora_rank}" / "checkpoints" / "step-000000"
        assert sorted(p.name for p in (step_dir / "trainer_dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
        assert result["start"] == 1
        assert result["straight"].keys() == result["resumed"].keys()
        for key, value in result["straight"].items():
            assert torch.equal(result["resumed"][key], value), (lora_rank, key)
        initial = tiny_qwen3(seed=0).state_dict()
        assert any(not torch.equal(value, initial[key]) for key, value in result["straight"].items())  # it trained
