"""The worker loop's Ray Train calls replaced, for the runner's tests without a cluster."""

import shutil

import pytest
import ray.train
import ray.train.torch


@pytest.fixture
def ray_train(monkeypatch, tmp_path):
    """Ray Train's worker API replaced: no DDP wrapper, a checkpoint to resume from when
    ``resume_from`` is set, and every report kept (rank 0's checkpoint copied out)."""
    calls = {"reports": [], "resume_from": None}

    def report(metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:
            kept = tmp_path / f"kept_{len(calls['reports'])}"
            shutil.copytree(checkpoint.path, kept)
        calls["reports"].append((metrics, kept))

    def get_checkpoint():
        resume = calls["resume_from"]
        return None if resume is None else ray.train.Checkpoint.from_directory(str(resume))

    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **_: model)
    monkeypatch.setattr(ray.train, "get_checkpoint", get_checkpoint)
    monkeypatch.setattr(ray.train, "report", report)
    return calls
