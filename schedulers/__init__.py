"""Refresh policies, one module each, registered in `codraft.refresh.REFRESH_POLICIES`; the registry
imports every module of this package on first lookup. `codraft policies` lists them with their
config fields (`codraft.refresh.describe_policies`). How to add one: schedulers/README.md.
"""
