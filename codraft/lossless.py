"""Losslessness check: speculative sampling must leave the sampled distribution unchanged.

From the same prompts at temperature 1, sample many completions with a plain engine and with a
speculating engine, then test per position that the two samples come from one distribution
(chi-square test of homogeneity, scipy.stats.chi2_contingency, stratified by prompt: one
table per prompt, statistics and degrees of freedom summed) on
    - the token at position t (categories (prompt, token)), t = 0..P-1;
    - the first m tokens as one category (prompt, t_0..t_{m-1}), m = 2, 3.
Rare categories (fewer than `min_count` in both samples together) are pooled per prompt. The check
fails if any p-value is below alpha / (number of tests) (Bonferroni), at a fixed seed.

It catches both a wrong sampler and a wrong engine: with vLLM's CPU rejection-sampler kernel left
unfixed and a drafter that always proposes the same token, the proposed token floods the output.

Power: `detectable_shift` is the smallest change of one token's probability (from 0.5, the hardest
case) that the per-position test finds with 80% power at the Bonferroni threshold, for a change in
one prompt (n = samples per prompt per arm) and in every prompt at once (n = all samples per arm);
the report prints both. The check runs at top-p = 1 and below (nucleus sampling changes the
distributions the rejection sampler must keep).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from codraft.engine import RolloutEngine, Sampling


@dataclass
class LosslessReport:
    rows: list[tuple[str, int, float, float]] = field(default_factory=list)  # (test, categories, statistic, p-value)
    alpha: float = 0.01
    samples: int = 0
    accept_len: float = float("nan")
    prompts: int = 1
    top_p: float = 1.0

    def detectable(self, power: float = 0.8) -> tuple[float, float]:
        """Smallest detectable shift of one token's probability (from 0.5): in one prompt, in every prompt."""
        per_prompt = self.samples // max(1, self.prompts)
        return detectable_shift(per_prompt, self.threshold, power), detectable_shift(self.samples, self.threshold, power)

    @property
    def threshold(self) -> float:
        return self.alpha / max(1, len(self.rows))

    @property
    def passed(self) -> bool:
        return all(p >= self.threshold for _, _, _, p in self.rows)

    @property
    def min_p(self) -> float:
        return min((p for *_, p in self.rows), default=1.0)


def detectable_shift(n_per_arm: int, level: float, power: float = 0.8, p0: float = 0.5) -> float:
    """The smallest |p1 - p0| a two-sample chi-square test (1 degree of freedom) at significance
    `level` detects with probability `power`, with `n_per_arm` samples in each arm: the noncentral
    chi-square's noncentrality n d^2 / (2 p (1 - p)) (p the pooled probability) solved for d."""
    from scipy.optimize import brentq
    from scipy.stats import chi2, ncx2

    if n_per_arm <= 0:
        return float("nan")
    crit = chi2.isf(level, 1)

    def missed(d: float) -> float:
        p = p0 + d / 2
        return ncx2.sf(crit, 1, n_per_arm * d * d / (2 * p * (1 - p))) - power

    return float(brentq(missed, 1e-9, 1 - p0 - 1e-9)) if missed(1 - p0 - 1e-9) > 0 else float("nan")


def homogeneity(a: Counter, b: Counter, min_count: int = 10) -> tuple[int, float, float]:
    """Chi-square test that two samples of categories share one distribution: (categories, stat, p).

    Categories written `(stratum, value)` (here: prompt index, token) are tested per stratum and the
    statistics and degrees of freedom add up. Both arms draw the same number of completions per
    prompt, so one test over the joint categories would count degrees of freedom that carry no
    variance: its p-values come out too large and it would miss real differences. Within a
    stratum, categories seen fewer than `min_count` times in both samples together are pooled.
    """
    from scipy.stats import chi2, chi2_contingency

    strata: dict[object, list] = {}
    for key in set(a) | set(b):
        stratum = key[0] if isinstance(key, tuple) and len(key) == 2 else None
        strata.setdefault(stratum, []).append(key)
    categories, stat, dof = 0, 0.0, 0
    for keys in strata.values():
        keys.sort(key=repr)
        common = [k for k in keys if a[k] + b[k] >= min_count]
        table = [[a[k] for k in common], [b[k] for k in common]]
        rare_a, rare_b = sum(a[k] for k in keys if k not in common), sum(b[k] for k in keys if k not in common)
        if rare_a + rare_b >= min_count:
            table[0].append(rare_a)
            table[1].append(rare_b)
        categories += len(table[0])
        if len(table[0]) < 2 or not sum(table[0]) or not sum(table[1]):
            continue
        result = chi2_contingency(table, correction=False)
        stat, dof = stat + float(result.statistic), dof + int(result.dof)
    if not dof:
        return categories, 0.0, 1.0
    return categories, stat, float(chi2.sf(stat, dof))


def _samples(engine: RolloutEngine, prompts: list[list[int]], n: int, tokens: int, seed: int, top_p: float = 1.0):
    gen = engine.generate(prompts, n=n, sampling=Sampling(1.0, top_p, tokens), seed=seed)
    return [(c.prompt_index, tuple(c.token_ids)) for c in gen.completions], gen.acceptance


def check_lossless(plain: RolloutEngine, spec: RolloutEngine, prompts: list[list[int]], samples_per_prompt: int = 256, positions: int = 64, alpha: float = 0.01, seed: int = 0, min_count: int = 10, top_p: float = 1.0) -> LosslessReport:
    a, _ = _samples(plain, prompts, samples_per_prompt, positions, seed, top_p)
    b, acceptance = _samples(spec, prompts, samples_per_prompt, positions, seed + 1, top_p)
    report = LosslessReport(alpha=alpha, samples=len(a), prompts=len(prompts), top_p=top_p)
    if acceptance is not None and acceptance.drafts:
        report.accept_len = acceptance.accept_len
    pad = -1  # finished sequences contribute "ended" at later positions
    for t in range(positions):
        ca = Counter((i, s[t] if t < len(s) else pad) for i, s in a)
        cb = Counter((i, s[t] if t < len(s) else pad) for i, s in b)
        report.rows.append((f"token@{t}", *homogeneity(ca, cb, min_count)))
    for m in (2, 3):
        ca = Counter((i, s[:m]) for i, s in a)
        cb = Counter((i, s[:m]) for i, s in b)
        report.rows.append((f"first{m}", *homogeneity(ca, cb, min_count)))
    return report


def biased_eagle3(policy, token: int):
    """An EAGLE-3 drafter whose draft vocabulary is the single `token`: it always proposes it."""
    from codraft.drafter import DRAFTERS

    counts = torch.zeros(policy.config.vocab_size)
    counts[token] = 1.0
    return DRAFTERS.get("eagle3").build(policy, DRAFTERS.get("eagle3").Config(draft_vocab_size=1), token_counts=counts)


def format_report(report: LosslessReport, title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    one, every = report.detectable()
    table = Table(title=(
        f"{title}, top-p {report.top_p}: {'PASS' if report.passed else 'FAIL'} (alpha {report.alpha}, Bonferroni threshold {report.threshold:.2e}, "
        f"{report.samples} samples per arm, accept len {report.accept_len:.2f}); detects with 80% power a shift of one token's "
        f"probability 0.5 by {one:.3f} in one prompt, {every:.3f} in every prompt"
    ))
    for col in ("test", "categories", "chi2", "p-value"):
        table.add_column(col, justify="right")
    for name, cats, stat, p in report.rows:
        table.add_row(name, str(cats), f"{stat:.1f}", f"{p:.3g}" + (" *" if p < report.threshold else ""))
    console = Console(record=True, width=120)
    with console.capture() as cap:
        console.print(table)
    return cap.get()
