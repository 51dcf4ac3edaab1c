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

    @property
    def threshold(self) -> float:
        return self.alpha / max(1, len(self.rows))

    @property
    def passed(self) -> bool:
        return all(p >= self.threshold for _, _, _, p in self.rows)

    @property
    def min_p(self) -> float:
        return min((p for *_, p in self.rows), default=1.0)


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


def _samples(engine: RolloutEngine, prompts: list[list[int]], n: int, tokens: int, seed: int):
    gen = engine.generate(prompts, n=n, sampling=Sampling(1.0, 1.0, tokens), seed=seed)
    return [(c.prompt_index, tuple(c.token_ids)) for c in gen.completions], gen.acceptance


def check_lossless(plain: RolloutEngine, spec: RolloutEngine, prompts: list[list[int]], samples_per_prompt: int = 256, positions: int = 12, alpha: float = 0.01, seed: int = 0, min_count: int = 10) -> LosslessReport:
    a, _ = _samples(plain, prompts, samples_per_prompt, positions, seed)
    b, acceptance = _samples(spec, prompts, samples_per_prompt, positions, seed + 1)
    report = LosslessReport(alpha=alpha, samples=len(a))
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

    table = Table(title=f"{title}: {'PASS' if report.passed else 'FAIL'} (alpha {report.alpha}, Bonferroni threshold {report.threshold:.2e}, {report.samples} samples per arm, accept len {report.accept_len:.2f})")
    for col in ("test", "categories", "chi2", "p-value"):
        table.add_column(col, justify="right")
    for name, cats, stat, p in report.rows:
        table.add_row(name, str(cats), f"{stat:.1f}", f"{p:.3g}" + (" *" if p < report.threshold else ""))
    console = Console(record=True, width=120)
    with console.capture() as cap:
        console.print(table)
    return cap.get()
