"""Unit tests of analysis/: run summaries from counts, sweep expansion / resumption / tables, plots
and the HTML report, all on synthetic run directories (nothing is trained or served).

    pytest tests/test_analysis.py
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import plots
from analysis.report import build_report, is_sweep_dir
from analysis.runs import accept_len_series, decision_steps, find_run_dirs, is_finished, load_run, summarize, summary_row, varying_keys
from analysis.stats import HYBRID_METRICS, METRICS, mean_curve, metrics_for, paired_interval, t_interval
from analysis.sweep import Grid, expand, parse_grid, read_grid, run_command, run_sweep, validate_runs, write_results
from analysis.tables import hardware_note
from codraft.config import ConfigError
from codraft.configfile import load_config, write_config
from codraft.io import append_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WEIGHTS = (0.5, 0.3, 0.2)  # how a step's accepted tokens split over draft positions 0..2


def step_record(step: int, drafts: int, accepted: int, decision: str = "keep", reward: float = 0.3, eval_acc: float | None = None,
                gen_s: float = 2.0, distill_s: float = 0.0, swap_s: float = 0.0, k: int = 3) -> dict:
    """One plausible metrics.jsonl line, acceptance fields consistent with the counts."""
    pos = [int(accepted * w) for w in WEIGHTS]
    pos[-1] = accepted - sum(pos[:-1])
    times = {"prepare": 0.1, "gen": gen_s, "reward": 0.05, "logprob": 0.5, "train": 1.0}
    if decision in ("swap", "refuse"):
        times["distill"] = distill_s
    if decision == "swap":
        times["swap"] = swap_s
    rec = {"step": step, "reward/mean": reward, "reward/accuracy": reward * 0.8, **{f"time/{s}_s": v for s, v in times.items()},
           "time/step_s": sum(times.values()), "gen/tokens": 4000, "gen/mean_len": 250.0, "gen/max_len": 256,
           "spec/drafts": drafts, "spec/draft_tokens": drafts * k, "spec/accepted": accepted,
           "spec/accept_len": 1 + accepted / drafts, "spec/accept_rate": accepted / (drafts * k), "spec/k_schedule": "1-256:3",
           "controller/decision": decision, "controller/reason": "synthetic", "drafter/version": 0, "train/loss": 0.1, "train/entropy": 1.2}
    for i, c in enumerate(pos):
        rec[f"spec/accepted_pos_{i}"] = c
        rec[f"spec/accept_pos_{i}"] = c / drafts
    if eval_acc is not None:
        rec.update({"eval/accuracy": eval_acc, "time/eval_s": 1.5})
    return rec


def write_run(run_dir: Path, overrides: list[str], records: list[dict], final: dict | None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(load_config("smoke", overrides=[*overrides, f"output.dir={run_dir.name}"]), run_dir / "config.toml")
    for rec in records + ([{"step": len(records), "final": True, **final}] if final else []):
        append_jsonl(run_dir / "metrics.jsonl", rec)
    for r in records:
        append_jsonl(run_dir / "samples.jsonl", {"step": r["step"], "prompt": "1+1", "completion": "2 #### 2", "reward": 1.0, "correct": True})
    return run_dir


def synthetic_run(run_dir: Path, policy: str, seed: int, steps: int = 8, finished: bool = True, kind: str = "eagle3") -> Path:
    """Acceptance decays by ~0.1 per step since the last swap; `every_n` swaps every 2 steps,
    `threshold` refuses once (step 2) and swaps once (step 4), `never` keeps."""
    swaps = {"never": set(), "every_n": {1, 3, 5, 7}, "threshold": {4}}[policy]
    refusals = {2} if policy == "threshold" else set()
    records, since = [], 0
    for s in range(steps):
        drafts = 100 + 10 * seed
        accepted = int(drafts * (1.4 - (0.1 + 0.01 * seed) * since))
        decision = "swap" if s in swaps else "refuse" if s in refusals else "keep"
        rec = step_record(s, drafts, accepted, decision, reward=0.2 + 0.05 * s, eval_acc=0.3 + 0.02 * s if s % 3 == 0 else None,
                          distill_s=4.0, swap_s=0.5)
        if kind == "none":
            rec = {k: v for k, v in rec.items() if not k.startswith(("spec/", "controller/", "drafter/"))}
        records.append(rec)
        since = 0 if decision == "swap" else since + 1
    overrides = [f"controller.policy={policy}", f"drafter.kind={kind}", f"run.seed={seed}", f"run.steps={steps}"]
    return write_run(run_dir, overrides, records, {"eval/accuracy": 0.5, "time/eval_s": 1.5} if finished else None)


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """Four finished runs: never, every_n, and threshold with two seeds."""
    root = tmp_path / "sweep"
    for policy, seed in (("never", 0), ("every_n", 0), ("threshold", 0), ("threshold", 1)):
        synthetic_run(root / f"policy-{policy}__seed-{seed}", policy, seed)
    return root


@pytest.fixture
def bench_json(tmp_path: Path) -> Path:
    cells = [{"target": "testbed", "kind": "none", "k": 0, "batch": b, "seconds": 1.0, "tokens": 48 * b, "accept_len": math.nan,
              "c_ratio": math.nan, "speedup": math.nan, "predicted": math.nan} for b in (1, 4, 16, 64)]
    cells += [{"target": "testbed", "kind": kind, "k": k, "batch": b, "seconds": 1.0, "tokens": 48 * b, "accept_len": 2.0,
               "c_ratio": 0.3, "speedup": 1.6 - 0.01 * b - 0.1 * k, "predicted": 1.5} for kind in ("eagle3", "mtp") for k in (1, 3) for b in (1, 4, 16, 64)]
    path = tmp_path / "bench_rollout.json"
    path.write_text(json.dumps([{"name": "testbed", "parameters": 25_000_000, "cells": cells, "grpo": {}}]))
    return path


# ---------------------------------------------------------------------------------- runs


def test_summary_from_counts_hand_computed(tmp_path):
    records = [
        step_record(0, drafts=100, accepted=150, eval_acc=0.25, reward=0.1),
        step_record(1, drafts=100, accepted=120, decision="refuse", distill_s=3.0, reward=0.2),
        step_record(2, drafts=200, accepted=180, decision="swap", distill_s=5.0, swap_s=0.5, reward=0.3),
        step_record(3, drafts=100, accepted=80, reward=0.4),
    ]
    run = load_run(write_run(tmp_path / "r", ["controller.policy=threshold", "drafter.kind=eagle3"], records, {"eval/accuracy": 0.75, "time/eval_s": 2.0}))
    s = summarize(run)
    assert run.finished and s.steps == 4 and run.samples == 4
    assert s.accept_total.drafts == 500 and s.accept_total.accepted == 530
    # mean from counts, 1 + 530/500, not the mean of the per-step ratios (2.1)
    assert s.accept_len_mean == pytest.approx(2.06)
    assert s.accept_len_first == pytest.approx(2.5) and s.accept_len_last == pytest.approx(1.8)
    assert s.accept_rate == pytest.approx(530 / 1500)
    assert s.pos_rates[0] == pytest.approx((75 + 60 + 90 + 40) / 500)
    assert (s.swaps, s.refusals) == (1, 1)
    assert s.distill_swap_s == pytest.approx(3.0 + 5.0 + 0.5)
    assert s.gen_s == pytest.approx(8.0)
    assert s.step_s == pytest.approx(4 * 3.65 + 8.5)
    assert s.wall_s == pytest.approx(s.step_s + 1.5 + 2.0)  # the step-0 evaluation and the final one
    assert s.mean_stage_s["distill"] == pytest.approx(8.0 / 4)
    assert sum(s.stage_shares.values()) == pytest.approx(1.0)
    assert s.stage_shares["gen"] == pytest.approx(8.0 / s.step_s)
    assert (s.eval_first, s.eval_last) == (0.25, 0.75)
    assert (s.reward_first, s.reward_last) == (pytest.approx(0.1), pytest.approx(0.4))
    assert accept_len_series(run) == ([0, 1, 2, 3], [2.5, 2.2, 1.9, 1.8])
    assert decision_steps(run, "swap") == [2] and decision_steps(run, "refuse") == [1]
    assert run.config_value("controller.policy") == "threshold"


def test_hybrid_runs_compare_the_mix_with_each_source_alone(tmp_path):
    """A hybrid run's per-source `alone` acceptance sums over steps weighted by each step's drafts
    (as the run's own acceptance is), and the sweep tables gain the mix-minus-source columns."""
    records = [step_record(0, drafts=100, accepted=200), step_record(1, drafts=300, accepted=300)]
    records[0].update({"spec/learned/alone_accept_len": 2.5, "spec/suffix/alone_accept_len": 1.5})
    records[1].update({"spec/learned/alone_accept_len": 1.8, "spec/suffix/alone_accept_len": 2.2})
    s = summarize(load_run(write_run(tmp_path / "h", ["drafter.kind=hybrid"], records, {"eval/accuracy": 0.5})))
    assert s.accept_len_mean == pytest.approx(1 + 500 / 400)
    assert s.alone_accept_len("learned") == pytest.approx(1 + (150 + 240) / 400)  # not the mean of 2.5 and 1.8
    assert s.alone_accept_len("suffix") == pytest.approx(1 + (50 + 360) / 400)
    row = summary_row(s)
    assert row["mix_minus_learned_alone"] == pytest.approx(0.275) and row["mix_minus_suffix_alone"] == pytest.approx(0.225)
    plain = summary_row(summarize(load_run(write_run(tmp_path / "e", ["drafter.kind=eagle3"], [step_record(0, 100, 150)], None))))
    assert math.isnan(plain["learned_alone_accept_len"]) and math.isnan(plain["mix_minus_suffix_alone"])
    assert metrics_for([plain]) == METRICS and metrics_for([plain, row]) == METRICS + HYBRID_METRICS


def test_unfinished_and_plain_runs(tmp_path):
    run = load_run(synthetic_run(tmp_path / "a", "never", 0, steps=3, finished=False))
    assert not run.finished and not is_finished(run.path) and len(run.steps) == 3
    plain = summarize(load_run(synthetic_run(tmp_path / "b", "never", 0, steps=3, kind="none")))
    assert plain.accept_total.drafts == 0 and math.isnan(plain.accept_len_mean) and plain.swaps == 0
    assert find_run_dirs(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert varying_keys([load_run(tmp_path / "a"), load_run(tmp_path / "b")]) == ["drafter.kind"]
    # a section only one run's config holds (written by a newer codraft) is not a difference
    import tomllib

    import tomli_w

    older = tmp_path / "a" / "config.toml"
    data = tomllib.loads(older.read_text())
    del data["lora"]
    older.write_text(tomli_w.dumps(data))
    assert varying_keys([load_run(tmp_path / "a"), load_run(tmp_path / "b")]) == ["drafter.kind"]


# ---------------------------------------------------------------------------------- sweep grid

GRID_TOML = """
preset = "smoke"
[base]
"run.steps" = 3
[grid]
"controller.policy" = ["never", "every_n"]
"drafter.num_speculative_tokens" = [2, 3]
"run.seed" = [0, 1]
"""


def test_grid_expansion_and_names(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(GRID_TOML)
    grid = read_grid(path)
    runs = expand(grid)
    assert len(runs) == 8 and grid.preset == "smoke"
    assert [r.name for r in runs[:3]] == ["policy-never__k-2__seed-0", "policy-never__k-2__seed-1", "policy-never__k-3__seed-0"]
    assert runs[-1].name == "policy-every_n__k-3__seed-1"
    assert runs[0].overrides == ("run.steps=3", 'controller.policy="never"', "drafter.num_speculative_tokens=2", "run.seed=0")
    cfg = load_config(grid.preset, overrides=list(runs[-1].overrides))
    assert (cfg.controller.policy, cfg.drafter.num_speculative_tokens, cfg.run.seed, cfg.run.steps) == ("every_n", 3, 1, 3)
    # nested tables mean the same as quoted dotted keys; a --base-preset wins over the file's preset
    nested = parse_grid({"preset": "smoke", "grid": {"controller": {"policy": ["never"], "args": {"n": [1, 2]}}, "run": {"seed": [0]}}}, preset="default")
    assert nested.preset == "default" and nested.keys == ["controller.policy", "controller.args.n", "run.seed"]
    assert [r.name for r in expand(nested)] == ["policy-never__n-1__seed-0", "policy-never__n-2__seed-0"]
    # colliding short names keep the full key
    both = parse_grid({"grid": {"run.seed": [0], "task.seed": [1]}})
    assert [r.name for r in expand(both)] == ["run-seed-0__task-seed-1"]
    cmd = run_command(runs[0], tmp_path / runs[0].name, "smoke")
    assert cmd[:6] == [sys.executable, "-m", "codraft", "run", "--preset", "smoke"] and cmd[-2:] == ["--out", str(tmp_path / runs[0].name)]
    assert cmd.count("--set") == 4


def test_bad_grid_key_is_refused_before_any_run(tmp_path):
    calls = []
    fake = lambda run, run_dir, preset: calls.append(run.name) or 0  # noqa: E731
    bad_key = Grid((("controller.policy", ("never",)), ("drafter.kinds", ("mtp",))), preset="smoke")
    with pytest.raises(ConfigError, match=r"drafter\.kinds.*did you mean 'kind'"):
        run_sweep(bad_key, tmp_path / "s", runner=fake)
    bad_value = Grid((("run.seed", (0, 1)), ("rollout.group_size", (4, 1))), preset="smoke")
    with pytest.raises(ConfigError, match=r"run 'seed-0__group_size-1'.*rollout\.group_size"):
        run_sweep(bad_value, tmp_path / "s", runner=fake)
    bad_policy = Grid((("controller.policy", ("never", "evry_n")),), preset="smoke")
    with pytest.raises(ConfigError, match=r"evry_n.*every_n"):
        run_sweep(bad_policy, tmp_path / "s", runner=fake)
    assert calls == [] and not (tmp_path / "s" / "sweep.json").exists()
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_grid({"grid": {"run.seed": 3}})
    with pytest.raises(ConfigError, match="unknown top-level"):
        parse_grid({"grid": {"run.seed": [3]}, "bases": {}})


def test_cli_reports_bad_key(tmp_path, capsys):
    from codraft.cli import main

    path = tmp_path / "bad.toml"
    path.write_text('[grid]\n"controller.polcy" = ["never"]\n')
    assert main(["sweep", "--grid", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 2
    assert "controller.polcy" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- resumption


def fake_runner(calls: list[str], fail: set[str] = frozenset()):
    """Stands in for `codraft run`: writes a synthetic run (finished unless its name is in `fail`)."""
    def run(sweep_run, run_dir: Path, preset: str) -> int:
        calls.append(sweep_run.name)
        values = dict(sweep_run.values)
        synthetic_run(run_dir, values["controller.policy"], values["run.seed"], steps=6, finished=sweep_run.name not in fail)
        return 1 if sweep_run.name in fail else 0
    return run


def test_resume_skips_finished_and_moves_incomplete_aside(tmp_path):
    out = tmp_path / "s"
    grid = parse_grid({"preset": "smoke", "base": {"drafter": {"kind": "eagle3"}}, "grid": {"controller.policy": ["never", "threshold", "every_n"], "run.seed": [0]}})
    a, b, c = (r.name for r in expand(grid))
    synthetic_run(out / a, "never", 0, steps=4)  # finished earlier
    synthetic_run(out / b, "threshold", 0, steps=2, finished=False)  # killed mid-run
    finished_before = (out / a / "metrics.jsonl").read_text()
    killed = (out / b / "metrics.jsonl").read_text()

    calls: list[str] = []
    entries = run_sweep(grid, out, runner=fake_runner(calls), log=lambda *_: None)
    assert calls == [b, c]
    assert (out / a / "metrics.jsonl").read_text() == finished_before
    assert (out / f"{b}.incomplete-1" / "metrics.jsonl").read_text() == killed  # moved aside, not deleted
    assert is_finished(out / b) and is_finished(out / c)
    assert [e["status"] for e in entries] == ["done"] * 3 and entries[1]["moved_aside"] == f"{b}.incomplete-1"
    state = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["done"] * 3 and state["grid"]["grid"]["controller.policy"] == ["never", "threshold", "every_n"]

    calls.clear()
    run_sweep(grid, out, runner=fake_runner(calls), log=lambda *_: None)
    assert calls == []  # everything finished: nothing reruns

    shutil.rmtree(out / c)
    (out / b / "metrics.jsonl").write_text(killed)  # b killed again: a second copy goes aside
    entries = run_sweep(grid, out, runner=fake_runner(calls, fail={c}), log=lambda *_: None)
    assert calls == [b, c]
    assert (out / f"{b}.incomplete-1").is_dir() and (out / f"{b}.incomplete-2" / "metrics.jsonl").read_text() == killed
    assert [e["status"] for e in entries] == ["done", "done", "failed"] and entries[2]["returncode"] == 1
    assert {p.name for p in find_run_dirs(out)} == {a, b, c}  # moved-aside copies are not runs of the sweep


def test_subprocess_runner_logs_output(tmp_path, monkeypatch):
    import analysis.sweep as sweep

    run = expand(parse_grid({"grid": {"run.seed": [0]}}))[0]
    script = "import sys; print('step 1 of 2'); sys.exit(3)"
    monkeypatch.setattr(sweep, "run_command", lambda *_: [sys.executable, "-c", script])
    assert sweep.subprocess_runner(run, tmp_path / run.name, "smoke") == 3
    assert "step 1 of 2" in (tmp_path / run.name / "run.log").read_text()


def test_results_tables(tmp_path):
    out = tmp_path / "s"
    grid = parse_grid({"preset": "smoke", "base": {"drafter.kind": "eagle3"}, "grid": {"controller.policy": ["never", "threshold"], "run.seed": [0, 1]}})
    run_sweep(grid, out, runner=fake_runner([]), log=lambda *_: None)
    runs = read_csv(out / "runs.csv")  # one row per run
    assert [r["name"] for r in runs] == [r.name for r in expand(grid)]
    assert {"controller.policy", "run.seed", "drafts", "accepted", "accept_len_mean", "swaps", "gen_s_per_step", "wall_s"} <= set(runs[0])
    for row in runs:
        s = summarize(load_run(out / row["name"]))
        assert float(row["accept_len_mean"]) == pytest.approx(s.accept_len_mean)
        assert int(row["drafts"]) == s.accept_total.drafts and int(row["swaps"]) == s.swaps
    confs = read_csv(out / "results.csv")  # one row per configuration
    assert [(r["controller.policy"], r["n_seeds"]) for r in confs] == [("never", "2"), ("threshold", "2")]
    assert "run.seed" not in confs[0] and "baseline" not in confs[0] and "n_pairs" not in confs[0]  # no baseline named
    md = (out / "results.md").read_text()
    assert "4 of 4 runs have results" in md and "## Per configuration: mean [95% Student-t interval] over seeds" in md
    assert "Seeds: 2 per configuration (run.seed = 0, 1)" in md and "scipy.stats.t" in md and "## Per run" in md
    assert "Hardware: not recorded" in md  # the synthetic runs wrote no hardware.json
    group_lines = [line for line in md.splitlines() if line.startswith("| threshold |")]
    assert len(group_lines) == 1 and group_lines[0].startswith("| threshold | 2 | 2 seeds | ")  # two seeds in the group
    # threshold: one swap and one refusal per seed -> mean 1 with a zero-width interval
    assert "| 1 [1, 1] | 1 [1, 1] |" in group_lines[0]
    means = [summarize(load_run(out / r.name)).accept_len_mean for r in expand(grid) if dict(r.values)["controller.policy"] == "threshold"]
    assert group_lines[0].split(" | ")[3].startswith(f"{sum(means) / 2:.3g} [")

    (out / "results.md").unlink()
    from codraft.cli import main

    grid_file = tmp_path / "g.toml"
    grid_file.write_text('preset = "smoke"\n[base]\n"drafter.kind" = "eagle3"\n[grid]\n"controller.policy" = ["never", "threshold"]\n"run.seed" = [0, 1]\n')
    assert main(["sweep", "--grid", str(grid_file), "--out", str(out), "--table-only"]) == 0
    assert (out / "results.md").read_text().count("\n") == md.count("\n")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dry_run_writes_nothing(tmp_path, capsys):
    from codraft.cli import main

    grid_file = tmp_path / "g.toml"
    grid_file.write_text(GRID_TOML)
    assert main(["sweep", "--grid", str(grid_file), "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "8 runs" in text and "policy-every_n__k-3__seed-1" in text and "--preset smoke" in text
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------- seeds and intervals

T975_DF3 = 3.182446305284263  # Student t, 97.5% quantile, 3 degrees of freedom (printed tables: 3.182)
T975_DF2 = 4.302652729911275  # ... 2 degrees of freedom (tables: 4.303)


def test_t_interval_of_known_values():
    iv = t_interval([2.0, 2.4, 2.2, 2.6])
    sd = math.sqrt((0.3**2 + 0.1**2 + 0.1**2 + 0.3**2) / 3)  # sample standard deviation, n - 1 = 3
    half = T975_DF3 * sd / math.sqrt(4)
    assert (iv.mean, iv.n) == (pytest.approx(2.3), 4)
    assert iv.low == pytest.approx(2.3 - half, abs=1e-9) and iv.high == pytest.approx(2.3 + half, abs=1e-9)
    assert half == pytest.approx(0.410852, abs=1e-6)
    assert iv.text() == "2.3 [1.89, 2.71]"
    skipped = t_interval([2.0, None, 2.4, math.nan, "x", 2.2, 2.6, True])  # only finite numbers count
    assert skipped == iv
    one = t_interval([1.5])
    assert one.mean == 1.5 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high) and one.text() == "1.5"
    none = t_interval([])
    assert none.n == 0 and math.isnan(none.mean) and none.text() == "–"
    same = t_interval([3, 3, 3])
    assert (same.low, same.mean, same.high) == (3, 3, 3)
    assert t_interval([2.0, 2.4, 2.2]).text(runs=4) == "2.2 [1.7, 2.7] (n=3)"  # a figure only 3 of 4 seeds had


def test_paired_interval_over_common_seeds():
    a = {0: 2.0, 1: 2.5, 2: 3.0, 3: 9.9}  # seed 3: the baseline did not finish it, so it is not paired
    b = {0: 1.0, 1: 1.7, 2: 1.8, 4: 0.0}
    d = paired_interval(a, b)  # differences 1.0, 0.8, 1.2: mean 1.0, s = 0.2
    half = T975_DF2 * 0.2 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert (d.low, d.high) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    # pairing by seed removes what the seeds share: the unpaired intervals overlap, the paired one excludes 0
    assert t_interval(a[s] for s in (0, 1, 2)).low < t_interval(b[s] for s in (0, 1, 2)).high and d.low > 0
    assert paired_interval({0: 1.0}, {1: 1.0}).n == 0


def test_mean_curve_per_step_over_the_seeds_that_have_it():
    steps, band = mean_curve([([0, 1, 2], [1.0, 2.0, 3.0]), ([0, 1], [3.0, 4.0]), ([0, 1, 2, 3], [2.0, 3.0, 3.0, 5.0])])
    assert steps == [0, 1, 2, 3] and [iv.n for iv in band] == [3, 3, 2, 1]
    assert band[0] == t_interval([1.0, 3.0, 2.0]) and band[2].mean == 3.0 and band[2].low == band[2].high == 3.0
    assert band[3].mean == 5.0 and math.isnan(band[3].low)  # one seed reached step 3: no band there


def seeded_grid(**extra) -> dict:
    return {"preset": "smoke", "base": {"drafter.kind": "eagle3"}, "grid": {"controller.policy": ["never", "every_n", "threshold"]}, **extra}


def test_seeds_and_baseline_in_the_grid_file(tmp_path):
    grid = parse_grid(seeded_grid(seeds=[0, 1, 2], baseline={"controller.policy": "every_n"}))
    as_axis = parse_grid(seeded_grid() | {"grid": {"controller.policy": ["never", "every_n", "threshold"], "run.seed": [0, 1, 2]}})
    assert expand(grid) == expand(as_axis)  # `seeds` is a run.seed axis, swept last
    assert [r.name for r in expand(grid)][:4] == ["policy-never__seed-0", "policy-never__seed-1", "policy-never__seed-2", "policy-every_n__seed-0"]
    assert grid.config_keys == ["controller.policy"] and grid.baseline == (("controller.policy", "every_n"),)
    assert grid.as_dict()["baseline"] == {"controller.policy": "every_n"}
    path = tmp_path / "g.toml"  # the grid file form, baseline as an inline table
    path.write_text('preset = "smoke"\nseeds = [0, 1]\nbaseline = { "controller.policy" = "never" }\n[grid]\n"controller.policy" = ["never", "every_n"]\n')
    assert read_grid(path).keys == ["controller.policy", "run.seed"] and dict(read_grid(path).baseline) == {"controller.policy": "never"}
    policies = read_grid(Path(__file__).resolve().parent.parent / "analysis" / "grids" / "policies.toml")
    assert dict(policies.axes)["run.seed"] == (0, 1, 2) and dict(policies.baseline) == {"controller.policy": "every_n"}


GRIDS = sorted((Path(__file__).resolve().parent.parent / "analysis" / "grids").glob("*.toml"))


@pytest.mark.parametrize("path", GRIDS, ids=[g.stem for g in GRIDS])
def test_every_shipped_grid_validates(path):
    """Each grid under analysis/grids resolves every run's config (what `codraft sweep` checks before it starts)."""
    grid = read_grid(path)
    runs = expand(grid)
    validate_runs(grid, runs)
    assert runs and f"--grid analysis/grids/{path.name}" in path.read_text()  # its header names the command that runs it


def test_seeds_clash_and_bad_baselines_are_refused():
    with pytest.raises(ConfigError, match=r"seed is given twice.*'seeds'.*\[grid\] 'run\.seed'"):
        parse_grid(seeded_grid(seeds=[0, 1]) | {"grid": {"controller.policy": ["never"], "run.seed": [0, 1]}})
    with pytest.raises(ConfigError, match=r"seed is given twice.*\[base\] 'run\.seed'"):
        parse_grid(seeded_grid(seeds=[0, 1]) | {"base": {"run.seed": 3}})
    for bad in ([], [0, "1"], 3, [True]):
        with pytest.raises(ConfigError, match="'seeds' must be a non-empty list of integers"):
            parse_grid(seeded_grid(seeds=bad))
    two_axes = seeded_grid(seeds=[0]) | {"grid": {"controller.policy": ["never", "every_n"], "drafter.num_speculative_tokens": [2, 3]}}
    keys = r"'controller\.policy' in \['never', 'every_n'\]; 'drafter\.num_speculative_tokens' in \[2, 3\]"
    with pytest.raises(ConfigError, match=r"baseline controller\.policy=every_n matches 2 configurations, not one; .*" + keys):
        parse_grid(two_axes | {"baseline": {"controller.policy": "every_n"}})
    with pytest.raises(ConfigError, match=r"baseline controller\.policy=drift, drafter\.num_speculative_tokens=3 matches no configuration; .*" + keys):
        parse_grid(two_axes | {"baseline": {"controller.policy": "drift", "drafter.num_speculative_tokens": 3}})
    with pytest.raises(ConfigError, match=r"matches no configuration \('run\.steps' not swept in \[grid\]\)"):
        parse_grid(two_axes | {"baseline": {"controller.policy": "never", "drafter.num_speculative_tokens": 3, "run.steps": 5}})
    with pytest.raises(ConfigError, match=r"matches no configuration"):  # 2 is an integer, "2" is not
        parse_grid(two_axes | {"baseline": {"controller.policy": "never", "drafter.num_speculative_tokens": "2"}})
    with pytest.raises(ConfigError, match=r"not a seed: drop 'run\.seed'"):
        parse_grid(two_axes | {"baseline": {"controller.policy": "never", "drafter.num_speculative_tokens": 2, "run.seed": 0}})
    with pytest.raises(ConfigError, match="'baseline' must be a table"):
        parse_grid(seeded_grid(baseline="every_n"))
    ok = parse_grid(two_axes | {"baseline": {"controller": {"policy": "never"}, "drafter.num_speculative_tokens": 2}})  # nested tables too
    assert dict(ok.baseline) == {"controller.policy": "never", "drafter.num_speculative_tokens": 2}


HARDWARE = {"cpu": "AMD EPYC 7B13", "cores": 2, "isa": ["avx2"], "accelerator": None, "torch": "2.9.0", "vllm": "0.32.0",
            "engine_mode": "eager", "openmp": "gnu (libgomp)"}


def test_results_per_configuration_with_paired_differences(tmp_path):
    out = tmp_path / "s"
    grid = parse_grid(seeded_grid(seeds=[0, 1, 2], baseline={"controller.policy": "every_n"}))
    run_sweep(grid, out, runner=fake_runner([], fail={"policy-threshold__seed-2"}), log=lambda *_: None)
    for run in expand(grid):
        (out / run.name / "hardware.json").write_text(json.dumps(HARDWARE))
    write_results(out, grid)
    per_run = {(r.values[0][1], r.values[1][1]): summarize(load_run(out / r.name)) for r in expand(grid)}
    confs = {r["controller.policy"]: r for r in read_csv(out / "results.csv")}
    assert list(confs) == ["never", "every_n", "threshold"] and len(read_csv(out / "runs.csv")) == 9
    assert [confs[p]["n_seeds"] for p in confs] == ["3", "3", "2"]  # threshold's seed 2 did not finish
    assert confs["threshold"]["note"] == "2 seeds (1 unfinished)" and json.loads(confs["threshold"]["seeds"]) == [0, 1]
    for policy, row in confs.items():
        seeds = [0, 1] if policy == "threshold" else [0, 1, 2]
        values = [per_run[policy, s].accept_len_mean for s in seeds]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        half = {3: T975_DF2, 2: 12.706204736174698}[len(values)] * sd / math.sqrt(len(values))
        assert float(row["accept_len_mean_mean"]) == pytest.approx(mean)
        assert float(row["accept_len_mean_ci95_low"]) == pytest.approx(mean - half)
        assert float(row["accept_len_mean_ci95_high"]) == pytest.approx(mean + half)
        assert {f"{m}_{part}" for m in METRICS for part in ("mean", "ci95_low", "ci95_high")} <= set(row)
    assert "reward_last_mean" in confs["never"] and "train_s_per_step_ci95_high" in confs["never"]
    # paired differences against every_n, per seed, over the seeds both finished
    assert confs["every_n"]["baseline"] == "True" and confs["every_n"]["n_pairs"] == "" and confs["every_n"]["swaps_diff_mean"] == ""
    assert (confs["never"]["n_pairs"], confs["threshold"]["n_pairs"]) == ("3", "2")
    diffs = [per_run["never", s].accept_len_mean - per_run["every_n", s].accept_len_mean for s in (0, 1, 2)]
    expect = t_interval(diffs)
    assert float(confs["never"]["accept_len_mean_diff_mean"]) == pytest.approx(sum(diffs) / 3)
    assert float(confs["never"]["accept_len_mean_diff_ci95_low"]) == pytest.approx(expect.low)
    assert float(confs["never"]["accept_len_mean_diff_ci95_high"]) == pytest.approx(expect.high)
    assert float(confs["threshold"]["swaps_diff_mean"]) == -2 and float(confs["threshold"]["refusals_diff_ci95_low"]) == 1  # 1 - 3 swaps, 1 - 0 refusals
    md = (out / "results.md").read_text()
    assert "Hardware: AMD EPYC 7B13, 2 cores, AVX2 only (no AVX512, no bf16); torch 2.9.0; vllm 0.32.0; engine eager (all 9 runs)." in md
    assert "Seeds: 3 per configuration (run.seed = 0, 1, 2)" in md and "95% Student-t" in md
    assert "## Paired differences against the baseline (controller.policy=every_n)" in md
    assert any(line.startswith("| never | 3 | -") for line in md.splitlines())  # never accepts less than every_n
    # a run on another machine: the results say the runs ran on different hardware, and which ran where
    (out / "policy-never__seed-0" / "hardware.json").write_text(json.dumps(HARDWARE | {"cpu": "Intel Xeon 8480+", "isa": ["amx_bf16", "avx512f"]}))
    write_results(out, grid)
    md = (out / "results.md").read_text()
    assert "DIFFERENT hardware" in md and "Intel Xeon 8480+, 2 cores, AMX + AVX512-BF16; torch 2.9.0; vllm 0.32.0; engine eager: policy-never__seed-0;" in md


def test_one_seed_is_labelled_an_anecdote(tmp_path):
    out = tmp_path / "s"
    grid = parse_grid(seeded_grid(baseline={"controller.policy": "never"}))  # no seeds: one run per configuration
    run_sweep(grid, out, runner=lambda run, run_dir, preset: synthetic_run(run_dir, dict(run.values)["controller.policy"], 0, steps=4) and 0,
              log=lambda *_: None)
    confs = read_csv(out / "results.csv")
    assert [(r["n_seeds"], r["note"]) for r in confs] == [("1", "1 seed: anecdote")] * 3
    assert all(math.isnan(float(r["accept_len_mean_ci95_low"])) and math.isnan(float(r["accept_len_mean_ci95_high"])) for r in confs)
    assert float(confs[0]["accept_len_mean_mean"]) == pytest.approx(summarize(load_run(out / "policy-never")).accept_len_mean)
    assert confs[1]["n_pairs"] == "1" and math.isnan(float(confs[1]["swaps_diff_ci95_low"])) and float(confs[1]["swaps_diff_mean"]) == 2
    md = (out / "results.md").read_text()
    assert "every row is an anecdote" in md and md.count("1 seed: anecdote") == 3
    assert hardware_note({"a": None, "b": HARDWARE, "c": HARDWARE}).endswith("engine eager (2 runs with a hardware.json). No hardware.json in 1 run: a.")


# ---------------------------------------------------------------------------------- plots


def assert_png(path: Path, min_bytes: int = 8000) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes


@pytest.mark.parametrize("fn", [plots.plot_staleness, plots.plot_position_acceptance, plots.plot_stage_times, plots.plot_pareto, plots.plot_accuracy])
def test_run_plots_write_png(fn, sweep_dir, tmp_path):
    runs = [load_run(d) for d in find_run_dirs(sweep_dir)]
    out = fn(runs, tmp_path / "plots" / f"{fn.__name__}.png")
    assert out == tmp_path / "plots" / f"{fn.__name__}.png"
    assert_png(out)
    plain = [load_run(synthetic_run(tmp_path / "plain", "never", 0, kind="none"))]
    assert_png(fn(plain, tmp_path / f"plain-{fn.__name__}.png"), min_bytes=3000)  # no speculation: a note, no crash


def test_curves_of_seeds_are_drawn_as_a_mean_with_a_band(tmp_path):
    runs = [load_run(synthetic_run(tmp_path / f"{p}-{s}", p, s)) for p, s in (("every_n", 0), ("every_n", 1), ("every_n", 2), ("threshold", 0))]
    configs = plots._configurations(runs)
    assert [(label, len(members)) for label, _, members in configs] == [("policy=every_n (mean of 3 seeds, 95% band)", 3), ("policy=threshold (1 run)", 1)]
    assert configs[0][1] != configs[1][1]  # one colour per configuration
    ax = plots._figure().add_subplot()
    curves = [accept_len_series(r) for r in configs[0][2]]
    drawn = plots._curve(ax, curves, configs[0][0], configs[0][1])
    steps, band = mean_curve(curves)
    assert drawn == {s: iv.mean for s, iv in zip(steps, band)} and all(iv.n == 3 and iv.low <= iv.mean <= iv.high for iv in band)
    assert sum(iv.low < iv.high for iv in band) == 4  # seeds decay at different rates between swaps (steps 1, 3, 5, 7)
    assert len(ax.lines) == 1 and len(ax.collections) == 1  # the mean and its shaded band
    single = accept_len_series(runs[3])
    assert plots._curve(ax, [single], configs[1][0], configs[1][1]) == dict(zip(*single))
    assert len(ax.lines) == 2 and len(ax.collections) == 1  # one run: a plain line, no band
    for fn in (plots.plot_staleness, plots.plot_position_acceptance, plots.plot_accuracy):
        assert_png(fn(runs, tmp_path / f"band-{fn.__name__}.png"))


def test_bench_plot_writes_png(bench_json, tmp_path):
    assert_png(plots.plot_rollout_bench(bench_json, tmp_path / "bench.png"))


def test_pareto_front():
    pts = [(0.0, 1.5), (10.0, 2.5), (5.0, 2.0), (12.0, 2.4), (5.0, 1.9), (0.0, 1.2)]
    assert plots.pareto_front(pts) == [0, 2, 1]


# ---------------------------------------------------------------------------------- report


def test_report_of_sweep_and_of_one_run(sweep_dir, bench_json, tmp_path):
    assert is_sweep_dir(sweep_dir) and not is_sweep_dir(sweep_dir / "policy-never__seed-0")
    out = build_report(sweep_dir, bench=bench_json)
    assert out == sweep_dir / "report.html"
    page = out.read_text()
    assert page.count('<img src="data:image/png;base64,') == 6
    assert 'policy = "threshold"' in page and 'kind = "eagle3"' in page and page.count("<details>") == 4
    assert "policy-every_n__seed-0" in page and "Per configuration: mean [95% Student-t interval] over seeds" in page
    assert page.count("1 seed: anecdote") == 2 and "2 seeds" in page  # never and every_n ran once, threshold twice
    assert "Hardware: not recorded" in page and "Paired differences" not in page  # no sweep.json, so no baseline
    single = build_report(sweep_dir / "policy-threshold__seed-1", out=tmp_path / "one.html")
    page = single.read_text()
    assert page.count('<img src="data:image/png;base64,') == 5 and "seed = 1" in page and "Per configuration" not in page


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(sweep_dir, bench_json, tmp_path):
    report = build_report(sweep_dir, bench=bench_json)
    shot = tmp_path / "report.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,2000", f"file://{report.resolve()}"]
    subprocess.run(cmd, capture_output=True, timeout=180)
    assert_png(shot, min_bytes=20000)


def test_compare_rewards_statistics():
    from analysis.compare_rewards import compare

    a = [0.1, 0.3, 0.2, 0.5, 0.4, 0.6, 0.35, 0.45]
    same = compare(a, list(a))
    assert same["mean_diff"] == 0 and same["wilcoxon_p"] == 1.0
    shifted = compare(a, [x + 0.2 + 0.01 * i for i, x in enumerate(a)])  # every step higher
    assert shifted["mean_diff"] == pytest.approx(0.235) and shifted["wilcoxon_p"] < 0.05
    assert shifted["ci_low"] > 0


def test_bench_refit_recovers_the_speedups_of_a_known_cost_model(tmp_path, capsys):
    """Cells timed by a known cost model: refitting from the saved JSON predicts every measured speedup."""
    from analysis.bench_rollout import load_results, main, predict_cells
    from codraft.costmodel import CostModel, StepCosts, tokens_per_verify

    true = CostModel()
    true.costs = StepCosts(t0=4e-3, t1=3e-4, d0=2e-3, d1=5e-5, s0=3e-3, s1=1e-4)
    tokens, cells = 48, []
    for b in (1, 4, 16, 64):
        plain = true.predict_gen_s([tokens] * b, float("nan"), 0)
        cells.append({"target": "t", "kind": "none", "k": 0, "batch": b, "seconds": plain, "tokens": tokens * b})
        for k, alpha in ((1, 0.7), (3, 0.6), (5, 0.5)):
            secs = true.predict_gen_s([tokens] * b, alpha, k)
            cells.append({"target": "t", "kind": "eagle3", "k": k, "batch": b, "seconds": secs, "tokens": tokens * b,
                          "accept_len": tokens_per_verify(alpha, k), "speedup": plain / secs})
    path = tmp_path / "bench.json"
    grpo = {  # a row timed beside a plain engine, and one from a file written before that
        "eagle3": {"plain_s": 2.0, "fixed_k": 3, "fixed_s": 3.0, "fixed_vs_plain": 0.66, "auto_schedule": [[1, 64, 0]], "auto_s": 2.1,
                   "auto_vs_plain": 0.97, "auto_vs_plain_range": [0.9, 1.05]},
        "mtp": {"plain_s": 2.0, "fixed_k": 3, "fixed_s": 4.0, "auto_schedule": [[1, 4, 1], [5, 64, 0]], "auto_s": 2.5},
    }
    path.write_text(json.dumps([{"name": "t", "parameters": 1, "cells": cells, "grpo": grpo}]))
    (result,) = load_results(path)
    predict_cells(result)
    spec = [c for c in result.cells if c.kind != "none"]
    assert len(spec) == 12
    for c in spec:
        assert c.predicted == pytest.approx(c.speedup, rel=0.02), (c.k, c.batch)
        assert c.loo == pytest.approx(c.speedup, rel=0.05), (c.k, c.batch)  # forecast from the other cells
    assert main(["--refit", str(path)]) == 0
    table = capsys.readouterr().out
    assert "0.97x" in table and "0.90-1.05" in table  # paired median and range
    assert "0.50x" in table and "0.80x" in table  # older rows: ratio of the medians


# ---------------------------------------------------------------------------------- rollout benchmark: paired timing, hardware, vanilla

AVX2 = {"cpu": "AMD EPYC", "cores": 2, "isa": ["avx2"], "accelerator": None, "torch": "2.13.0+cpu", "vllm": "0.32.0",
        "engine_mode": "compiled", "openmp": "intel (libiomp5)"}


def test_paired_ratio_median_range_and_spread_of_known_numbers():
    from analysis.bench_cells import paired_ratio, spread

    # repeat r: plain emits 100 tokens in a_s[r] seconds, speculative 120 tokens in b_s[r]
    ratio = paired_ratio([1.0, 2.0, 1.0, 1.25], [100] * 4, [1.0, 2.0, 1.2, 1.0], [120] * 4)
    assert ratio.ratios == pytest.approx((1.2, 1.2, 1.0, 1.5))
    assert (ratio.median, ratio.low, ratio.high) == pytest.approx((1.2, 1.0, 1.5))
    assert ratio.spread == pytest.approx(0.5 / 1.2)  # range / median
    # a load swing that slows both engines of a repeat alike leaves the paired ratio alone
    steady = paired_ratio([1.0, 3.0, 1.5], [100] * 3, [0.8, 2.4, 1.2], [100] * 3)
    assert steady.median == pytest.approx(1.25) and steady.spread == pytest.approx(0.0)
    assert spread([2.0, 2.2, 1.8]) == pytest.approx(0.2) and math.isnan(spread([1.0]))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeEngine:
    """Emits max_new_tokens per sequence in `seconds_per_token` each (on a fake clock) and logs its calls."""

    def __init__(self, name, clock, seconds_per_token, log):
        self.name, self.clock, self.rate, self.log = name, clock, seconds_per_token, log

    def generate(self, prompts, n, sampling, seed):
        from codraft.acceptance import AcceptanceStats
        from codraft.engine import Completion, Generation

        tokens = len(prompts) * n * sampling.max_new_tokens
        self.clock.now += tokens * self.rate
        self.log.append((self.name, seed))
        return Generation([Completion(i, [1] * sampling.max_new_tokens, [], False) for i in range(len(prompts) * n)],
                          AcceptanceStats(drafts=10, draft_tokens=30, accepted=12, accepted_per_pos=(6, 4, 2)) if self.name == "spec" else None)


def test_time_pair_alternates_and_sizes_calls_to_the_minimum_time(monkeypatch):
    from analysis import bench_cells
    from analysis.bench_rollout import spec_cell
    from codraft.engine import Sampling

    clock, log = FakeClock(), []
    monkeypatch.setattr(bench_cells, "perf_counter", clock)
    plain, spec = FakeEngine("plain", clock, 0.01, log), FakeEngine("spec", clock, 0.008, log)
    timing = bench_cells.time_pair(plain, spec, [[1]] * 4, Sampling(1.0, 1.0, 10), repeats=3, min_seconds=1.0, seed=5)
    assert timing.calls == 3  # a plain call takes 0.4 s: three reach a second
    assert log[:3] == [("plain", 4), ("spec", 4), ("plain", 3)]  # untimed warm-ups, then the probe
    order = [name for name, _ in log[3:]]
    assert order == ["plain"] * 3 + ["spec"] * 3 + ["spec"] * 3 + ["plain"] * 3 + ["plain"] * 3 + ["spec"] * 3  # ABBA
    assert [s for name, s in log[3:9]] == [5, 6, 7, 5, 6, 7]  # both engines get the same seeds in a repeat
    assert timing.a.seconds == pytest.approx([1.2] * 3) and timing.a.tokens == [120] * 3
    assert timing.ratio.median == pytest.approx(1.25) and timing.ratio.spread == pytest.approx(0.0)
    assert timing.b.acceptance.drafts == 90  # 3 repeats x 3 calls, summed
    cell = spec_cell("t", "eagle3", 3, 4, timing)
    assert (cell.seconds, cell.tokens, cell.plain_seconds, cell.calls, cell.repeats) == pytest.approx((0.32, 40, 0.4, 3, 3))
    assert cell.accept_len == pytest.approx(2.2) and (cell.speedup_low, cell.speedup_high) == pytest.approx((1.25, 1.25))
    # c = (T_spec - T_plain) / (k T_plain): a plain call is 10 steps of 0.04 s; a speculative call, 10 drafts
    # over 4 sequences, is 2.5 verify steps of 0.128 s
    assert cell.c_ratio == pytest.approx((0.128 - 0.04) / (3 * 0.04))


def test_benchmark_json_and_tables_name_the_hardware(tmp_path, capsys):
    from analysis.bench_cells import Cell, TargetResult, load_hardware, load_results, write_results
    from analysis.bench_rollout import main, plain_cells, print_tables
    from codraft.hardware import label

    cells = [Cell("t", "none", 0, b, 0.5, 48.0 * b) for b in (1, 16)]
    cells += [Cell("t", "eagle3", 1, b, 0.6, 48.0 * b, 1.8, 0.9, 0.83, speedup_low=0.8, speedup_high=0.86, spread=0.072) for b in (1, 16)]
    path = tmp_path / "bench.json"
    write_results(path, [TargetResult("t", 5_000_000, cells)], AVX2)
    data = json.loads(path.read_text())
    assert set(data) == {"hardware", "targets"} and data["hardware"] == AVX2
    assert set(AVX2) <= set(data["hardware"]) and load_hardware(path) == AVX2
    (back,) = load_results(path)
    assert back.cells[2].spread == pytest.approx(0.072)
    print_tables([back], AVX2)
    out = capsys.readouterr().out
    assert label(AVX2) in out and "AVX2 only" in out and "0.80-0.86" in out and "7%" in out
    assert "under 10%: 2/2 cells" in out
    older = tmp_path / "older.json"  # a bare list of targets, as written before the hardware block
    older.write_text(json.dumps(data["targets"]))
    assert load_hardware(older) is None and len(load_results(older)[0].cells) == 4
    assert main(["--refit", str(older)]) == 0 and "hardware not recorded" in capsys.readouterr().out
    assert_png(plots.plot_rollout_bench(path, tmp_path / "hw.png"))
    assert_png(plots.plot_rollout_bench(data, tmp_path / "hw2.png"))
    assert plain_cells("t", {}) == []


def test_bench_forecasts_cells_from_a_profile_of_a_known_cost_model(tmp_path, capsys):
    """Profile timings and cells from one known cost model: the profiled forecast hits every cell, and
    the forecast errors are summarised per CPU type across files."""
    from analysis.bench_cells import Cell, TargetResult, predict_cells, prediction_errors, write_results
    from analysis.bench_rollout import main
    from codraft.costmodel import CostModel, StepCosts, tokens_per_verify
    from codraft.costprofile import ProfileSettings, Timing

    true = CostModel()
    true.costs = StepCosts(t0=4e-3, t1=3e-4, d0=2e-3, d1=5e-5, s0=3e-3, s1=1e-4)
    alpha, settings = 0.6, ProfileSettings()
    timings = [Timing(b, k, (40,) * b, true.predict_gen_s([40] * b, alpha if k else math.nan, k), tokens_per_verify(alpha, k) if k else math.nan)
               for b in settings.batches for k in (0, *settings.ks)]
    cells = []
    for b in (1, 4, 16, 64):
        plain = true.predict_gen_s([48] * b, math.nan, 0)
        cells.append(Cell("t", "none", 0, b, plain, 48.0 * b))
        for k in (1, 2, 3):
            secs = true.predict_gen_s([48] * b, alpha, k)
            cells.append(Cell("t", "eagle3", k, b, secs, 48.0 * b, tokens_per_verify(alpha, k), speedup=plain / secs))
    result = TargetResult("t", 1, cells, profiles={"eagle3": {"timings": [dataclasses.asdict(t) for t in timings]}})
    predict_cells(result)
    for c in (c for c in result.cells if c.k):
        assert c.profiled == pytest.approx(c.speedup, rel=0.03), (c.k, c.batch)  # b = 64 lies beyond the profile's batches
        assert c.profiled_loo == pytest.approx(c.speedup, rel=0.03), (c.k, c.batch)
    assert max(prediction_errors(result.cells, "profiled")) < 0.03
    assert set(result.profiles["eagle3"]["costs"]) == {"t0", "t1", "d0", "d1", "s0", "s1"}
    write_results(tmp_path / "a.json", [result], AVX2)
    write_results(tmp_path / "b.json", [result], {**AVX2, "cpu": "Intel Xeon", "isa": ["amx_bf16", "avx2", "avx512f"]})
    assert main(["--refit", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "by CPU type" in out and "avx2" in out and "amx-bf16" in out and "12/12" in out
    assert "the engine-start profile alone: 12 cells" in out


def test_vanilla_comparison_table_from_synthetic_numbers(capsys):
    from analysis.bench_cells import PairTiming, Side, TargetResult
    from analysis.bench_vanilla import CONTROL, print_vanilla, vanilla_cell
    from codraft.acceptance import AcceptanceStats

    # vanilla (a) against codraft (b): 100 tokens per repeat; codraft 2% slower, then 10% slower
    close = PairTiming(Side([1.0, 1.1, 0.9], [100] * 3), Side([1.02, 1.122, 0.918], [100] * 3, AcceptanceStats(10, 30, 15)), calls=2)
    slow = PairTiming(Side([1.0, 1.0, 1.0], [100] * 3), Side([1.1, 1.12, 1.08], [100] * 3), calls=1)
    a = vanilla_cell("t", "eagle3", 3, 16, close, 2.5)
    b = vanilla_cell("t", "none", 0, 0, slow, math.nan)
    assert a.ratio == pytest.approx(1 / 1.02) and a.spread == pytest.approx(0.0, abs=1e-9) and a.accept_codraft == pytest.approx(2.5)
    assert a.vanilla_tps == pytest.approx(100.0) and a.codraft_tps == pytest.approx(100 / 1.02)
    assert b.ratio == pytest.approx(1 / 1.1) and (b.low, b.high) == pytest.approx((1 / 1.12, 1 / 1.08))
    aa = vanilla_cell("t", CONTROL, 0, 0, PairTiming(Side([1.0, 1.0, 1.0], [100] * 3), Side([1.3, 0.95, 1.0], [100] * 3), calls=1), math.nan)
    res = TargetResult("t", 1, vanilla=[dataclasses.asdict(aa), dataclasses.asdict(a), dataclasses.asdict(b)],
                       grpo={"vanilla_pairs": [{"kind": "eagle3", "k": 3, "hooks": {"apply_rejection_fix": True}, "rejection_fix_in_place_ms": 0.05,
                                                "get_metrics_ms": 0.4}]})
    print_vanilla([res], AVX2)
    out = capsys.readouterr().out
    assert "AVX2 only" in out and "0.980" in out and "0.909" in out and "GRPO" in out
    assert out.count("MISSED") == 1 and "within 5% of vanilla: 1/2 cells" in out  # the control is not a cell of the goal
    assert "noise floor: vanilla against vanilla on the GRPO batch 1.000 (range 0.769-1.053)" in out and "vanilla A/A" in out
    assert "0.40 ms (counters)" in out
