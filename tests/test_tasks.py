"""Tasks: the contract every registered task meets (so a new task is tested without writing a
test), then each task's own behaviour, mixtures, settings, the GSM8K loader, and the worked
example of codraft/tasks/README.md."""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from codraft.config import ConfigError, TaskConfig
from codraft.configfile import from_dict, load_config, section_fields, to_dict
from codraft.task import TASKS, MixedTask, Score, SyntheticTask, describe_tasks, final_answer, make_task
from tests_helpers import scratch_registry

DATA = Path(__file__).parent / "data"
README = Path(__file__).resolve().parents[1] / "codraft" / "tasks" / "README.md"

# settings the contract tests need beyond a task's defaults (tasks that read files)
CONTRACT_ARGS = {"gsm8k": {"path": str(DATA / "gsm8k_small.jsonl")}}


def contract_cfg(name: str, seed_args: dict | None = None) -> TaskConfig:
    return TaskConfig(name=name, num_train=60, num_eval=4, args={**CONTRACT_ARGS.get(name, {}), **(seed_args or {})})


def wrong(answer: str) -> str:
    return str(int(answer) + 1) if answer.lstrip("-").isdigit() else str(float(answer) + 1)


# --------------------------------------------------------------------------------------------
# the contract every registered task meets (also applied to the README's example)


def check_splits(name: str) -> None:
    train, held_out = make_task(contract_cfg(name)).splits()
    assert len(train) > 0 and len(held_out) > 0
    for ds in (train, held_out):
        assert {"prompt", "answer", "solution"} <= set(ds.column_names)
    assert not set(train["prompt"]) & set(held_out["prompt"])


def check_rewards(name: str) -> None:
    """Worked solutions that reach the gold answer score correct and earn the full reward (and most
    rows' solutions do: some tasks' solutions slip by design); a wrong final answer earns only the
    format reward."""
    cfg = contract_cfg(name)
    task = make_task(cfg)
    train, held_out = task.splits()
    rows = list(train) + list(held_out)
    reaching = [row for row in rows if final_answer(row["solution"]) == row["answer"]]
    assert len(reaching) >= len(rows) / 4, f"{name}: few worked solutions reach the gold answer"
    for row in reaching:
        score = task.score(row["solution"], row, finished=True)
        assert score == Score(correct=True, formatted=True), row
        assert task.reward(score) == pytest.approx(cfg.answer_reward + cfg.format_reward)
    for row in rows:
        bad = row["solution"].rsplit("####", 1)[0] + f"#### {wrong(row['answer'])}"
        score = task.score(bad, row, finished=True)
        assert score == Score(correct=False, formatted=True), bad
        assert task.reward(score) == pytest.approx(cfg.format_reward)
        assert not task.score(row["solution"], row, finished=False).formatted  # cut off: no format reward


def check_deterministic(name: str) -> None:
    first, again = make_task(contract_cfg(name), seed=3), make_task(contract_cfg(name), seed=3)
    assert [list(ds) for ds in first.splits()] == [list(ds) for ds in again.splits()]
    held_out = set(first.splits()[1]["prompt"])
    sft = first.sft_examples(20, held_out)
    assert sft == again.sft_examples(20, held_out)
    if sft is not None:  # fresh warm-start rows, never a held-out prompt
        assert len(sft) == 20 and not {ex["prompt"] for ex in sft} & held_out
    if isinstance(first, SyntheticTask):
        assert list(make_task(contract_cfg(name), seed=4).splits()[0]) != list(first.splits()[0])


def check_data_key(name: str) -> None:
    task = make_task(contract_cfg(name))
    key = task.data_key()
    assert json.loads(json.dumps(key)) == key  # plain JSON types
    assert make_task(contract_cfg(name), seed=1).data_key() != key
    rewarded = dataclasses.replace(contract_cfg(name), answer_reward=2.0)
    assert make_task(rewarded).data_key() == key  # rewards do not shape the data


def check_config_round_trips_through_toml(name: str) -> None:
    config_cls = TASKS.get(name).Config
    default = config_cls()
    text = tomli_w.dumps({"args": to_dict(default)})
    assert from_dict(config_cls, tomllib.loads(text)["args"], prefix="task.args.") == default
    if hasattr(default, "validate"):
        default.validate("task.args.")


def check_documented(name: str) -> None:
    cls = TASKS.get(name)
    assert cls.description and "\n" not in cls.description
    for field_name, _, _, doc in section_fields(cls.Config):
        assert doc.strip(), f"{name}: config field {field_name!r} has no docstring"
    assert f"{name}: {cls.description}" in describe_tasks()


CONTRACT = [check_splits, check_rewards, check_deterministic, check_data_key, check_config_round_trips_through_toml, check_documented]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_meets_the_contract(name, check):
    check(name)


# --------------------------------------------------------------------------------------------
# each task's own behaviour


def test_final_answer_parsing():
    assert final_answer(" 3+4=7. #### 7") == "7"
    assert final_answer("so #### 2,400") == "2400"
    assert final_answer("#### -12 ") == "-12"
    assert final_answer("#### 7 and more") is None
    assert final_answer("no answer") is None


@pytest.mark.parametrize("name", ["arith", "countdown", "reverse"])
def test_worked_solutions_earn_full_reward(name):
    args = {"terse_error": 0.0} if name == "arith" else {}
    task = make_task(TaskConfig(name=name, num_train=50, num_eval=10, args=args))
    train, held_out = task.splits()
    assert not set(train["prompt"]) & set(held_out["prompt"])
    for row in list(train) + list(held_out):
        score = task.score(row["solution"], row, finished=True)
        assert score == Score(correct=True, formatted=True), row
        assert task.reward(score) == pytest.approx(1.1)


def test_arith_warm_start_data_mixes_styles_and_slips():
    task = make_task(TaskConfig(name="arith", args={"careful_share": 0.3, "terse_error": 0.25}))
    examples = task.sft_examples(2000, exclude=set())
    careful = [e for e in examples if " left " in e["solution"]]
    terse = [e for e in examples if " left " not in e["solution"]]
    assert 0.25 < len(careful) / len(examples) < 0.35
    right = lambda group: sum(task.check(e["solution"], e) for e in group) / len(group)  # noqa: E731
    assert right(careful) > 0.85 > 0.6 > right(terse)  # careful solutions slip ten times less often
    clean = make_task(TaskConfig(name="arith", args={"careful_share": 0.3, "terse_error": 0.0})).sft_examples(300, exclude=set())
    for e in clean:  # running values stay single-digit
        assert task.check(e["solution"], e)
        values = [int(v) for v in re.findall(r"=(-?\d+)", e["solution"])]
        assert all(0 <= v <= 9 for v in values)


def test_arith_rewards():
    task = make_task(TaskConfig(name="arith"))
    row = {"prompt": "Q: 5+3-2=? A:", "answer": "6"}
    assert task.reward(task.score(" 5+3=8. 8-2=6. #### 6", row, True)) == pytest.approx(1.1)
    assert task.reward(task.score(" 5+3=8. 8-2=5. #### 5", row, True)) == pytest.approx(0.1)  # wrong, well formed
    assert task.reward(task.score(" 5+3=8. 8-2=6. #### 6", row, False)) == pytest.approx(1.0)  # cut off: no format reward
    assert task.reward(task.score(" 5+3=8. 8-2=6.", row, True)) == 0.0


def test_countdown_checks_every_step():
    task = make_task(TaskConfig(name="countdown"))
    row = {"prompt": "Q: make 24 from 3 8 5 A:", "answer": "24"}
    assert task.score(" 3*8=24. #### 24", row, True).correct
    assert not task.score(" 4*6=24. #### 24", row, True).correct  # numbers not in the pool
    assert not task.score(" 8*8=64. 64-40=24. #### 24", row, True).correct  # 8 used twice
    assert not task.score(" 3*8=25. #### 24", row, True).correct  # wrong arithmetic
    assert not task.score(" #### 24", row, True).correct  # no work shown


# --------------------------------------------------------------------------------------------
# mixtures


def test_mixture_routes_rows_by_their_task_name():
    task = make_task(TaskConfig(name="arith", mix_task="countdown"))
    assert isinstance(task, MixedTask)
    looks_like_arith = {"prompt": "Q: 3+5=? A:", "answer": "8"}
    assert task.check(" 3+5=8. #### 8", {**looks_like_arith, "task": "arith"})
    assert not task.check(" 3+5=8. #### 8", {**looks_like_arith, "task": "countdown"})  # countdown's check: no pool
    looks_like_countdown = {"prompt": "Q: make 24 from 3 8 5 A:", "answer": "24"}
    assert task.check(" #### 24", {**looks_like_countdown, "task": "arith"})  # arith's check: the answer alone
    assert not task.check(" #### 24", {**looks_like_countdown, "task": "countdown"})
    with pytest.raises(ValueError, match="row's task 'reverse' is not part of the mixture 'arith\\+countdown'"):
        task.check(" #### 8", {**looks_like_arith, "task": "reverse"})


def test_mixture_rows_carry_their_task_and_score_by_it():
    cfg = load_config("default", overrides=["task.num_train=100", "task.num_eval=6", "task.args.terse_error=0.0"])
    task = make_task(cfg.task, cfg.task.seed)
    train, held_out = task.splits()
    assert set(held_out["task"]) == {"arith"} and set(train["task"]) == {"arith", "reverse"}
    assert len(train) == 200 and not set(train["prompt"]) & set(held_out["prompt"])
    for row in list(train) + list(held_out):
        assert task.score(row["solution"], row, True) == Score(correct=True, formatted=True), row
    sft = task.sft_examples(100, exclude=set(held_out["prompt"]))
    assert sum(ex["task"] == "reverse" for ex in sft) == int(100 * cfg.task.mix_sft_share)
    assert all(task.check(ex["solution"], ex) for ex in sft)


def test_mixture_task_gets_its_own_settings():
    task = make_task(TaskConfig(name="reverse", mix_task="arith", args={}, mix_args={"max_ops": 2}))
    assert task.extra.settings.max_ops == 2 and task.main.settings == task.main.Config()
    with pytest.raises(ConfigError, match=r"config key 'task.mix_args.ops_decay' must be in \(0, 1\]"):
        make_task(TaskConfig(name="arith", mix_task="countdown", mix_args={"ops_decay": 0.0}))


# --------------------------------------------------------------------------------------------
# settings


def test_unknown_task_lists_known():
    with pytest.raises(KeyError, match="unknown task 'arithm'.*known: arith, countdown, gsm8k, reverse"):
        make_task(TaskConfig(name="arithm"))


def test_bad_task_setting_names_the_key():
    cfg = load_config("smoke", overrides=["task.args.max_opz=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'task.args.max_opz'; did you mean 'max_ops'.*\(task 'arith'\)"):
        make_task(cfg.task)
    with pytest.raises(ConfigError, match=r"config key 'task.args.min_ops' must be >= 1 and <= task.args.max_ops"):
        make_task(TaskConfig(args={"min_ops": 5, "max_ops": 3}))
    with pytest.raises(ConfigError, match=r"config key 'task.args.max_ops' expects int"):
        make_task(TaskConfig(name="countdown", args={"max_ops": "many"}))
    with pytest.raises(ConfigError, match=r"unknown config key 'task.args.max_ops'.*\(task 'reverse'\)"):
        make_task(TaskConfig(name="reverse", args={"max_ops": 3}))


def test_cli_overrides_reach_the_task_settings():
    cfg = load_config("smoke", overrides=["task.name=countdown", "task.args.max_operand=20"])
    task = make_task(cfg.task)
    assert task.settings.max_ops == 6 and task.settings.max_operand == 20  # the preset's [task.args] stays


# --------------------------------------------------------------------------------------------
# the GSM8K loader


def gsm8k(path, **kw) -> TaskConfig:
    return TaskConfig(name="gsm8k", args={"path": str(path)}, **kw)


def test_gsm8k_loader_reads_small_file():
    task = make_task(gsm8k(DATA / "gsm8k_small.jsonl", num_eval=3))
    train, held_out = task.splits()
    assert len(train) == 9 and len(held_out) == 3
    assert not set(train["prompt"]) & set(held_out["prompt"])
    row = train[8]  # "Sam saves $1,200 ...": the comma is normalised away
    assert row["answer"] == "2400"
    assert row["prompt"].startswith("Q: Sam saves") and row["prompt"].endswith(" A:")
    assert task.score(" ... #### 2400", row, True).correct
    assert task.score(row["solution"], row, True).correct
    assert task.sft_examples(10, set()) is None  # warm-starts on its training rows


def test_gsm8k_parquet(tmp_path):
    import datasets

    datasets.load_dataset("json", data_files=str(DATA / "gsm8k_small.jsonl"), split="train").to_parquet(tmp_path / "g.parquet")
    train, held_out = make_task(gsm8k(tmp_path / "g.parquet", num_eval=2)).splits()
    assert len(train) == 10 and len(held_out) == 2


def test_gsm8k_data_key_names_the_file_by_size_and_mtime(tmp_path):
    data = tmp_path / "g.jsonl"
    data.write_text((DATA / "gsm8k_small.jsonl").read_text())
    key = make_task(gsm8k(data)).data_key()
    assert key["settings"]["path"][0] == str(data.resolve())
    data.write_text((DATA / "gsm8k_small.jsonl").read_text() * 2)
    assert make_task(gsm8k(data)).data_key() != key


def test_gsm8k_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.args.path: GSM8K file not found"):
        make_task(gsm8k(tmp_path / "nope.jsonl")).splits()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        make_task(gsm8k(empty)).splits()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "solution": "x"}\n')
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        make_task(gsm8k(bad)).splits()
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text('{"question": "q", "answer": "x"}\n' * 3)
    with pytest.raises(ValueError, match=r"row 0: answer does not end in '#### <number>'"):
        make_task(gsm8k(noanswer, num_eval=1)).splits()
    with pytest.raises(FileNotFoundError, match="task.args.eval_path: GSM8K file not found"):
        make_task(TaskConfig(name="gsm8k", args={"path": str(DATA / "gsm8k_small.jsonl"), "eval_path": str(tmp_path / "no.jsonl")})).splits()


# --------------------------------------------------------------------------------------------
# the README's worked example really runs and meets the contract


def readme_example() -> tuple[str, str]:
    """(task name, code) of the example in the README's 'Add a task in one file' section."""
    section = README.read_text().split("## Add a task in one file", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return re.search(r'TASKS\.register\("(\w+)"\)', code).group(1), code


def test_readme_example_registers_and_meets_the_contract(tmp_path, monkeypatch):
    name, code = readme_example()
    package = tmp_path / "readme_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    scratch_registry(monkeypatch, TASKS)  # registration undone afterwards
    try:
        importlib.import_module(f"readme_tasks.{name}")
        assert name in TASKS.names()
        for check in CONTRACT:
            check(name)
        task = make_task(TaskConfig(name=name))
        row = {"prompt": "Q: parity 1 0 1 1 A:", "answer": "1"}
        assert task.score(" 1 0 1 1 has 3 ones. #### 1", row, True) == Score(correct=True, formatted=True)
        assert not task.check(" 1 0 1 1 has 1 ones. #### 1", row)  # right answer, wrong count
        with pytest.raises(ConfigError, match=f"'task.args.min_bits' must be >= 1.*task '{name}'"):
            make_task(TaskConfig(name=name, args={"min_bits": 0}))
    finally:
        for module in ("readme_tasks", f"readme_tasks.{name}"):
            sys.modules.pop(module, None)


def test_test_split_is_disjoint_from_everything_a_run_or_its_tuning_sees(tiny_cfg):
    """Issue 16: the reported accuracy comes from prompts never used to choose anything (defaults are
    tuned on the held-out split) and never trained on, neither in RL nor in the testbed's warm start."""
    from codraft.prompts import warm_start_prompts
    from codraft.task import make_task

    task = make_task(tiny_cfg.task, tiny_cfg.task.seed)
    train, held_out = task.splits()
    sft = warm_start_prompts(tiny_cfg, task, (train, held_out))
    test = task.test_split(16, exclude=sft)
    prompts = set(test["prompt"])
    assert len(prompts) == 16
    assert not prompts & set(train["prompt"]) and not prompts & set(held_out["prompt"]) and not prompts & sft
    again_train, again_held = task.splits()  # drawing the test split leaves the other splits as they were
    assert list(again_train["prompt"]) == list(train["prompt"]) and list(again_held["prompt"]) == list(held_out["prompt"])
    assert list(task.test_split(16, exclude=sft)["prompt"]) == list(test["prompt"])
