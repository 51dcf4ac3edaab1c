"""analysis/policy_goal.py on synthetic runs with hand-computed acceptance and refresh cost."""
from pathlib import Path

import pytest

from test_analysis import step_record, write_run


def constant_run(root: Path, policy: str, seed: int, accept_len: float, swap_steps: set[int], args: dict | None = None, steps: int = 8) -> Path:
    """Every step drafts 100 times with `accept_len`; a swap costs 4 s of distillation + 0.5 s of swap."""
    records = [step_record(s, 100, round(100 * (accept_len - 1)), "swap" if s in swap_steps else "keep", distill_s=4.0, swap_s=0.5)
               for s in range(steps)]
    overrides = [f"controller.policy={policy}", "drafter.kind=eagle3", f"run.seed={seed}", f"run.steps={steps}"]
    overrides += [f"controller.args.{k}={v}" for k, v in (args or {}).items()]
    name = policy + "".join(f"-{k}{v}" for k, v in (args or {}).items())
    return write_run(root / f"{name}__seed-{seed}", overrides, records, {"eval/accuracy": 0.5})


def edit_config(run: Path, old: str, new: str) -> Path:
    """Replace `old` (which must be there) with `new` in the run's config.toml."""
    config = run / "config.toml"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))
    return run


def margin(run: Path, value: float) -> Path:
    """Set the run's `controller.gate_margin` (written as the default, 0.05)."""
    return edit_config(run, "gate_margin = 0.05\n", f"gate_margin = {value}\n")


def cells(md: str) -> dict[str, list[str]]:
    """The goal table's rows by configuration (the paired table after it is left out)."""
    goal = md.split("\n\n")[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in goal.splitlines() if line.startswith("| `")]
    return {r[0].strip("`"): r for r in rows}


def test_goal_columns_and_verdicts_hand_computed(tmp_path):
    from analysis.policy_goal import main

    for seed in (0, 1):
        constant_run(tmp_path, "never", seed, 2.0, set())
        constant_run(tmp_path, "every_n", seed, 2.5, set(range(8)))
        constant_run(tmp_path, "drift", seed, 2.4, {2, 6}, {"threshold": 0.05})  # -4%, 25% of the cost, +20%
        constant_run(tmp_path, "drift", seed, 2.2 + 0.1 * seed, {3}, {"threshold": 0.2})  # -12% / -8%, 12.5%, +10% / +15%
        constant_run(tmp_path, "threshold", seed, 2.35 + 0.1 * seed, {3})  # -6% / -2%, 12.5%, +17.5% / +22.5%
    rows = cells(main([tmp_path]))
    tuned = rows["drift (threshold=0.05)"]
    assert tuned[1] == "2"
    assert tuned[3].startswith("-4.0% [-4.0%, -4.0%]")
    assert tuned[4].startswith("25.0% [25.0%, 25.0%]")
    assert tuned[5].startswith("+20.0% [+20.0%, +20.0%]")
    assert tuned[6].startswith("25.0% [25.0%, 25.0%]")  # 2 refreshes against 8
    assert tuned[7:] == ["met at 95%", "met at 95%", "met at 95%", "`every_n` / `never`"]
    loose = rows["drift (threshold=0.2)"]
    assert loose[3].startswith("-10.0% [")  # mean of -12% and -8%
    assert loose[5].startswith("+12.5% [")
    assert loose[7:10] == ["missed", "met at 95%", "missed"]
    wide = rows["threshold"]
    assert wide[3].startswith("-4.0% [") and wide[5].startswith("+20.0% [")
    assert wide[7:10] == ["met", "met at 95%", "met"]  # the means meet the goals, the two-seed intervals do not
    assert rows["every_n"][4].startswith("100.0%") and rows["every_n"][7] == "met at 95%"


def test_a_missing_reference_is_named(tmp_path):
    from analysis.policy_goal import main

    constant_run(tmp_path, "never", 0, 2.0, set())
    constant_run(tmp_path, "drift", 0, 2.4, {2})
    with pytest.raises(ValueError, match="no finished `every_n` run"):
        main([tmp_path])


@pytest.mark.parametrize("field, old_value, new_value", [("gate_steps", "1", "3"), ("gate_margin", "0.05", "0.1"), ("distill_lr", "0.0", "0.0005")])
def test_a_controller_field_that_older_runs_lack_reads_as_their_value_and_separates_configurations(tmp_path, field, old_value, new_value):
    """Runs from before `controller.gate_steps` (no such line in config.toml) gated like gate_steps = 1
    (before `gate_margin`, like margin 0): they pair with newer runs at that value and are apart from
    runs at another (were pooled before)."""
    from analysis.policy_goal import main
    from analysis.runs import find_run_dirs, load_run, varying_keys

    old, new = tmp_path / "old", tmp_path / "new"
    for seed in (0, 1):
        for run in (constant_run(old, "never", seed, 2.0, set()), constant_run(old, "every_n", seed, 2.5, set(range(8)))):
            config = run / "config.toml"
            config.write_text("\n".join(line for line in config.read_text().splitlines() if not line.startswith(field)))
            assert field not in load_run(run).config["controller"]
        constant_run(new, "every_n", seed, 2.4, set(range(8)), steps=8)
    for run in find_run_dirs(new):
        config = run / "config.toml"
        assert f"{field} = {old_value}\n" in config.read_text()
        config.write_text(config.read_text().replace(f"{field} = {old_value}\n", f"{field} = {new_value}\n"))
    runs = [load_run(d) for p in (old, new) for d in find_run_dirs(p)]
    assert f"controller.{field}" in varying_keys(runs)
    rows = cells(main([old, new]))
    assert set(rows) == {"never", "every_n", f"every_n ({field}={new_value})"}
    assert rows[f"every_n ({field}={new_value})"][2].startswith("2.4") and rows["every_n"][2].startswith("2.5")


def test_a_configuration_is_compared_with_every_n_of_its_own_gate_setting(tmp_path):
    """`drift (gate_margin=0.05)` pairs with `every_n (gate_margin=0.05)` when both are among the runs,
    not with the strict-gate `every_n`; `never` (no run at that setting) is the plain one."""
    from analysis.policy_goal import main

    for seed in (0, 1):
        constant_run(tmp_path / "old", "never", seed, 2.0, set())
        constant_run(tmp_path / "old", "every_n", seed, 2.5, set(range(8)))
        constant_run(tmp_path / "new", "every_n", seed, 2.4, set(range(8)))
        constant_run(tmp_path / "new", "drift", seed, 2.28, {2, 6})  # -5% against 2.4, -8.8% against 2.5
    for run in (tmp_path / "old").iterdir():
        config = run / "config.toml"
        config.write_text(config.read_text().replace("gate_margin = 0.05\n", "gate_margin = 0.0\n"))
    rows = cells(main([tmp_path / "old", tmp_path / "new"]))
    drift = rows["drift (gate_margin=0.05)"]
    assert drift[3].startswith("-5.0% [-5.0%, -5.0%]") and drift[5].startswith("+14.0%")
    assert drift[-1] == "`every_n (gate_margin=0.05)` / `never`"
    assert rows["every_n"][-1] == "`every_n` / `never`"


def test_pairing_with_args_and_a_setting_and_the_fallbacks(tmp_path):
    """`drift (baseline=peak, gate_margin=0.1)` pairs with `every_n (gate_margin=0.1)`; a setting with no
    every_n of its own falls back to the plain every_n; `never`'s gate margin is no part of its
    setting (a frozen drafter meets no gate)."""
    from analysis.policy_goal import main

    for seed in (0, 1):
        margin(constant_run(tmp_path, "never", seed, 2.0, set()), 0.2)
        margin(constant_run(tmp_path, "every_n", seed, 2.5, set(range(8))), 0.0)
        margin(constant_run(tmp_path / "m", "every_n", seed, 2.4, set(range(8))), 0.1)
        margin(constant_run(tmp_path / "m", "drift", seed, 2.28, {2, 6}, {"baseline": "peak"}), 0.1)  # -5% against 2.4
        margin(constant_run(tmp_path / "s", "drift", seed, 2.25, {2}), 0.3)  # no every_n at 0.3: against 2.5, -10%
    rows = cells(main([tmp_path, tmp_path / "m", tmp_path / "s"]))
    peak = rows["drift (baseline=peak, gate_margin=0.1)"]
    assert peak[3].startswith("-5.0% [-5.0%, -5.0%]") and peak[-1] == "`every_n (gate_margin=0.1)` / `never`"
    lone = rows["drift (gate_margin=0.3)"]
    assert lone[3].startswith("-10.0%") and lone[5].startswith("+12.5%") and lone[-1] == "`every_n` / `never`"


def test_a_setting_no_reference_has_pairs_with_the_only_reference_there_is(tmp_path):
    """`drift (distill_steps=16)` against the one `every_n (distill_steps=8)` configuration: what a
    budget-per-refresh screen compares (smoke_drift_budget.toml); the last column names the pair."""
    from analysis.policy_goal import main

    for seed in (0, 1):
        constant_run(tmp_path, "never", seed, 2.0, set())
        constant_run(tmp_path, "every_n", seed, 2.5, set(range(8)))
        drift = constant_run(tmp_path, "drift", seed, 2.4, {2, 6}, {"baseline": "peak"})  # -4% against 2.5
        edit_config(drift, "distill_steps = 8\n", "distill_steps = 16\n")  # the smoke preset's 8
    drift = cells(main([tmp_path]))["drift (baseline=peak, distill_steps=16)"]
    assert drift[3].startswith("-4.0% [-4.0%, -4.0%]") and drift[5].startswith("+20.0%")
    assert drift[-1] == "`every_n (distill_steps=8)` / `never`"  # distillation steps are no part of a frozen drafter's setting


def test_frozen_runs_that_differ_only_in_refresh_fields_pool(tmp_path):
    """`never` seeds 0-1 from a strict-gate sweep and seed 2 from a margin sweep are one floor: the
    margin configuration pairs with it on all three seeds (out-of-sample seeds join earlier ones)."""
    from analysis.policy_goal import main

    for seed in (0, 1, 2):
        sweep = tmp_path / ("old" if seed < 2 else "new")
        margin(constant_run(sweep, "never", seed, 2.0, set()), 0.0 if seed < 2 else 0.05)
        constant_run(tmp_path / "m", "every_n", seed, 2.5, set(range(8)))
        constant_run(tmp_path / "m", "drift", seed, 2.4, {2, 6}, {"baseline": "peak"})
    rows = cells(main([tmp_path / "old", tmp_path / "new", tmp_path / "m"]))
    assert "never" in rows and not any(name.startswith("never (") for name in rows)
    drift = rows["drift (baseline=peak, gate_margin=0.05)"]
    assert drift[1] == "3" and drift[5].startswith("+20.0% [+20.0%, +20.0%]")
    assert drift[-1] == "`every_n (gate_margin=0.05)` / `never`"


def test_frozen_runs_that_differ_only_in_the_refresh_learning_rate_pool(tmp_path):
    """`controller.distill_lr` acts only on a refresh: `never` at two rates is one floor, and the
    configurations that refresh stay apart by it."""
    from analysis.policy_goal import main

    for seed in (0, 1):
        for lr in ("0.0", "0.0005"):
            rate = lambda run: edit_config(run, "distill_lr = 0.0\n", f"distill_lr = {lr}\n")  # noqa: E731
            rate(constant_run(tmp_path / f"lr{lr}", "never", seed, 2.0, set()))
            rate(constant_run(tmp_path / f"lr{lr}", "drift", seed, 2.4 if lr == "0.0" else 2.2, {2, 6}))
        constant_run(tmp_path / "ref", "every_n", seed, 2.5, set(range(8)))
    rows = cells(main([tmp_path / "ref", tmp_path / "lr0.0", tmp_path / "lr0.0005"]))
    assert set(rows) == {"every_n", "never", "drift", "drift (distill_lr=0.0005)"}
    assert rows["never"][1] == "2" and rows["drift (distill_lr=0.0005)"][5].startswith("+10.0% [")


def test_a_configuration_pairs_with_the_reference_whose_setting_agrees_most(tmp_path):
    """With every_n at two gate margins, `drift (distill_steps=16, gate_margin=0.05)` pairs with the
    every_n of its margin (the field they share), and `never` (no setting) with the first given."""
    from analysis.policy_goal import main

    for seed in (0, 1):
        constant_run(tmp_path / "a", "every_n", seed, 2.4, set(range(8)))
        edit_config(constant_run(tmp_path / "b", "every_n", seed, 2.5, set(range(8))), "gate_margin = 0.05\n", "gate_margin = 0.0\n")
        constant_run(tmp_path / "a", "never", seed, 2.0, set())
        edit_config(constant_run(tmp_path / "c", "drift", seed, 2.28, {2, 6}), "distill_steps = 8\n", "distill_steps = 16\n")  # -5% against 2.4
    rows = cells(main([tmp_path / "a", tmp_path / "b", tmp_path / "c"]))
    drift = rows["drift (distill_steps=16, gate_margin=0.05)"]
    assert drift[3].startswith("-5.0% [-5.0%, -5.0%]") and drift[-1] == "`every_n (distill_steps=8, gate_margin=0.05)` / `never`"
    assert rows["never"][-1] == "`every_n (distill_steps=8, gate_margin=0.05)` / `never`"


def test_configurations_of_one_policy_are_paired_with_each_other(tmp_path):
    """Two `drift` settings on the same seeds get a paired acceptance row (2.52 against 2.4: +5%);
    the reference and the floor get none."""
    from analysis.policy_goal import main

    for seed in (0, 1):
        constant_run(tmp_path / "base", "never", seed, 2.0, set())
        constant_run(tmp_path / "base", "every_n", seed, 2.5, set(range(8)))
        constant_run(tmp_path / "a", "drift", seed, 2.4, {2, 6})
        edit_config(constant_run(tmp_path / "b", "drift", seed, 2.52, {2, 6}), "distill_steps = 8\n", "distill_steps = 16\n")
    md = main([tmp_path / "base", tmp_path / "a", tmp_path / "b"])
    paired = next(block for block in md.split("\n\n") if block.startswith("| configuration | against"))
    assert paired.splitlines()[2:] == ["| `drift (distill_steps=16)` | `drift (distill_steps=8)` | 2 | +5.0% [+5.0%, +5.0%] |"]
