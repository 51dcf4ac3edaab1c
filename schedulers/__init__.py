"""Refresh policies, one module each; importing this package registers them all in
`codraft.refresh.REFRESH_POLICIES`. `codraft policies` lists them with their config fields
(`codraft.refresh.describe_policies`). How to add one: schedulers/README.md.
"""
from schedulers import adaptive_k, cost_benefit, drift, every_n, never, threshold  # noqa: F401
