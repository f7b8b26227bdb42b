"""Hyperparameter search spaces for Ray Tune, one module per method family.

Sweeps arrive with the `tune` command; until then this package holds no spaces.
"""
