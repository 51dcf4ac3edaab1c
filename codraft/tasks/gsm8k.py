"""`gsm8k`: grade-school math word problems from a local file in the GSM8K layout.

    {"question": "Sam saves $1,200 ...", "answer": "... #### 2,400"}
    ->  prompt `Q: Sam saves $1,200 ... A:`, answer `2400`, solution ` ... #### 2,400`

JSONL, JSON or Parquet. Held out: a separate file (`eval_path`) or the last `task.num_eval` rows.
The warm start trains on the training rows' own solutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from codraft.task import TASKS, Task, final_answer


@dataclass(frozen=True)
class GSM8KConfig:
    path: str = ""
    """Local JSONL or Parquet file with `question` and `answer` ending in `#### <number>`."""
    eval_path: str = ""
    """Optional separate held-out file (otherwise the last `task.num_eval` rows are held out)."""


def load_file(path: str, key: str) -> datasets.Dataset:
    """Rows prompt, answer, solution from a GSM8K-layout file; errors name the config `key`."""
    file = Path(path)
    if not path or not file.is_file():
        raise FileNotFoundError(f"{key}: GSM8K file not found: {path!r}")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(file.suffix)
    if kind is None:
        raise ValueError(f"{key}: {path} must end in .jsonl, .json or .parquet")
    if file.stat().st_size == 0:
        raise ValueError(f"{key}: {path} holds no rows")
    try:
        ds = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as err:  # datasets raises several types for unreadable files
        raise ValueError(f"{key}: cannot read {path} as {kind}: {str(err).strip() or type(err).__name__}") from None
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{key}: {path} lacks column(s) {sorted(missing)} (GSM8K layout: question, answer)")
    if len(ds) == 0:
        raise ValueError(f"{key}: {path} holds no rows")

    def convert(row: dict, idx: int) -> dict:
        gold = final_answer(row["answer"])
        if gold is None:
            raise ValueError(f"{key}: {path} row {idx}: answer does not end in '#### <number>'")
        return {"prompt": f"Q: {row['question'].strip()} A:", "answer": gold, "solution": " " + row["answer"].strip()}

    return ds.map(convert, with_indices=True, remove_columns=ds.column_names)


@TASKS.register("gsm8k")
class GSM8K(Task):
    description = "Grade-school math word problems from a local file in the GSM8K layout (question, answer ending in #### n)."
    Config = GSM8KConfig

    def splits(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        path, eval_path, num_eval = self.settings.path, self.settings.eval_path, self.cfg.num_eval
        data = load_file(path, f"{self.prefix}path")
        if eval_path:
            held_out = load_file(eval_path, f"{self.prefix}eval_path")
        else:
            if len(data) <= num_eval:
                raise ValueError(f"{self.prefix}path: {path} has {len(data)} rows, not more than task.num_eval={num_eval}")
            held_out = data.select(range(len(data) - num_eval, len(data)))
            data = data.select(range(len(data) - num_eval))
        seen = set(held_out["prompt"])
        train = data.filter(lambda row: row["prompt"] not in seen)
        return train, held_out.select(range(min(num_eval, len(held_out))))

    def data_key(self) -> dict[str, Any]:
        """The settings, each file named by its resolved path, size and modification time."""
        key = super().data_key()
        for name in ("path", "eval_path"):
            value = getattr(self.settings, name)
            if value:
                stat = Path(value).stat()
                key["settings"][name] = [str(Path(value).resolve()), stat.st_size, stat.st_mtime_ns]
        return key
