"""Drafter kinds, one module each; importing this package registers them in `codraft.drafter.DRAFTERS`."""
from drafters import draft_model, eagle3, mtp  # noqa: F401
