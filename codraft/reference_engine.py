"""A plain-PyTorch rollout engine: slow, simple, exact. Used in tests and where vLLM is absent.

Without a drafter it samples token by token from the policy (temperature, top-p). With a drafter
it runs speculative decoding with `codraft.spec_reference.speculative_step`: the drafter proposes
k tokens (greedily, like vLLM's default, or by sampling), one policy forward over the sequence and
the drafts gives the policy's distributions, and exact rejection sampling decides what is emitted.
Sequences are decoded one at a time and the policy is re-run over the whole prefix each step (no
KV cache): this engine is a reference, not a fast path.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch

from codraft.acceptance import AcceptanceStats
from codraft.drafter import Drafter, Features, target_parts
from codraft.engine import Completion, Generation, RolloutEngine, Sampling, request_seeds
from codraft.engines import ENGINES
from codraft.spec_reference import one_hot_drafts, sample_from, speculative_step


def processed_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The sampling distribution after temperature and top-p. logits [.., V] -> probs [.., V]."""
    if sampling.temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@ENGINES.register("reference")
class ReferenceEngine(RolloutEngine):
    @classmethod
    def build(cls, cfg, policy_dir: Path, drafter=None, drafter_dir: Path | None = None, k_schedule=None) -> ReferenceEngine:
        """Speculates with the drafter's own modules (`drafter_dir` unused); k is fixed
        (`drafter.num_speculative_tokens`), so `k_schedule` is ignored. A drafter that learns nothing
        (suffix), or drafts partly inside vLLM's worker (hybrid), cannot draft here: refused."""
        if drafter is not None and drafter.drafts_in_vllm_only:
            raise ValueError(f"rollout.backend=reference cannot serve drafter kind {drafter.name!r} (it drafts inside vLLM's proposer, not in PyTorch); use rollout.backend=vllm")
        return cls(cfg, policy_dir, drafter_runtime=drafter)

    def __init__(self, cfg, policy_dir: Path, drafter_runtime: Drafter | None = None, probabilistic_drafts: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
        self.eos = AutoTokenizer.from_pretrained(policy_dir).eos_token_id
        self.drafter = copy.deepcopy(drafter_runtime).eval() if drafter_runtime is not None else None
        self.k = cfg.drafter.num_speculative_tokens if self.drafter is not None else 0
        self.probabilistic_drafts = probabilistic_drafts

    def load_policy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.policy.load_state_dict({name: t.detach().float() for name, t in weights})

    def load_drafter_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.drafter.load_serving_weights(weights)

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        logits = self.policy(torch.tensor([token_ids])).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids[1:])[:, None]).squeeze(-1).tolist()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: Sampling, seed: int, seeds: list[int] | None = None) -> Generation:
        seeds = seeds if seeds is not None else request_seeds(seed, len(prompts) * n)
        completions, stats = [], AcceptanceStats.empty(self.k)
        for index, s in enumerate(seeds):
            prompt = prompts[index // n]
            generator = torch.Generator().manual_seed(s)
            if self.drafter is None:
                ids, logps, finished = self._plain(prompt, sampling, generator)
            else:
                ids, logps, finished, step_stats = self._speculative(prompt, sampling, generator)
                stats = stats + step_stats
            completions.append(Completion(index // n, ids, logps, finished))
        return Generation(completions, stats if self.drafter is not None else None)

    def _plain(self, prompt, sampling, generator):
        seq, out, logps = list(prompt), [], []
        while len(out) < sampling.max_new_tokens:
            p = processed_probs(self.policy(torch.tensor([seq])).logits[0, -1], sampling)
            token = int(sample_from(p[None], generator))
            out.append(token)
            logps.append(float(torch.log(p[token])))
            seq.append(token)
            if token == self.eos:
                return out, logps, True
        return out, logps, False

    def _propose(self, seq: list[int], hidden, k: int):
        """k drafted tokens after `seq` and their draft distributions [k, V] (seq ends with the newest token)."""
        parts = target_parts(self.policy)
        drafts, qs = [], []
        m = len(seq) - 2  # the chain starts at the last row with target features
        for j in range(k):
            ids = torch.tensor([seq + drafts])
            T = ids.shape[1]
            feats = Features(ids, torch.ones_like(ids), self._pad(hidden, "aux", T), self._pad(hidden, "last", T))
            outs = self.drafter.unroll(feats, parts, steps=j + 1)
            logits, shift = outs[-1] if len(outs) > 1 else outs[0]
            row = m if shift > 0 else T - 1  # draft models read their own last row
            q = torch.softmax(logits[0, row].float(), -1)
            token = int(sample_from(q[None])) if self.probabilistic_drafts else int(q.argmax())
            drafts.append(token)
            qs.append(q)
        return drafts, torch.stack(qs)

    def _pad(self, hidden, kind, T):
        value = hidden.get(kind)
        if value is None:
            return None
        out = torch.zeros(1, T, value.shape[-1])
        out[0, : value.shape[1]] = value[0, :T]
        return out

    def _features(self, out) -> dict:
        d = self.drafter
        hs = out.hidden_states
        return {
            "aux": torch.cat([hs[layer] for layer in d.aux_layers], -1).float() if d.aux_layers else None,
            "last": hs[-1].float() if d.needs_last else None,
        }

    def _speculative(self, prompt, sampling, generator):
        out_ids, logps = [], []
        stats = AcceptanceStats.empty(self.k)
        first = self.policy(torch.tensor([prompt]), output_hidden_states=True)
        p0 = processed_probs(first.logits[0, -1], sampling)
        token = int(sample_from(p0[None], generator))
        out_ids.append(token)
        logps.append(float(torch.log(p0[token])))
        seq, hidden = list(prompt) + [token], self._features(first)
        while token != self.eos and len(out_ids) < sampling.max_new_tokens:
            drafts, q = self._propose(seq, hidden, self.k)
            verify = self.policy(torch.tensor([seq + drafts]), output_hidden_states=True)
            p = processed_probs(verify.logits[0, len(seq) - 1 :], sampling)  # [k+1, V]
            q_used = q if self.probabilistic_drafts else one_hot_drafts(torch.tensor(drafts), p.shape[-1])
            step = speculative_step(p[None], q_used[None], torch.tensor([drafts]), generator)
            a = int(step.num_accepted[0])
            stats = stats + AcceptanceStats(1, self.k, a, tuple(int(i < a) for i in range(self.k)))
            emitted = step.tokens[0, : a + 1].tolist()
            for i, t in enumerate(emitted):
                out_ids.append(t)
                logps.append(float(torch.log(p[i, t])))
                if t == self.eos or len(out_ids) >= sampling.max_new_tokens:
                    break
            token = out_ids[-1]
            seq = list(prompt) + out_ids
            hidden = {k: (v[:, : len(seq) - 1] if v is not None else None) for k, v in self._features(verify).items()}
        return out_ids, logps, token == self.eos, stats
