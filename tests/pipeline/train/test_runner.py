"""The worker loop's phases on one CPU worker without a Ray cluster: DDP preparation, Ray
Train's checkpoint and report calls are stand-ins, the data is the synthetic batch."""

import math
import pickle
import time

import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.data.ingest import ImageSpec
from pipeline.train.checkpoint import CHECKPOINT_FILE, load_checkpoint
from pipeline.train.runner import EpochRecord, LoopConfig, TrainLoopRunner
from ssl_models.batch_norm import GlobalBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 3


def _loop(tmp_path, epochs: int, *extra: str) -> LoopConfig:
    config = load_config(
        None,
        [
            f"run.root={tmp_path}",
            "model.backbone=small_cnn",
            "model.width=0.25",
            "data.synthetic=true",
            "train.batch_size=8",
            f"train.epochs={epochs}",
            "train.warmup_epochs=0",
            "train.log_every_steps=2",
            "train.online_knn_bank=0",
            *extra,
        ],
    )
    return LoopConfig(
        config=config,
        spec=ImageSpec(28, 1),
        mean=[0.3],
        std=[0.35],
        steps_per_epoch=STEPS_PER_EPOCH,
        num_images=64,
        num_classes=10,
        started_at=time.time(),
        run_dir=str(tmp_path / "run"),
        ledger=None,
    )


def test_the_loop_config_travels_as_its_fields(tmp_path):
    loop = _loop(tmp_path, epochs=1)
    as_dict = loop.as_train_loop_config()
    assert LoopConfig(**as_dict) == loop
    assert pickle.loads(pickle.dumps(as_dict)) == as_dict  # what Ray sends each worker


def test_run_reports_each_epoch_with_rank_0s_checkpoint_and_resumes(ray_train, tmp_path):
    TrainLoopRunner(_loop(tmp_path, epochs=2), 0, 1, torch.device("cpu")).run()
    (first, _), (second, kept) = ray_train["reports"]
    assert [first["epoch"], second["epoch"]] == [1, 2]
    assert second["step"] == 2 * STEPS_PER_EPOCH and second["resumed_from_epoch"] == 0
    assert list(second)[:6] == [
        "epoch",
        "resumed_from_epoch",
        "step",
        "loss",
        "loss_first_steps",
        "loss_last_steps",
    ]
    assert list(second)[-3:] == ["images_per_s", "epoch_seconds", "seconds_to_first_step"]
    assert math.isfinite(second["loss"]) and second["seconds_to_first_step"] > 0
    state = load_checkpoint(kept / CHECKPOINT_FILE)
    assert state.epoch == 2 and state.step == 2 * STEPS_PER_EPOCH
    assert state.metrics == second and state.image_size == 28 and state.mean == [0.3]
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # rank 0's events

    ray_train["resume_from"] = kept
    runner = TrainLoopRunner(_loop(tmp_path, epochs=3), 0, 1, torch.device("cpu"))
    runner.run()
    assert (runner.start_epoch, runner.step) == (2, 3 * STEPS_PER_EPOCH)
    resumed, _ = ray_train["reports"][-1]
    assert resumed["epoch"] == 3 and resumed["resumed_from_epoch"] == 2
    assert len(ray_train["reports"]) == 3  # one more epoch, not three


def test_a_stream_that_ends_early_warns_and_reports_nan(ray_train, tmp_path, capsys):
    runner = TrainLoopRunner(_loop(tmp_path, epochs=1), 0, 1, torch.device("cpu"))
    runner.setup()
    runner.restore()
    record = runner.train_epoch(0, iter([]))
    assert record.steps == 0
    metrics = runner.end_epoch(0, record)
    assert "stream ended after 0 of 3 steps in epoch 1" in capsys.readouterr().out
    assert math.isnan(metrics["loss"]) and metrics["images_per_s"] == 0


def test_other_ranks_report_without_a_checkpoint(ray_train, tmp_path):
    runner = TrainLoopRunner(_loop(tmp_path, epochs=1), 1, 2, torch.device("cpu"))
    runner.setup()
    assert runner.trackers is None  # TensorBoard (every tracker) is rank 0's
    runner.save(0, runner.end_epoch(0, EpochRecord()))
    [(metrics, kept)] = ray_train["reports"]
    assert metrics["epoch"] == 1 and kept is None


@pytest.mark.parametrize(
    ("overrides", "global_bn"),
    [
        ([], True),  # SimCLR's paper: global BN
        (["model.sync_bn=false"], False),
        (["method.name=simsiam"], False),
        (["method.name=simsiam", "model.sync_bn=true"], True),
    ],
)
def test_global_batch_norm_follows_the_paper_unless_model_sync_bn_says(
    ray_train, tmp_path, overrides, global_bn
):
    runner = TrainLoopRunner(_loop(tmp_path, 1, *overrides), 0, 1, torch.device("cpu"))
    runner.setup()
    norms = [m for m in runner.method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlobalBatchNorm) == global_bn for m in norms)
