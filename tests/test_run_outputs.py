"""What a run writes besides checkpoints is closed with the run: Parts.close closes RunOutputs, and
with it the TensorBoard mirror, which until 2026-12-04 was never closed (its last events could stay
unwritten; a torchrun rank that exits without finalization would drop them for sure)."""
from types import SimpleNamespace

import pytest

from codraft.controller import NoController
from codraft.metrics import MetricsSink
from codraft.parts import Parts, RunOutputs


def parts(outputs: RunOutputs | None) -> Parts:
    """Parts with only what close() touches: no engine, no rollouts, no controller of its own."""
    return Parts(cfg=None, dist=None, policy_dir=None, prompts=None, scorer=None, trainer=None, policy=None, controller=NoController(), outputs=outputs)


@pytest.mark.parametrize("closes", [1, 2])
def test_closing_the_parts_closes_the_tensorboard_mirror_once(tmp_path, closes):
    """The writer is replaced by a recorder: tensorboard is not a dependency."""
    closed = []
    sink = MetricsSink(tmp_path / "metrics.jsonl")
    sink.tb = SimpleNamespace(add_scalar=lambda *a: None, close=lambda: closed.append(True))
    run = parts(RunOutputs(tmp_path, sink, tokenizer=None, samples_per_step=0, group_size=2))
    run.outputs.write({"step": 0, "reward/mean": 0.5})
    for _ in range(closes):  # closing twice is harmless
        run.close()
    assert closed == [True]
    assert sink.records() == [{"step": 0, "reward/mean": 0.5}]


def test_parts_without_outputs_close(tmp_path):
    """Ranks other than the main one write nothing and have no outputs to close."""
    parts(None).close()
