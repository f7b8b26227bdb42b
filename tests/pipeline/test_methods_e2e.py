"""Every registered method trains one short epoch on real Fashion-MNIST through Ray with
2 workers: finite loss that goes down, and a checkpoint that rebuilds the method."""

import math

import pytest

from pipeline.checkpoint import method_from_checkpoint
from pipeline.config import load_config
from pipeline.train import pretrain
from ssl_models import METHODS


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_through_ray(name, ray_session, fmnist_small, tmp_path):
    config = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"run.name={name}",
            f"method.name={name}",
            f"data.train={fmnist_small['train']}",
            f"data.eval_train={fmnist_small['train']}",
            f"data.eval_test={fmnist_small['test']}",
            "model.backbone=small_cnn",
            "train.batch_size=64",
            "train.epochs=1",
            "train.warmup_epochs=0.1",
            "train.online_knn_bank=0",
        ],
    )
    result = pretrain(config)
    metrics = result.metrics
    assert metrics["step"] == (2048 // 2) // 32
    assert math.isfinite(metrics["loss"])
    if not METHODS[name].uses_image_indices:
        # A memory-bank method's positives are still random bank entries during its first
        # epoch (each image is seen once), so its loss only falls from the second epoch on;
        # tests/ssl_models/test_instdisc.py checks that it learns.
        assert metrics["loss_last_steps"] < metrics["loss_first_steps"], metrics
    method, _, state = method_from_checkpoint(result.checkpoint.path)
    assert type(method) is METHODS[name] and state["epoch"] == 1
