"""Checkpoints and atomic outputs: versioned checkpoint directories behind an atomically replaced
`latest` pointer, a crash mid-save that leaves the previous checkpoint in force, an atomic
directory replacement during which the directory never goes missing, and `--resume` of a run that
has no checkpoint refused with what is missing (it used to restart silently at step 0)."""
import os
from pathlib import Path

import pytest
import torch

from codraft import checkpoint
from codraft.io import atomic_dir, exchange_paths


class Box:
    """A stateful component holding one tensor."""

    def __init__(self, value: float):
        self.value = torch.tensor(value)

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"]


class Exploding:
    def state_dict(self):
        raise RuntimeError("killed mid-save")

    def load_state_dict(self, state):
        pass


def test_latest_names_the_newest_complete_checkpoint_and_old_ones_are_pruned(tmp_path):
    for step in range(4):
        checkpoint.save(tmp_path, step, {"box": Box(float(step))}, keep=2)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    box = Box(-1.0)
    assert checkpoint.load(tmp_path, {"box": box}) == 4 and box.value.item() == 3.0


def test_a_crash_while_saving_leaves_the_previous_checkpoint_in_force(tmp_path):
    checkpoint.save(tmp_path, 0, {"box": Box(7.0)})
    with pytest.raises(RuntimeError, match="killed mid-save"):
        checkpoint.save(tmp_path, 1, {"box": Box(8.0), "other": Exploding()})
    assert checkpoint.last_step(tmp_path) == 0
    box = Box(-1.0)
    assert checkpoint.load(tmp_path, {"box": box}) == 1 and box.value.item() == 7.0
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_no_checkpoint_means_step_zero(tmp_path):
    assert checkpoint.last_step(tmp_path) == -1 and checkpoint.load(tmp_path, {"box": Box(0.0)}) == 0


@pytest.mark.skipif(os.name != "posix", reason="POSIX only")
def test_atomic_dir_replaces_a_directory_without_an_instant_where_it_is_missing(tmp_path, monkeypatch):
    target = tmp_path / "policy"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not exchange_paths(probe_a, probe_b):
        pytest.skip("this file system has no atomic exchange (renameat2)")
    real_replace = os.replace

    def replace(src, dst):
        assert Path(src) != target, "the directory was renamed away: there was an instant without it"
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_resume_of_a_run_without_a_checkpoint_is_refused(tmp_path, capsys):
    from codraft.cli import main
    from codraft.configfile import load_config, write_config

    run = tmp_path / "run"
    run.mkdir()
    write_config(load_config("smoke"), run / "config.toml")
    (run / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 0.5}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint there" in err and "checkpoints/latest" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing appended, nothing lost


def test_extending_a_finished_cosine_run_is_refused_untouched(tmp_path, capsys):
    """Its learning rate reached 0 at the last step and a resume continues from there: the added steps
    trained nothing, silently (train/lr 0.0 from step 30 of a 30-step run resumed with run.steps=60)."""
    from codraft.cli import main
    from codraft.configfile import load_config, write_config
    from codraft.rundir import check_resumable

    run = tmp_path / "run"
    run.mkdir()
    write_config(load_config("smoke", overrides=["grpo.lr_decay=cosine", "run.steps=4"]), run / "config.toml")
    for step in range(4):
        checkpoint.save(run, step, {"box": Box(float(step))})
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "reward/mean": 0.5}}\n' for s in range(4)) + '{"step": 4, "final": true}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["run", "--resume", str(run), "--set", "run.steps=8"]) == 2
    err = capsys.readouterr().err
    assert "cosine learning rate" in err and "reached 0" in err and "4 added steps would not train" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.toml still says 4 steps

    constant = load_config("smoke", overrides=["run.steps=8"])  # a constant rate: the extension trains
    write_config(load_config("smoke", overrides=["run.steps=4"]), run / "config.toml")
    check_resumable(run, constant)
    cut = load_config("smoke", overrides=["grpo.lr_decay=cosine", "run.steps=8"])  # killed before its last step: the rate is continued, not 0
    write_config(load_config("smoke", overrides=["grpo.lr_decay=cosine", "run.steps=6"]), run / "config.toml")
    check_resumable(run, cut)
