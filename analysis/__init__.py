"""Analysis of run outputs (reads only what runs wrote), projections and benchmarks.

Its `codraft` subcommands (`sweep`, `report`, `project`, `compare-rewards`) are declared as entry
points of the group `codraft.commands` in pyproject.toml; `codraft.cli` finds them there, so the
core never imports this package.
"""
