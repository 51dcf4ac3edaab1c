"""The vLLM engine with its engine core in child processes (`VLLM_ENABLE_V1_MULTIPROCESSING=1`, as in
every torchrun job): every control works there as it does in process, and weight syncs leave nothing
behind.

Each scenario runs in a subprocess (this file run as a script: vLLM spawns, and functions sent to the
workers must be picklable by value), one engine each. Measured in `controls`: a k schedule change
takes effect (drafts only where k > 0, none with k = 0 everywhere, the drafter's forward not run while
it is off), a drafter swap changes acceptance and swapping back restores it exactly, a policy sync
sends bf16 bytes (half the fp32 file it used to be) and a sync in many chunks of whole layers gives
the same engine as one chunk. `sync_until_killed` is killed with SIGKILL in the middle of a sync.

    python tests/integration/test_multiprocess_engine.py controls OUT.json   # what the tests read
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

K = 3
HERE = Path(__file__).resolve()


def child(*args, **popen):
    from conftest import child_env  # the test process side (tests/ is on its path)

    env = child_env(VLLM_ENABLE_V1_MULTIPROCESSING="1")
    return subprocess.Popen([sys.executable, str(HERE), *args], env=env, text=True, **popen)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess") / "measured.json"
    proc = child("controls", str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(out.read_text())


def test_the_engine_core_runs_in_another_process_with_every_hook_applied(measured):
    (worker, engine_core), = measured["workers"]  # the worker's parent runs the engine core
    assert measured["trainer_pid"] not in (worker, engine_core)
    for hook in ("install_weight_transfer", "plain_sampling_without_drafts", "apply_rejection_fix", "set_k_table", "set_drafting"):
        assert measured["hooks"][hook], hook


def test_a_k_schedule_change_takes_effect_in_the_engine_core_process(measured):
    full, tail, off, again = (measured[k] for k in ("full", "tail", "off", "again"))
    assert full["drafts"] > 0 and full["draft_tokens"] == K * full["drafts"]
    assert 0 < tail["drafts"] < full["drafts"]  # 32 sequences start at k = 0; only the tail (<= 16 running) drafts
    assert off["drafts"] == 0 and off["tokens"] > 0 and not measured["off_drafting"]
    assert measured["off_drafter_forwards"] == [0]  # the drafter off in the worker process: not one forward
    assert again == full and measured["again_drafter_forwards"][0] > 0  # back on, the same drafts from the same seeds


def test_a_drafter_swap_reaches_the_workers_and_swapping_back_restores_acceptance(measured):
    full, swapped, restored = measured["full"], measured["swapped"], measured["restored"]
    assert swapped["accept_len"] < 1.1 < full["accept_len"]  # a random drafter is (almost) never accepted
    assert restored == full
    assert measured["swap_sync"]["chunks"] >= 1 and measured["swap_sync"]["bytes"] > 0


def test_a_policy_sync_sends_bf16_bytes_in_chunks_of_whole_layers(measured):
    numel, sync = measured["policy_numel"], measured["policy_sync"]
    assert 2 * numel <= sync["bytes"] < 2 * numel * 1.01  # bf16, plus the safetensors headers
    assert sync["bytes"] < 0.51 * measured["policy_fp32_bytes"]  # the fp32 file it replaces
    assert sync["chunks"] == 1  # the testbed is far below CHUNK_BYTES
    chunked = measured["chunked_sync"]
    assert chunked["chunks"] > 4 and 2 * numel <= chunked["bytes"] < 2 * numel * 1.05
    assert measured["perturbed_gap"] > 0.5  # the perturbed policy reached the engine...
    assert measured["perturbed_vs_hf"] < 0.1  # ...as the trainer's model (bf16 against fp32)
    assert measured["restored_gap"] < 1e-4  # and the original, sent in many chunks, came back whole


def test_sigkill_in_the_middle_of_a_sync_leaves_no_file_in_dev_shm():
    """The chunk in flight lives in an anonymous memory file: killed with it open, the process leaves
    no name anywhere (the old transport left /dev/shm/codraft-weights-*/weights.safetensors)."""
    shm = set(os.listdir("/dev/shm"))
    before = {n for n in shm if "codraft" in n}
    proc = child("sync_until_killed", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert any(line.strip() == "syncing" for line in proc.stdout), "the child ended before syncing"  # vLLM logs to stdout too
        in_flight = _wait_for_chunk_file(proc.pid, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert in_flight, "no sync caught with a chunk file open"
        assert {n for n in os.listdir("/dev/shm") if "codraft" in n} == before
    finally:
        with contextlib.suppress(ProcessLookupError):  # take the engine core and its worker down too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        time.sleep(1)
        _remove_orphans(shm)


def _wait_for_chunk_file(pid: int, timeout: float) -> str | None:
    """A chunk file of process `pid` once one is open (an anonymous one, or a named one in /dev/shm)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        named = [n for n in os.listdir("/dev/shm") if "codraft" in n]
        if named:
            return named[0]
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "codraft-weights" in link:
                    return link
        except FileNotFoundError:  # a descriptor closed while listed
            continue
        time.sleep(0.001)
    return None


def _remove_orphans(before: set[str]) -> None:
    """vLLM's shared memory (`psm_*`, `sem.mp-*`) that appeared since `before` and no process maps or
    holds open any more: what SIGKILL leaves of vLLM's own message queues."""
    in_use = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            in_use |= {line.split(None, 5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/" in line}
            in_use |= {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    for name in set(os.listdir("/dev/shm")) - before:
        if name.startswith(("psm_", "sem.mp-")) and not any(name in used for used in in_use):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/dev/shm/{name}")


# ------------------------------------------------------------------------------ the child's side
def _count_drafter_forwards(worker, reset: bool) -> int:
    model = worker.model_runner.drafter.model
    if reset:
        model._codraft_forwards = 0
        if not hasattr(model, "_codraft_hook"):
            model._codraft_hook = model.register_forward_hook(lambda m, args, out: setattr(m, "_codraft_forwards", m._codraft_forwards + 1))
    return model._codraft_forwards


def _testbed(kind: str):
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codraft.configfile import load_config
    from codraft.task import make_task
    from codraft.testbed import policy_source
    from conftest import TINY

    cfg = load_config("smoke", overrides=TINY)
    cfg = dataclasses.replace(cfg, drafter=dataclasses.replace(cfg.drafter, kind=kind, num_speculative_tokens=K, warmup_steps=60, batch_size=16))
    policy_dir = policy_source(cfg, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    train, held = make_task(cfg.task, cfg.task.seed).splits()
    encode = lambda rows: [tok(p, add_special_tokens=False).input_ids for p in rows["prompt"]]  # noqa: E731
    return cfg, policy_dir, tok, policy, encode(train), encode(held)


def _counts(gen) -> dict:
    acc = gen.acceptance
    return {"drafts": acc.drafts, "draft_tokens": acc.draft_tokens, "accepted": acc.accepted, "accept_len": acc.accept_len if acc.drafts else None, "tokens": gen.num_tokens}


def controls(out: str) -> None:
    import torch

    from codraft.batch import token_logprobs
    from codraft.engine import Sampling
    from codraft.engines import make_engine
    from codraft.warmstart import initial_drafter

    cfg, policy_dir, tok, policy, train, held = _testbed("eagle3")
    drafter, drafter_dir = initial_drafter(cfg, policy, train, policy_dir, tok.eos_token_id, tok.pad_token_id, log=lambda *a: None)
    top = cfg.rollout.max_num_seqs
    eng = make_engine(cfg, policy_dir, drafter, drafter_dir, [(1, top, K)])
    generate = lambda: _counts(eng.generate(held[:8], n=4, sampling=Sampling(1.0, 1.0, 40), seed=5))  # noqa: E731
    r = {"trainer_pid": os.getpid(), "workers": eng.llm.collective_rpc(lambda worker: (os.getpid(), os.getppid()))}
    r["full"] = generate()
    eng.set_k_schedule([(1, 16, K), (17, top, 0)])
    r["tail"] = generate()
    eng.set_k_schedule([(1, top, 0)])
    eng.llm.collective_rpc(_count_drafter_forwards, args=(True,))
    r["off"], r["off_drafting"] = generate(), eng.drafting
    r["off_drafter_forwards"] = eng.llm.collective_rpc(_count_drafter_forwards, args=(False,))
    eng.set_k_schedule([(1, top, K)])
    r["again"] = generate()
    r["again_drafter_forwards"] = eng.llm.collective_rpc(_count_drafter_forwards, args=(False,))

    serving = drafter.serving_weights()
    torch.manual_seed(0)
    eng.load_drafter_weights({n: (torch.randn_like(t.float()) * 0.02).to(t.dtype) if t.is_floating_point() else t for n, t in serving.items()})
    r["swapped"], r["swap_sync"] = generate(), eng.last_sync
    eng.load_drafter_weights(serving)
    r["restored"] = generate()

    ids = tok("Q: 4+5-3=? A: 4+5=9. 9-3=6. #### 6", add_special_tokens=False).input_ids
    before = torch.tensor(eng.prompt_logprobs(ids))
    original = {n: t.clone() for n, t in policy.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
        hf = token_logprobs(policy(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]))
    eng.load_policy_weights(policy.state_dict().items())
    r["policy_sync"] = eng.last_sync
    perturbed = torch.tensor(eng.prompt_logprobs(ids))
    r["perturbed_gap"], r["perturbed_vs_hf"] = float((perturbed - before).abs().max()), float((perturbed - hf).abs().max())
    r["policy_numel"] = sum(t.numel() for t in original.values())
    r["policy_fp32_bytes"] = sum(t.numel() * 4 for t in original.values())
    eng.chunk_bytes = 64 * 1024  # a few layers per chunk
    eng.load_policy_weights(original.items())
    r["chunked_sync"] = eng.last_sync
    r["restored_gap"] = float((torch.tensor(eng.prompt_logprobs(ids)) - before).abs().max())
    r["hooks"] = eng.hooks
    eng.close()
    Path(out).write_text(json.dumps(r))


def sync_until_killed() -> None:
    from codraft.vllm_engine import VLLMEngine

    cfg, policy_dir, _, policy, _, _ = _testbed("none")
    eng = VLLMEngine(cfg, policy_dir)
    eng.chunk_bytes = 16 * 1024  # many chunks: most of a sync has one open
    print("syncing", flush=True)
    while True:
        eng.load_policy_weights(policy.state_dict().items())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # tests/, for conftest's testbed
    {"controls": controls, "sync_until_killed": sync_until_killed}[sys.argv[1]](*sys.argv[2:])
