"""`hybrid`: a learned drafter (eagle3, mtp or draft_model) and the suffix index side by side.

At every engine step vLLM's proposer for the learned kind drafts k tokens for every running request;
then `DraftMixer` (installed in the worker by `codraft.vllm_compat.install_draft_mixer`, around the
model runner's `propose_draft_token_ids`) asks the suffix index (drafters/suffix.py) for its draft
of each request and keeps, row by row, the one with more tokens expected to be accepted:

    E[accepted | source, draft length m, confidence bin] = (matched tokens + prior x 0.5-geometric) / (drafts + prior)

from the evidence of earlier steps; a suffix draft's confidence is its empirical probability in the
index (bins split at `CONFIDENCE`), a learned draft's one bin. Both sources' drafts are scored on every verified row, drafted
or not: a point-mass draft token x is accepted with probability p(x), and the engine's output token
equals x with probability p(x), so the common prefix of a draft with the tokens the engine produced
is an unbiased count of what it would have got accepted, except that a draft agreeing with every
produced token is counted at that length (a lower bound; it only ever understates the source that
was not chosen). The same evidence gives each source's acceptance alone, on the same tokens
(`spec/<source>/alone_accept_len`), beside what the mix got (`spec/accept_len`). Evidence decays
by `memory` at each GRPO step, so a hot-swapped learned drafter or a drifting policy is seen soon.

Cost: the learned proposer runs at every step whatever the mix chooses (its drafter KV must stay in
step), so the mix costs the learned kind's drafting plus the index's; it only changes which tokens
are verified, never how many (a shorter suffix draft is padded with the learned draft's tokens, in
the learned kind's padded batch). Every draft is a point mass (greedy drafting is required), so
vLLM's rejection sampler keeps the target's distribution exactly.

Refresh: distillation for the learned part (as its kind), and every step's rollouts into the index
(as `suffix`). The checkpoint is the learned kind's with `codraft_hybrid` in its config.json.
"""
from __future__ import annotations

import bisect
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codraft.config import ConfigError
from codraft.configfile import from_dict, to_dict
from codraft.drafter import DRAFTERS, Drafter, DrafterMismatch
from drafters._suffix_index import History
from drafters._index_refresh import IndexRefresh, proposer_metrics
from drafters.suffix import SuffixConfig, SuffixProposer

MIXER = "drafters.hybrid.DraftMixer"
SOURCES = ("learned", "suffix")
CONFIDENCE = (0.5, 0.8, 0.95)  # bin edges of a suffix draft's empirical probability


@dataclass(frozen=True)
class HybridConfig:
    learned: str = "eagle3"
    """The learned drafter kind (eagle3, mtp or draft_model)."""
    learned_args: dict[str, Any] = field(default_factory=dict)
    """The learned kind's own settings (its `drafter.args` fields)."""
    suffix: SuffixConfig = SuffixConfig()
    """The suffix index's settings (`drafter.args.suffix.<field>`, as `drafter.args.<field>` of kind suffix)."""
    prior: float = 4.0
    """Pseudo-drafts behind each acceptance estimate before evidence (at 0.5 per-token acceptance)."""
    memory: float = 0.5
    """Evidence kept from one GRPO step to the next (the rest decays away), in (0, 1]."""

    def validate(self, prefix: str = "drafter.args.") -> None:
        kind = DRAFTERS.get(self.learned) if self.learned in DRAFTERS.names() else None
        if kind is None or not kind.learned or issubclass(kind, HybridDrafter):
            learned = [n for n in DRAFTERS.names() if DRAFTERS.get(n).learned and not issubclass(DRAFTERS.get(n), HybridDrafter)]
            raise ConfigError(f"config key '{prefix}learned' must name a learned drafter kind ({', '.join(learned)}), got {self.learned!r}")
        self.learned_settings(prefix)
        self.suffix.validate(f"{prefix}suffix.")
        for key, ok, why in (("prior", self.prior > 0, "must be > 0"), ("memory", 0 < self.memory <= 1, "must be in (0, 1]")):
            if not ok:
                raise ConfigError(f"config key '{prefix}{key}' {why}, got {getattr(self, key)!r}")

    def learned_settings(self, prefix: str = "drafter.args."):
        from codraft.plugins import plugin_settings

        return plugin_settings(DRAFTERS, self.learned, self.learned_args, f"{prefix}learned_args.")


# -------------------------------------------------------------------------------------- drafter
@DRAFTERS.register("hybrid")
class HybridDrafter(IndexRefresh, Drafter):
    """The registered face of the kind. A hybrid drafter is an instance of `paired(<learned class>)`,
    a subclass of both this class and the learned kind's, so everything that distils, exports and
    swaps the learned kind sees it as one; this class adds the index and the mixer's settings."""

    description = "A learned drafter (drafter.args.learned) and the suffix index, the source expected to get more accepted drafting each request at each step; vLLM serves the learned kind, codraft mixes."
    Config = HybridConfig
    reads = ()
    drafts_in_vllm_only = True
    hybrid: HybridConfig

    @classmethod
    def build(cls, policy, settings: HybridConfig, token_counts=None) -> "HybridDrafter":
        learned_cls, learned_settings = settings.learned_settings()
        drafter = learned_cls.build.__func__(paired(learned_cls), policy, learned_settings, token_counts=token_counts)
        return drafter._pair(settings)

    @classmethod
    def from_checkpoint(cls, config: dict, weights: dict, policy) -> "HybridDrafter":
        if not isinstance(config.get("codraft_hybrid"), dict):
            raise DrafterMismatch("a hybrid drafter checkpoint needs `codraft_hybrid` (its settings) in config.json")
        settings = from_dict(HybridConfig, config["codraft_hybrid"], prefix="codraft_hybrid.")
        settings.validate("codraft_hybrid.")
        learned_cls = DRAFTERS.get(settings.learned)
        return learned_cls.from_checkpoint.__func__(paired(learned_cls), config, weights, policy)._pair(settings)

    def _pair(self, settings: HybridConfig) -> "HybridDrafter":
        self.hybrid = settings
        self.history = History(settings.suffix.history_tokens)
        self.evidence: list | None = None  # the mixer's, as of the last step (for a resume)
        return self

    def hf_config(self) -> dict:
        return {**super().hf_config(), "codraft_hybrid": to_dict(self.hybrid)}

    def target_overrides(self) -> dict:
        """The index's and the mixer's settings travel in the target's config (vLLM's worker sees only configs)."""
        return {**super().target_overrides(), "codraft_suffix": to_dict(self.hybrid.suffix), "codraft_mixer": {"class": MIXER, **to_dict(self.hybrid)}}

    def reply_metrics(self, reply: dict) -> dict[str, float]:
        self.evidence = reply.get("evidence")
        return {**proposer_metrics(reply["stats"]), **mix_metrics(reply.get("mix"))}

    def runtime_state(self) -> dict:
        return {**super().runtime_state(), "evidence": self.evidence}

    def restore_update(self, state: dict) -> dict:
        self.evidence = state.get("evidence")
        return {**super().restore_update(state), "evidence": self.evidence}


@functools.cache
def paired(learned_cls: type[Drafter]) -> type[HybridDrafter]:
    """The hybrid class over `learned_cls` (one per learned kind)."""
    return type(f"Hybrid{learned_cls.__name__}", (HybridDrafter, learned_cls), {"__module__": __name__})


def mix_metrics(mix: dict | None) -> dict[str, float]:
    """Per source: the share of drafted rows it drafted, acceptance length on its rows, and alone (on every verified row)."""
    if not mix or not mix["rows"]:
        return {}
    out = {}
    for source in SOURCES:
        chosen, tokens, accepted, alone = mix[source]
        out[f"spec/{source}/share"] = chosen / mix["rows"]
        out[f"spec/{source}/draft_tokens"] = float(tokens)
        out[f"spec/{source}/accepted"] = float(accepted)
        out[f"spec/{source}/accept_len"] = 1 + accepted / chosen if chosen else float("nan")
        out[f"spec/{source}/alone_accept_len"] = 1 + alone / mix["rows"]
    out["spec/proposer_mix_ms_per_step"] = 1e3 * mix["seconds"] / mix["calls"] if mix["calls"] else float("nan")
    return out


# --------------------------------------------------------------------------------- in the worker
class _WithNew:
    """The runner's token rows as they will be after this step's bookkeeping: vLLM proposes for the
    learned kinds before it writes the step's sampled tokens into `token_ids_cpu`, the suffix index
    reads them after. Reads only (row, position) and (row, slice) as `SuffixProposer.propose` does."""

    def __init__(self, ids: np.ndarray, before: np.ndarray, new: list[list[int]]):
        self.ids, self.before, self.new = ids, before, new

    def __getitem__(self, key):
        row, col = key
        start = int(self.before[row])
        if isinstance(col, slice):
            stop = col.stop if col.stop is not None else start + len(self.new[row])
            head = self.ids[row, col.start or 0 : min(stop, start)]
            return np.concatenate([head, np.asarray(self.new[row][: max(0, stop - start)], dtype=head.dtype)])
        return self.new[row][col - start] if col >= start else self.ids[row, col]


class DraftMixer:
    """Built in each worker from the target's config (`codraft_mixer`, `codraft_suffix`); `mix` is
    called with every step's learned drafts, `update` with codraft's pushes (as `SuffixProposer.update`)."""

    def __init__(self, vllm_config):
        spec = vllm_config.speculative_config
        if getattr(spec, "draft_sample_method", "greedy") == "probabilistic":
            raise ValueError("drafter kind hybrid needs point-mass (greedy) drafts; this engine samples its drafts")
        args = dict(vllm_config.model_config.hf_config.codraft_mixer)
        self.prior, self.memory = float(args["prior"]), float(args["memory"])
        self.k = spec.num_speculative_tokens
        self.suffix = SuffixProposer(vllm_config)
        self.evidence = self._no_evidence()  # source -> draft length -> confidence bin -> [drafts, matched]
        self.pending: dict[str, tuple[str, dict[str, tuple[list[int], int]]]] = {}  # request id -> (chosen source, (draft, bin) by source)
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.counts = {s: [0, 0, 0, 0] for s in SOURCES}  # chosen rows, their draft tokens, accepted, matched on every row
        self.rows = self.calls = 0
        self.seconds = 0.0

    def _no_evidence(self) -> dict[str, list]:
        return {s: [[[0.0, 0.0] for _ in range(len(CONFIDENCE) + 1)] for _ in range(self.k + 1)] for s in SOURCES}

    def expect(self, source: str, m: int, confidence: int = 0) -> float:
        drafts, matched = self.evidence[source][m][confidence]
        prior = sum(0.5**i for i in range(1, m + 1))
        return (matched + self.prior * prior) / (drafts + self.prior)

    def mix(self, drafts, sampled, runner, metadata):
        """The drafts to verify next step: `drafts` (the learned proposer's, a [rows, k] tensor or
        lists) with the rows where the suffix draft is expected to do better replaced by it."""
        start = time.perf_counter()
        batch = runner.input_batch
        n = batch.num_reqs
        new = _new_tokens(sampled, n, getattr(getattr(runner, "discard_request_mask", None), "np", None))
        self._score(batch.req_ids[:n], new, metadata.num_draft_tokens if metadata is not None else None)
        before = batch.num_tokens_no_spec[:n]
        suffix = self.suffix.propose(new, before + np.array([len(t) for t in new], dtype=before.dtype), _WithNew(batch.token_ids_cpu, before, new))
        bins = [bisect.bisect_right(CONFIDENCE, p) for p in self.suffix.draft_probs]
        learned = drafts.tolist() if torch.is_tensor(drafts) else [list(d) for d in drafts]
        out = []
        for i, req in enumerate(batch.req_ids[:n]):
            mine, theirs = learned[i], suffix[i][: len(learned[i])] if torch.is_tensor(drafts) else suffix[i][: self.k]
            use = bool(theirs) and (not mine or self.expect("suffix", len(theirs), bins[i]) > self.expect("learned", len(mine)))
            out.append(theirs + mine[len(theirs) :] if use and torch.is_tensor(drafts) else theirs if use else mine)
            if new[i] and (mine or theirs):
                self.pending[req] = ("suffix" if use else "learned", {"learned": (mine, 0), "suffix": (theirs, bins[i])})
        if torch.is_tensor(drafts) and drafts.numel():
            drafts = torch.tensor(out, dtype=drafts.dtype, device=drafts.device)
        elif not torch.is_tensor(drafts):
            drafts = out
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return drafts

    def _score(self, req_ids, new: list[list[int]], verified) -> None:
        """Evidence from the drafts verified this step: for each source, the common prefix of its
        draft (as far as it was verified) with the tokens the engine produced."""
        pending, self.pending = self.pending, {}
        if verified is None:
            return
        for i, req in enumerate(req_ids):
            last = pending.get(req)
            if last is None or not new[i] or not verified[i]:
                continue
            chosen, by_source = last
            self.rows += 1
            for source, (draft, confidence) in by_source.items():
                draft = draft[: verified[i]]
                matched = next((j for j, (d, t) in enumerate(zip(draft, new[i])) if d != t), min(len(draft), len(new[i])))
                counts = self.counts[source]
                counts[3] += matched
                if draft:
                    cell = self.evidence[source][len(draft)][confidence]
                    cell[0] += 1
                    cell[1] += matched
                if source == chosen:
                    counts[0] += 1
                    counts[1] += len(draft)
                    counts[2] += matched

    def update(self, update: dict[str, Any]) -> dict[str, Any]:
        """A push from codraft: as `SuffixProposer.update`, and `evidence` (restore it). A push that
        asks for stats gets the mix's counts (`mix`) and the evidence; "reset" starts the counts
        again and decays the evidence (once per GRPO step)."""
        reply = self.suffix.update(update)
        if update.get("evidence") is not None:
            self.evidence = {s: [[[float(d), float(m)] for d, m in cells] for cells in update["evidence"][s]] for s in SOURCES}
        elif update.get("reset"):
            self.evidence = self._no_evidence()
        if update.get("stats"):
            reply["mix"] = {**{s: list(self.counts[s]) for s in SOURCES}, "rows": self.rows, "calls": self.calls, "seconds": self.seconds}
            if update["stats"] == "reset":
                self._reset_counts()
                self.evidence = {s: [[[d * self.memory, m * self.memory] for d, m in cells] for cells in by_m] for s, by_m in self.evidence.items()}
            reply["evidence"] = self.evidence
        return reply


def _new_tokens(sampled, n: int, discard) -> list[list[int]]:
    """Each row's tokens sampled this step: lists as given, or a padded tensor's non-negative entries;
    none for a row whose sample vLLM discards (a partial prefill)."""
    rows = [list(r) for r in sampled[:n]] if not torch.is_tensor(sampled) else [[t for t in r if t >= 0] for r in sampled[:n].tolist()]
    if discard is not None:
        rows = [[] if discard[i] else r for i, r in enumerate(rows)]
    return rows

