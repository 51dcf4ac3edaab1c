"""codraft's hooks around the model runner's draft proposal (switching the drafter off, the hybrid
drafter's mixer, pushes to codraft's own proposers), run in each worker through `llm.collective_rpc`;
listed and explained with every other hook in codraft/vllm_compat/__init__.py, which re-exports them."""
from __future__ import annotations

import torch


def set_drafting(worker, enabled: bool) -> bool:
    """Run the drafter at every step (True, vLLM's behaviour) or not at all (False).

    vLLM's proposer runs the drafter's forward pass at every step even where the k-by-batch-size
    table gives k = 0, so that the drafter's KV cache stays in step for when k rises again
    (`vllm/v1/spec_decode/llm_base_proposer.py`, `propose`), and the runner prepares its inputs
    first (`gpu_model_runner.propose_draft_token_ids`). When the table is 0 everywhere no draft is
    ever used, and that work makes a speculative engine slower than a plain one. Off, the runner's
    `propose_draft_token_ids` returns what it returns at k = 0, no drafts, and does nothing else.
    With no drafts scheduled, nothing downstream needs what it skips: the accepted-token counts
    it would record for asynchronous scheduling are the CPU's own (every draft, of none, accepted).
    Returns whether this runner's drafter could be switched."""
    runner = worker.model_runner
    if getattr(runner, "drafter", None) is None or not hasattr(type(runner), "propose_draft_token_ids"):
        return False
    on = runner.__dict__.get("_codraft_propose_on", runner.__dict__.get("propose_draft_token_ids"))  # the draft mixer's, if any
    if enabled:
        runner.__dict__.pop("_codraft_propose_on", None)
        if on is None:
            runner.__dict__.pop("propose_draft_token_ids", None)
        else:
            runner.propose_draft_token_ids = on
        return True

    def propose_draft_token_ids(*args, **kwargs):  # sample_tokens has already cleared the draft state
        return torch.empty(runner.input_batch.num_reqs, 0, device=runner.device, dtype=torch.int64)

    runner._codraft_propose_on = on
    runner.propose_draft_token_ids = propose_draft_token_ids
    return True


def install_draft_mixer(worker) -> bool:
    """Wrap the runner's `propose_draft_token_ids` with the mixer the target's config names
    (`codraft_mixer.class`, built from the vLLM config as vLLM builds a `custom_class` proposer):
    it gets the learned proposer's drafts, this step's sampled tokens, the runner and the step's
    spec-decode metadata, and returns the drafts to verify. Why: vLLM drafts with one method per
    engine, and the hybrid drafter (drafters/hybrid.py) picks per request between two. Returns
    whether a mixer was installed (False for a target without one)."""
    import importlib
    import inspect

    runner = worker.model_runner
    spec = getattr(runner.model_config.hf_config, "codraft_mixer", None)
    if not spec or getattr(runner, "drafter", None) is None:
        return False
    module, _, name = spec["class"].rpartition(".")
    mixer = getattr(importlib.import_module(module), name)(runner.vllm_config)
    original = type(runner).propose_draft_token_ids
    signature = inspect.signature(original)

    def propose_draft_token_ids(*args, **kwargs):
        bound = signature.bind(runner, *args, **kwargs)
        drafts = original(runner, *args, **kwargs)
        return mixer.mix(drafts, bound.arguments["sampled_token_ids"], runner, bound.arguments["spec_decode_metadata"])

    runner.propose_draft_token_ids = propose_draft_token_ids
    runner._codraft_mixer = mixer
    return True


def update_proposer(worker, update: dict):
    """Hand `update` (plain data) to the draft mixer (`install_draft_mixer`) if there is one, else to
    the custom-class proposer vLLM built from `speculative_config.model` (`worker.model_runner.drafter`),
    and return its reply; None if it takes none. Why: a model-free
    drafter's index (drafters/suffix.py) lives in the worker, and a refresh is new data for it."""
    runner = worker.model_runner
    update_fn = getattr(getattr(runner, "_codraft_mixer", None) or getattr(runner, "drafter", None), "update", None)
    return update_fn(update) if callable(update_fn) else None
