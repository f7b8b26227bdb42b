"""Every registered method trains one short epoch on real Fashion-MNIST through Ray with
2 workers: finite loss that goes down, pretext accuracy above chance, and a checkpoint that
rebuilds the method. Methods that take multi-crop's local views get two, so the data stage
ships views of two sizes; pretext tasks' views and targets come from the data stage too."""

import math

import pytest

from pipeline.checkpoint import method_from_checkpoint
from pipeline.config import load_config
from pipeline.ingest import dataset_rows
from pipeline.train import pretrain
from ssl_models import METHODS

# Methods whose first-epoch loss rises by design while a store of past embeddings fills:
# the random initial entries of MoCo v2's queue are easy negatives, and InstDisc's positives
# are random bank entries until each image has been seen once. Their unit tests check that
# they learn (test_moco_v2.py once the queue is full, test_instdisc.py by instance margins).
FILLS_A_STORE_FIRST = {"moco_v2", "instdisc", "pirl"}
# Colorization's loss weights each pixel by its colour's rarity among the bins counted so
# far: the weights move while the counts fill, so the loss is not comparable across the
# first steps (test_colorization.py checks it falls over longer training); its pixel
# accuracy is.
REWEIGHTS_WHILE_COUNTING = {"colorization"}
# Exemplar CNN's classes are the images: one epoch shows each class once, so its loss can
# only fall from the second epoch on (test_exemplar.py trains it over repeated seeds).
ONE_EPOCH_PER_CLASS = {"exemplar"}
# DINO's loss first rises towards log K: the centre flattens the teacher's initial output
# (its entropy climbs to ~log K) before the teacher sharpens again. A run of the official
# ViT-S/16 recipe (facebookresearch/dino#76) logs 7.7 in epoch 0, 9.6 in epoch 1, then less;
# test_dino.py checks the loss, centre and schedules by hand.
RISES_WHILE_CENTRING = {"dino"}
# Masked-image modelling (MAE, SimMIM) masks a ViT's patch tokens: a quarter-width vit_tiny.
BACKBONES = {"mae": "vit_tiny", "simmim": "vit_tiny"}
# DeepCluster with 10 clusters of ~200 of the 2048 images, so that 32 steps can move the
# loss (the default 100 would give ~20 images per cluster).
OVERRIDES = {
    "deepcluster": ["method.num_clusters=10"],
    "jigsaw": ["method.num_permutations=10"],
}
# Pretext accuracy (the epoch mean the run reports) must beat chance on the one epoch.
CHANCE = {
    "rotation": {"method_pretext_accuracy": 1 / 4},
    "relative_patch": {"method_pretext_accuracy": 1 / 8},
    "jigsaw": {"method_pretext_accuracy": 1 / 10},
    "colorization": {"method_pretext_accuracy": 1 / 261},
    "multitask": {
        "method_rotation/pretext_accuracy": 1 / 4,
        "method_relative_patch/pretext_accuracy": 1 / 8,
    },
}
# Colorization predicts colour from lightness: it trains on class-tinted RGB Fashion-MNIST.
COLOUR = {"colorization"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_through_ray(name, ray_session, request, tmp_path):
    data = request.getfixturevalue("fmnist_colour_small" if name in COLOUR else "fmnist_small")
    config = load_config(
        None,
        [
            f"run.root={tmp_path}",
            f"run.name={name}",
            f"method.name={name}",
            f"data.train={data['train']}",
            f"data.eval_train={data['train']}",
            f"data.eval_test={data['test']}",
            f"model.backbone={BACKBONES.get(name, 'small_cnn')}",
            "model.width=0.25",
            "train.batch_size=64",
            "train.epochs=1",
            "train.warmup_epochs=0.1",
            "train.online_knn_bank=0",
            f"augment.local_crops={2 if METHODS[name].takes_local_views else 0}",
            *OVERRIDES.get(name, []),
        ],
    )
    result = pretrain(config)
    metrics = result.metrics
    assert metrics["step"] == (dataset_rows(data["train"], None) // 2) // 32
    assert math.isfinite(metrics["loss"])
    if name not in (
        FILLS_A_STORE_FIRST | RISES_WHILE_CENTRING | ONE_EPOCH_PER_CLASS | REWEIGHTS_WHILE_COUNTING
    ):
        assert metrics["loss_last_steps"] < metrics["loss_first_steps"], metrics
    for key, chance in CHANCE.get(name, {}).items():
        assert metrics[key] > chance, (key, metrics)
    method, _, state = method_from_checkpoint(result.checkpoint.path)
    assert type(method) is METHODS[name] and state["epoch"] == 1
