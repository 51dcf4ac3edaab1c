"""Bad inputs get one clear error naming the problem, and never lose or corrupt existing outputs.

Each case runs the real `codraft` entry point (or the function behind it) and checks the message
and, where an output directory is involved, that its files are untouched. The table in README.md
("Bad inputs") lists these cases."""
import json
from pathlib import Path

import pytest
import torch

from codraft.cli import main

DATA = Path(__file__).parent / "data"


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture
def existing_run(tmp_path):
    """An output directory holding another run's files, to check nothing is lost."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("[run]\nsteps = 3\n")
    (out / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 0.5}\n')
    return out


def snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


CASES = [
    (["--set", "grpo.lrr=1e-4"], "unknown config key 'grpo.lrr'; did you mean 'lr'"),
    (["--set", "rollout.group_size=eight"], "'rollout.group_size' expects int"),
    (["--set", "drafter.num_speculative_tokens=0"], "'drafter.num_speculative_tokens' must be >= 1"),
    (["--set", "grpo.lr=-1e-4"], "'grpo.lr' must be > 0"),
    (["--set", "rollout.group_size=1"], "'rollout.group_size' must be >= 2"),
    (["--set", "model.path=/nonexistent/qwen3"], "model.path: no such directory: /nonexistent/qwen3"),
    (["--set", "task.name=gsm8k", "--set", "task.args.path=/nonexistent/train.jsonl"], "GSM8K file not found"),
    (["--set", "task.name=arithmetic"], "unknown task 'arithmetic'; did you mean 'arith'"),
    (["--set", "drafter.kind=eagle"], "unknown drafter kind 'eagle'; did you mean 'eagle3'"),
    (["--set", "controller.policy=treshold"], "unknown refresh policy 'treshold'; did you mean 'threshold'"),
    (["--set", "controller.args.n=0", "--set", "controller.policy=every_n"], "controller.args.n"),
    (["--set", "drafter.k_schedule=1-8=3"], "drafter.k_schedule: cannot read '1-8=3'"),
    (["--set", "drafter.k_schedule=1-8:9"], "0 <= k <= drafter.num_speculative_tokens=3"),
    (["--set", "drafter.path=/nonexistent/drafter"], "drafter.path: no such directory"),
    (["--set", "model.head_dim=48"], "'model.head_dim' must be one of 32, 64"),
    (["--set", "controller.gate_margin=1.0"], "'controller.gate_margin' must be in [0, 1)"),
    (["--set", "controller.distill_lr=-1e-3"], "'controller.distill_lr' must be >= 0 (0 = drafter.lr)"),
    (["--preset", "defualt"], "unknown preset 'defualt'; did you mean 'default'"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_run_input_is_named_and_touches_nothing(args, message, existing_run, tmp_path, capsys):
    before = snapshot(existing_run)
    fresh = tmp_path / "fresh"
    code, err = run_cli(["run", "--out", str(fresh), *args], capsys)
    assert code == 2 and message in err, err
    assert not fresh.exists() or not any(fresh.iterdir())  # nothing written for a run that could not start
    assert snapshot(existing_run) == before


def test_output_dir_with_another_run_is_refused(existing_run, capsys):
    before = snapshot(existing_run)
    code, err = run_cli(["run", "--preset", "smoke", "--out", str(existing_run)], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert snapshot(existing_run) == before


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = run_cli(["run", "--preset", "smoke", "--out", str(blocker / "run")], capsys)
    assert code == 2 and "not writable" in err
    assert blocker.read_text() == "not a directory"


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    code, err = run_cli(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2 and f"--resume {tmp_path}: no run there" in err


def test_resume_refuses_config_changes(existing_run, capsys):
    from codraft.configfile import load_config, write_config

    write_config(load_config("smoke"), existing_run / "config.toml")
    before = snapshot(existing_run)
    code, err = run_cli(["run", "--resume", str(existing_run), "--set", "grpo.lr=1.0"], capsys)
    assert code == 2 and "--resume keeps the run's own config" in err
    assert snapshot(existing_run) == before


def test_config_file_errors(tmp_path, capsys):
    broken = tmp_path / "c.toml"
    broken.write_text("[grpo\nlr = 1")
    code, err = run_cli(["run", "--config", str(broken), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "is not valid TOML" in err
    code, err = run_cli(["run", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "config file not found" in err


@pytest.mark.parametrize("content, message", [
    ("", "holds no rows"),
    ('{"question": "q", "solution": "x"}\n', "lacks column(s) ['answer']"),
    ('{"question": "q", "answer": "no final number"}\n' * 4, "answer does not end in '#### <number>'"),
    ("{not json\n", "cannot read"),
])
def test_bad_dataset_files(content, message, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    code, err = run_cli(["run", "--out", str(tmp_path / "o"), "--set", "task.name=gsm8k", "--set", f"task.args.path={data}", "--set", "task.num_eval=1"], capsys)
    assert code == 2 and message in err, err


def test_checkpoint_dir_that_is_not_a_supported_model(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = run_cli(["run", "--out", str(tmp_path / "o"), "--set", f"model.path={model}"], capsys)
    assert code == 2 and "model_type 'gpt2'" in err and "not supported" in err
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    code, err = run_cli(["run", "--out", str(tmp_path / "o"), "--set", f"model.path={model}"], capsys)
    assert code == 2 and "holds no weights" in err


def test_corrupt_policy_weights(tmp_path):
    from codraft.build import load_policy
    from tests_helpers import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.path: cannot load the policy"):
        load_policy(model, "eager", torch.device("cpu"))


def test_prompt_longer_than_the_context():
    from codraft.config import ConfigError
    from codraft.prompts import check_prompt_lengths

    check_prompt_lengths([10, 20], max_len=64, max_new_tokens=32, split="training")
    with pytest.raises(ConfigError, match=r"training prompt 1 has 40 tokens; with rollout.max_new_tokens=32 it does not fit model.max_len=64"):
        check_prompt_lengths([10, 40], max_len=64, max_new_tokens=32, split="training")


def test_non_finite_distillation_loss_and_weights_never_reach_the_engine(tmp_path):
    from codraft.distill import DistillExample, distill
    from codraft.drafter import DRAFTERS, target_parts
    from tests_helpers import tiny_policy

    policy = tiny_policy()
    drafter = DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config())
    T, V, H = 6, policy.config.vocab_size, policy.config.hidden_size
    bad = DistillExample(torch.arange(T), torch.ones(T, dtype=torch.long), torch.full((T, 3 * H), float("nan")), None, torch.log_softmax(torch.randn(T, V), -1))
    with pytest.raises(FloatingPointError, match="distillation loss is nan"):
        distill(drafter, [bad], target_parts(policy), steps=2, k=2, loss="fkl", lr=1e-3, batch_size=1, vocab=V, autocast=False)
    with torch.no_grad():
        drafter.fc.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite values; refusing to write or serve it"):
        drafter.export(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_drafter_checkpoint_of_another_kind(tmp_path):
    from codraft.configfile import load_config
    from codraft.drafter import DRAFTERS, DrafterMismatch
    from codraft.warmstart import initial_drafter
    from tests_helpers import tiny_policy

    policy = tiny_policy()
    DRAFTERS.get("mtp").build(policy, DRAFTERS.get("mtp").Config()).export(tmp_path / "mtp")
    cfg = load_config("smoke", overrides=["drafter.kind=eagle3", f"drafter.path={tmp_path / 'mtp'}"])
    with pytest.raises(DrafterMismatch, match="holds a 'mtp' drafter but drafter.kind is 'eagle3'"):
        initial_drafter(cfg, policy, [], tmp_path, 0, 0)
