"""Hyperparameter sweeps: Ray Tune around pretraining."""
