"""Flat, namespaced metrics: one JSONL line per step, stage timers, an optional TensorBoard mirror.

    sink = MetricsSink(run_dir / "metrics.jsonl")
    timer = StageTimer()
    with timer("gen"):
        ...
    sink.write({"step": 3, **timer.metrics(), "reward/mean": 0.4})

Keys are `<namespace>/<name>`: `time/gen_s`, `reward/mean`, `spec/accept_len`, `controller/decision`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from codraft.io import append_jsonl, read_jsonl

STAGES = ("prepare", "gen", "reward", "logprob", "train", "control", "index", "distill", "swap")


class StageTimer:
    """Wall-clock seconds per named stage of one step. Stages nest: a stage's seconds exclude the
    stages timed inside it (the control stage's own work is `control`; the distillation and the
    swap it runs are `distill` and `swap`), so the stages add up to the step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open stage: seconds of the stages nested inside it

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            total = time.perf_counter() - t0
            nested = self._inner.pop()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + total - nested
            if self._inner:
                self._inner[-1] += total

    def metrics(self) -> dict[str, float]:
        out = {f"time/{k}_s": v for k, v in self.seconds.items()}
        out["time/step_s"] = sum(v for k, v in self.seconds.items() if k in STAGES)
        return out


class MetricsSink:
    """Appends one record per step to metrics.jsonl (whole lines, fsynced)."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path = Path(path)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("output.tensorboard=true needs the `tensorboard` package (pip install tensorboard)") from err
            self.tb = SummaryWriter(str(self.path.parent / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, step)

    def records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def close(self) -> None:
        """Flush and close the TensorBoard mirror (metrics.jsonl is written whole, line by line)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def stage_shares(records: list[dict[str, Any]]) -> dict[str, float]:
    """Share of the summed step time spent in each stage, over all records."""
    totals = {s: sum(r.get(f"time/{s}_s", 0.0) or 0.0 for r in records) for s in STAGES}
    whole = sum(totals.values())
    return {s: (v / whole if whole else 0.0) for s, v in totals.items() if v > 0}
