"""The reference speculative sampler is exact: emitted tokens follow the target (chi-square, fixed seed).

Significance: each goodness-of-fit test rejects at p < 1e-3 (the seeds are fixed, so the outcome
is deterministic); a deliberately broken sampler must be rejected by the same test.
"""
import pytest
import torch
from scipy.stats import chisquare

from codraft.lossless import homogeneity
from codraft.spec_reference import one_hot_drafts, speculative_step

ALPHA = 1e-3
N = 40000


def fixed_case(k=2, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k + 1, V, generator=g) * 1.5
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits[:k] + torch.randn(k, V, generator=g), -1)  # a drafter that is close, not exact
    return p, q


def run(p, q, probabilistic: bool, seed=1, sampler=speculative_step):
    g = torch.Generator().manual_seed(seed)
    k, V = q.shape
    if probabilistic:
        drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(k)], dim=1)  # [N, k]
        q_used = q.expand(N, k, V)
    else:
        drafts = q.argmax(-1).expand(N, k)
        q_used = one_hot_drafts(drafts, V)
    return sampler(p.expand(N, k + 1, V), q_used, drafts, g), drafts


def gof(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    probs = probs.double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability zero was emitted"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return chisquare(counts[keep], expected).pvalue


@pytest.mark.parametrize("probabilistic", [False, True])
def test_first_and_second_tokens_follow_target(probabilistic):
    p, q = fixed_case()
    out, _ = run(p, q, probabilistic)
    assert gof(out.tokens[:, 0], p[0]) > ALPHA
    two = out.num_emitted >= 2  # the first token was an accepted draft; the next follows p[1]
    assert two.sum() > 1000
    assert gof(out.tokens[two, 1], p[1]) > ALPHA
    assert (out.num_accepted <= 2).all() and (out.num_emitted == out.num_accepted + 1).all()


def test_acceptance_rate_matches_closed_form():
    p, q = fixed_case()
    out, _ = run(p, q, probabilistic=True)
    expected = torch.minimum(p[0], q[0]).sum()  # P(first draft accepted) = sum min(p, q)
    assert abs((out.num_accepted >= 1).double().mean() - expected) < 0.01
    out, drafts = run(p, q, probabilistic=False)
    assert abs((out.num_accepted >= 1).double().mean() - p[0, q[0].argmax()]) < 0.01  # greedy: p(argmax q)


def test_identical_draft_is_always_accepted():
    p, _ = fixed_case()
    out, _ = run(p, p[:2].clone(), probabilistic=True)
    assert (out.num_accepted == 2).all()


def test_a_broken_sampler_is_caught():
    def always_accept(p, q, drafts, generator=None):
        B, k1, V = p.shape
        tokens = torch.cat([drafts, torch.multinomial(p[:, -1], 1, generator=generator)], dim=1)
        return type(speculative_step(p[:1], q[:1], drafts[:1]))(tokens, torch.full((B,), k1), torch.full((B,), k1 - 1))

    p, q = fixed_case()
    out, _ = run(p, q, probabilistic=False, sampler=always_accept)
    assert gof(out.tokens[:, 0], p[0]) < ALPHA


def test_homogeneity_separates_distributions():
    from collections import Counter

    g = torch.Generator().manual_seed(0)
    a = Counter(torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 5000, True, generator=g).tolist())
    b = Counter(torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 5000, True, generator=g).tolist())
    c = Counter(torch.multinomial(torch.tensor([0.4, 0.3, 0.3]), 5000, True, generator=g).tolist())
    assert homogeneity(a, b)[2] > 0.01
    assert homogeneity(a, c)[2] < 1e-6


def test_stratified_homogeneity_is_calibrated_and_sees_a_small_shift():
    """Per-prompt sample sizes fixed as in check-lossless: under the null the p-values are uniform
    (Kolmogorov-Smirnov against U(0, 1) at the 1% level, 200 seeded repetitions); a shift of total
    variation about 0.08 in every prompt is found."""
    from collections import Counter

    from scipy.stats import kstest

    g = torch.Generator().manual_seed(0)
    dists = [torch.softmax(torch.randn(12, generator=g), -1) for _ in range(8)]

    def draw(shift: float = 0.0) -> Counter:
        out = Counter()
        for i, p in enumerate(dists):
            p = torch.softmax(p.log() + torch.linspace(0, shift, len(p)), -1)
            out.update((i, t) for t in torch.multinomial(p, 256, True, generator=g).tolist())
        return out

    null = [homogeneity(draw(), draw())[2] for _ in range(200)]
    assert kstest(null, "uniform").pvalue > 0.01
    assert homogeneity(draw(), draw(shift=0.5))[2] < 1e-3


def test_accept_len_stderr_matches_the_closed_form():
    from codraft.acceptance import AcceptanceStats

    # 4 drafts with accepted counts 0, 1, 3, 3 (k = 3): per position 3, 2, 2
    stats = AcceptanceStats(drafts=4, draft_tokens=12, accepted=7, accepted_per_pos=(3, 2, 2))
    counts = torch.tensor([0.0, 1.0, 3.0, 3.0])
    assert stats.accept_len == pytest.approx(1 + counts.mean().item())
    assert stats.accept_len_stderr == pytest.approx(counts.var(unbiased=False).sqrt().item() / 2)


def test_detectable_shift_has_the_stated_power():
    """check-lossless prints the smallest shift it detects with 80% power: a simulation at that shift
    detects it about 80% of the time (fixed seed; 400 trials: the rate is within 0.06 of 0.8 unless
    the formula is off)."""
    import numpy as np
    from scipy.stats import chi2_contingency

    from codraft.lossless import detectable_shift

    n, level = 400, 0.01 / 10
    d = detectable_shift(n, level)
    assert 0.05 < d < 0.25 and detectable_shift(4 * n, level) < d  # more samples, smaller shifts
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        a, b = rng.binomial(n, 0.5), rng.binomial(n, 0.5 + d)
        p = chi2_contingency([[a, n - a], [b, n - b]], correction=False).pvalue
        hits += p < level
    assert abs(hits / 400 - 0.8) < 0.06
