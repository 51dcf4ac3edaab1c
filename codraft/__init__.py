"""codraft: adaptive drafter co-training for speculative rollouts in synchronous GRPO."""

__version__ = "0.1.0"
