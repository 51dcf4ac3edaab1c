"""Drafter kinds, one module each, registered in `codraft.drafter.DRAFTERS`; the registry imports
every module of this package on first lookup. How to add one: drafters/README.md.
"""
