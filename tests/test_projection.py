"""Projection: the speculation closed form, the roofline step model, the rollout simulation, the
calibration on arXiv 2604.26779 (no-spec figures fitted, spec figures predicted) and the CLI."""
import dataclasses
import math
import re

import numpy as np
import pytest

from analysis.projection import PAPER, RL_ZERO_8B, ProjectArgs, calibrate, main, rel_error
from analysis.roofline import (
    DEVICES,
    MODELS,
    Deployment,
    Efficiency,
    RolloutShape,
    Speculation,
    Workload,
    alpha_for_accept_len,
    completion_lengths,
    forward_step,
    generation_seconds,
    running_profile,
    tokens_per_verify,
)
from codraft.configfile import section_fields

IDEAL = Efficiency(hbm=1.0, decode_compute=1.0)
SMALL = Workload(shape=RolloutShape(prompts=64, group_size=8, mean_response=1000.0, max_response=4096),
                 deploy=Deployment(gpus=8))


@pytest.fixture(scope="module")
def calibration():
    return calibrate(RL_ZERO_8B, Efficiency(), other_s=3.0)


def test_tokens_per_verify_is_the_geometric_series():
    assert tokens_per_verify(0.0, 3) == 1.0
    assert tokens_per_verify(1.0, 3) == 4.0
    for alpha in (0.1, 0.56, 0.9):
        for k in range(1, 8):
            assert tokens_per_verify(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)))


def test_alpha_for_accept_len_inverts_the_closed_form():
    alpha = alpha_for_accept_len(2.05, 3)
    assert 0.55 < alpha < 0.57
    assert tokens_per_verify(alpha, 3) == pytest.approx(2.05)
    assert Speculation(3, alpha).accept_len == pytest.approx(2.05)
    with pytest.raises(ValueError):
        alpha_for_accept_len(4.5, 3)  # more than k + 1 tokens per verify is impossible


def test_decode_is_bandwidth_bound_at_batch_1_and_compute_bound_at_large_batch():
    model, dev = MODELS["qwen3-8b"], DEVICES["h100"]
    one = forward_step(model, dev, IDEAL, 1, 0)
    assert one.mem_s > 100 * one.compute_s
    assert one.seconds == pytest.approx(model.params_b * 1e9 * 2 / (dev.hbm_tb_s * 1e12))
    big = forward_step(model, dev, IDEAL, 4096, 0)
    assert big.compute_s > 5 * big.mem_s


def test_crossover_batch_is_where_the_roofline_puts_it():
    # weights / BW == 2 P b / F  <=>  b* = F x bytes_per_param / (2 BW) = F / BW for bf16 (~295 on H100)
    model, dev = MODELS["qwen3-8b"], DEVICES["h100"]
    batch = np.arange(1, 2000)
    for eff in (IDEAL, Efficiency(hbm=0.8, decode_compute=0.4)):
        cost = forward_step(model, dev, eff, batch, 0)
        crossover = batch[np.argmax(cost.compute_s >= cost.mem_s)]
        expected = dev.bf16_tflops * eff.decode_compute / (dev.hbm_tb_s * eff.hbm)
        assert crossover == pytest.approx(expected, rel=0.01)


def test_long_contexts_keep_decode_bandwidth_bound():
    # KV reads grow with the batch like the FLOPs do, so 4k-token contexts stay memory-bound at batch 1000
    cost = forward_step(MODELS["qwen3-8b"], DEVICES["h100"], IDEAL, 1000, 1000 * 4000)
    assert cost.mem_s > 5 * cost.compute_s


def test_verify_cost_grows_with_k_plus_1_at_large_batch_but_not_at_batch_1():
    model, dev, eff, k = MODELS["qwen3-8b"], DEVICES["gb200"], Efficiency(), 3
    plain, verify = forward_step(model, dev, eff, 4096, 0, 1), forward_step(model, dev, eff, 4096, 0, k + 1)
    assert verify.seconds / plain.seconds == pytest.approx(k + 1, rel=0.05)
    plain, verify = forward_step(model, dev, eff, 1, 2000, 1), forward_step(model, dev, eff, 1, 2000, k + 1)
    assert verify.seconds / plain.seconds < 1.02


def test_moe_reads_active_experts_at_batch_1_and_all_at_large_batch():
    moe = MODELS["qwen3-235b-a22b"]
    assert moe.weight_bytes_read(1) == pytest.approx(moe.active_params_b * 1e9 * 2, rel=0.02)
    assert moe.weight_bytes_read(4096) == pytest.approx(moe.params_b * 1e9 * 2, rel=0.001)
    reads = moe.weight_bytes_read(np.array([1, 4, 16, 64, 256]))
    assert np.all(np.diff(reads) > 0)
    dense = MODELS["qwen3-8b"]
    assert dense.weight_bytes_read(1) == dense.weight_bytes_read(4096)


def test_eagle3_head_is_a_few_percent_of_the_target():
    head = MODELS["qwen3-8b"].drafter()
    assert head.layers == 1
    assert 0.3 < head.params_b < 0.5


def test_completion_lengths_have_the_requested_mean_and_cap():
    shape = RolloutShape(prompts=256, group_size=16, mean_response=3000.0, max_response=16384, sigma=1.0)
    lengths = completion_lengths(shape)
    assert len(lengths) == 256 * 16
    assert lengths.mean() == pytest.approx(3000.0, rel=0.01)
    assert lengths.max() == 16384 and (lengths == 16384).sum() > 10  # a truncated long tail
    assert np.all(np.diff(lengths) >= 0)


def test_running_profile_shrinks_and_conserves_work():
    lengths = np.array([10.0, 20.0, 40.0, 40.0])
    batch, context = running_profile(lengths, prompt_len=5, tokens_per_step=2.0, max_running=8)
    assert list(batch[:5]) == [4, 4, 4, 4, 4] and batch[5] == 3 and batch[-1] == 2 and len(batch) == 20
    assert context[0] == 4 * 5 and context[1] == 4 * 5 + 4 * 2  # every running sequence gained 2 tokens
    capped, _ = running_profile(np.full(10, 8.0), prompt_len=0, tokens_per_step=1.0, max_running=3)
    assert capped.max() == 3 and capped.sum() == 10 * 8  # queued sequences still run all their steps


def test_speculation_pays_only_with_acceptance(calibration):
    eff = calibration.eff
    plain = generation_seconds(SMALL, eff, None)
    assert generation_seconds(SMALL, eff, Speculation(3, 0.0)) > plain  # drafts that are never accepted
    assert generation_seconds(SMALL, eff, Speculation(3, 0.9)) < plain / 2


def test_calibration_reproduces_the_no_spec_8b_figures(calibration):
    assert calibration.ok
    assert calibration.base.gen_s == pytest.approx(PAPER.gen_s, rel=0.005)
    assert calibration.base.step_s == pytest.approx(PAPER.step_s, rel=0.005)
    assert 0.1 < calibration.eff.mfu < 0.7
    assert 500 < calibration.work.shape.mean_response < 10_000


def test_speculative_figures_are_predicted_with_their_error(calibration):
    spec, base = calibration.spec, calibration.base
    assert base.gen_s / (PAPER.k + 1) < spec.gen_s < base.gen_s
    assert spec.logprob_s == base.logprob_s and spec.train_s == base.train_s
    for model, paper in ((spec.gen_s, PAPER.gen_spec_s), (spec.step_s, PAPER.step_spec_s)):
        error = rel_error(model, paper)
        assert math.isfinite(error)
        assert error == pytest.approx(100 * (model / paper - 1))
        assert abs(error) < 30  # a regression bound on the prediction, not the claim
    # the prediction does not depend on the figures it predicts
    moved = calibrate(RL_ZERO_8B, Efficiency(), 3.0, dataclasses.replace(PAPER, gen_spec_s=1.0, step_spec_s=2.0))
    assert moved.spec == spec


def test_every_config_field_is_documented():
    from analysis import projection, roofline

    for cls in (roofline.Device, roofline.ModelSpec, Speculation, Efficiency, RolloutShape, Deployment,
                Workload, roofline.StageTimes, projection.PaperAnchor, projection.Calibration, ProjectArgs):
        undocumented = [name for name, _, _, doc in section_fields(cls) if not doc.strip()]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_cli_prints_the_8b_check_and_the_235b_projection(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for key in ("Qwen3-8B RL-Zero: model vs arXiv 2604.26779", "Qwen3-235B-A22B", "ASYNCHRONOUS", "NOT COMPARABLE",
                "2.5x (async)", "Sensitivity", "gb200", "source"):
        assert key in out
    for figure, paper in (("gen, spec (s)", "56.6"), ("step, spec (s)", "107.5")):
        row = re.search(rf"{re.escape(figure)}\s*\S\s*{paper}\s*\S\s*([\d.,]+)\s*\S\s*([+-][\d.]+)%\s*\S\s*predicted", out)
        assert row, figure
        assert math.isfinite(float(row.group(1))) and math.isfinite(float(row.group(2)))
    for fitted in ("gen, no spec (s)", "step, no spec (s)"):
        row = re.search(rf"{re.escape(fitted)}\s*\S\s*[\d.]+\s*\S\s*[\d.]+\s*\S\s*([+-][\d.]+)%", out)
        assert abs(float(row.group(1))) < 0.5
    assert not re.search(r"│\s*[+-]?(nan|inf)", out)  # no non-finite table cell
    assert "Draft length sweep" not in out  # default options: no custom projection


def test_cli_projects_other_models_devices_and_k(capsys):
    assert main(["--report", "custom", "--model", "qwen3-32b", "--device", "h100", "--gpus", "64", "--tp", "2",
                 "--k", "4", "--alpha", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3-32B on 64 x H100 SXM, TP 2" in out and "Draft length sweep" in out
    assert "arXiv 2604.26779" not in out
    assert main(["--model", "nope"]) == 2
    assert "known: qwen3-1.7b" in capsys.readouterr().err
