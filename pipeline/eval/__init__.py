"""Evaluating a checkpoint: embeddings, kNN, linear probe and fine-tuning, pictures and the
report."""
