"""Pretraining on Ray Train: the driver, the per-worker loop, checkpoints and monitors."""
