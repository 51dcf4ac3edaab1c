"""Tasks: rewards, worked solutions that check out, disjoint splits, the GSM8K loader."""
import re
from pathlib import Path

import pytest

from codraft.config import TaskConfig
from codraft.tasks import Score, final_answer, make_task

DATA = Path(__file__).parent / "data"


def test_final_answer_parsing():
    assert final_answer(" 3+4=7. #### 7") == "7"
    assert final_answer("so #### 2,400") == "2400"
    assert final_answer("#### -12 ") == "-12"
    assert final_answer("#### 7 and more") is None
    assert final_answer("no answer") is None


@pytest.mark.parametrize("name", ["arith", "countdown", "reverse"])
def test_worked_solutions_earn_full_reward(name):
    task = make_task(TaskConfig(name=name, num_train=50, num_eval=10, terse_error=0.0))
    train, held_out = task.splits()
    assert not set(train["prompt"]) & set(held_out["prompt"])
    for row in list(train) + list(held_out):
        score = task.score(row["solution"], row["prompt"], row["answer"], finished=True)
        assert score == Score(correct=True, formatted=True), row
        assert task.reward(score) == pytest.approx(1.1)


def test_arith_warm_start_data_mixes_styles_and_slips():
    task = make_task(TaskConfig(name="arith", careful_share=0.3, terse_error=0.25))
    examples = task.sft_examples(2000, exclude=set())
    careful = [e for e in examples if " left " in e["solution"]]
    terse = [e for e in examples if " left " not in e["solution"]]
    assert 0.25 < len(careful) / len(examples) < 0.35
    right = lambda group: sum(task.check(e["solution"], e["prompt"], e["answer"]) for e in group) / len(group)  # noqa: E731
    assert right(careful) > 0.85 > 0.6 > right(terse)  # careful solutions slip ten times less often
    clean = make_task(TaskConfig(name="arith", careful_share=0.3, terse_error=0.0)).sft_examples(300, exclude=set())
    for e in clean:  # running values stay single-digit
        assert task.check(e["solution"], e["prompt"], e["answer"])
        values = [int(v) for v in re.findall(r"=(-?\d+)", e["solution"])]
        assert all(0 <= v <= 9 for v in values)


def test_arith_rewards():
    task = make_task(TaskConfig(name="arith"))
    prompt, answer = "Q: 5+3-2=? A:", "6"
    assert task.reward(task.score(" 5+3=8. 8-2=6. #### 6", prompt, answer, True)) == pytest.approx(1.1)
    assert task.reward(task.score(" 5+3=8. 8-2=5. #### 5", prompt, answer, True)) == pytest.approx(0.1)  # wrong, well formed
    assert task.reward(task.score(" 5+3=8. 8-2=6. #### 6", prompt, answer, False)) == pytest.approx(1.0)  # cut off: no format reward
    assert task.reward(task.score(" 5+3=8. 8-2=6.", prompt, answer, True)) == 0.0


def test_countdown_checks_every_step():
    task = make_task(TaskConfig(name="countdown"))
    prompt = "Q: make 24 from 3 8 5 A:"
    assert task.score(" 3*8=24. #### 24", prompt, "24", True).correct
    assert not task.score(" 4*6=24. #### 24", prompt, "24", True).correct  # numbers not in the pool
    assert not task.score(" 8*8=64. 64-40=24. #### 24", prompt, "24", True).correct  # 8 used twice
    assert not task.score(" 3*8=25. #### 24", prompt, "24", True).correct  # wrong arithmetic
    assert not task.score(" #### 24", prompt, "24", True).correct  # no work shown


def test_gsm8k_loader_reads_small_file():
    task = make_task(TaskConfig(name="gsm8k", path=str(DATA / "gsm8k_small.jsonl"), num_eval=3))
    train, held_out = task.splits()
    assert len(train) == 9 and len(held_out) == 3
    assert not set(train["prompt"]) & set(held_out["prompt"])
    row = train[8]  # "Sam saves $1,200 ...": the comma is normalised away
    assert row["answer"] == "2400"
    assert row["prompt"].startswith("Q: Sam saves") and row["prompt"].endswith(" A:")
    assert task.score(" ... #### 2400", row["prompt"], row["answer"], True).correct
    assert task.score(row["solution"], row["prompt"], row["answer"], True).correct


def test_gsm8k_parquet(tmp_path):
    import datasets

    datasets.load_dataset("json", data_files=str(DATA / "gsm8k_small.jsonl"), split="train").to_parquet(tmp_path / "g.parquet")
    train, held_out = make_task(TaskConfig(name="gsm8k", path=str(tmp_path / "g.parquet"), num_eval=2)).splits()
    assert len(train) == 10 and len(held_out) == 2


def test_gsm8k_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GSM8K file not found"):
        make_task(TaskConfig(name="gsm8k", path=str(tmp_path / "nope.jsonl"))).splits()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        make_task(TaskConfig(name="gsm8k", path=str(empty))).splits()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "solution": "x"}\n')
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        make_task(TaskConfig(name="gsm8k", path=str(bad))).splits()
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text('{"question": "q", "answer": "x"}\n' * 3)
    with pytest.raises(ValueError, match=r"row 0: answer does not end in '#### <number>'"):
        make_task(TaskConfig(name="gsm8k", path=str(noanswer), num_eval=1)).splits()


def test_unknown_task_lists_known():
    with pytest.raises(KeyError, match="unknown task 'arithm'.*known: arith, countdown, gsm8k, reverse"):
        make_task(TaskConfig(name="arithm"))
