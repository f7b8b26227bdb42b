"""End to end on real Fashion-MNIST: pretrain 1 epoch with 2 workers, resume, evaluate."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli.runs import save_results
from pipeline.config import ConfigError, load_config
from pipeline.eval.evaluate import evaluate_checkpoint, load_eval_context
from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.train.driver import pretrain, run_dir
from pipeline.train.views import view_recipes
from ssl_models import METHODS
from ssl_models.method import MethodRequirements


def _config(fmnist_small, tmp_path, epochs: int, *extra: str):
    return load_config(
        None,
        [
            f"run.root={tmp_path / 'runs'}",
            "run.name=e2e",
            f"data.train={fmnist_small['train']}",
            f"data.eval_train={fmnist_small['train']}",
            f"data.eval_test={fmnist_small['test']}",
            "model.backbone=small_cnn",
            "train.batch_size=128",
            "train.num_workers=2",
            f"train.epochs={epochs}",
            "train.log_every_steps=4",
            "train.online_knn_bank=500",
            "train.online_knn_queries=200",
            *extra,
        ],
    )


@pytest.mark.slow
def test_pretrain_checkpoints_resumes_and_evaluates(
    ray_session, fmnist_small, tmp_path, mlflow_server
):
    experiment = f"e2e-{tmp_path.name}"
    tracked = [
        "run.trackers=[tensorboard, mlflow]",
        f"run.tracking_uri={mlflow_server}",
        f"run.experiment={experiment}",
    ]
    first = pretrain(_config(fmnist_small, tmp_path, 1, *tracked))
    steps_per_epoch = (2048 // 2) // 64
    assert first.metrics["epoch"] == 1 and first.metrics["resumed_from_epoch"] == 0
    state = load_checkpoint(first.checkpoint.path)
    assert state.epoch == 1 and state.step == steps_per_epoch
    assert state.online_probe["head"]  # resumed with the run, like the method's state
    assert 0.0 <= first.metrics["knn_top1"] <= 1.0
    assert 0.15 < first.metrics["probe_top1"] <= 1.0  # 10 classes: chance is 0.1
    report = json.loads((tmp_path / "runs" / "e2e" / "ingest_report.json").read_text())
    assert report["1"]["rows"] == report["1"]["delivered"] == 2048
    assert report["1"]["rejected"] == 0

    second = pretrain(_config(fmnist_small, tmp_path, 2, *tracked))
    assert second.metrics["resumed_from_epoch"] == 1, "the rerun started over"
    assert second.metrics["epoch"] == 2
    latest = latest_checkpoint(run_dir(_config(fmnist_small, tmp_path, 2)))
    state = load_checkpoint(latest)
    assert state.epoch == 2 and state.step == 2 * steps_per_epoch

    with load_eval_context(latest) as context:
        rows = evaluate_checkpoint(context, floors=True, k=20).rows
        save_results(latest, context, {"knn": {"top1": rows[0].top1, "top5": rows[0].top5}})
    assert [r.name.split()[0] for r in rows] == ["SSL", "raw", "random-init"]
    for row in rows:
        assert 0.1 < row.top1 <= row.top5 <= 1.0  # well above 10-class chance

    # Rank 0 logged both epochs, the resume included, and the evaluation into one MLflow run.
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.params["train.batch_size"] == "128" and run.info.run_name == "e2e"
    knn = client.get_metric_history(run.info.run_id, "knn_top1")
    assert [(m.step, m.value) for m in knn] == [
        (1, pytest.approx(first.metrics["knn_top1"])),
        (2, pytest.approx(second.metrics["knn_top1"])),
    ]
    [evaluated] = client.get_metric_history(run.info.run_id, "eval/knn/top1")
    assert evaluated.step == 2 and evaluated.value == pytest.approx(rows[0].top1)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == [
        "evaluation/eval.json"
    ]


@pytest.mark.slow
def test_views_drawn_on_the_device_train_and_a_non_finite_loss_keeps_their_checkpoint(
    ray_session, fmnist_small, tmp_path
):
    """A run whose views are drawn on the train device (the synthetic ceiling trains in
    tests/benchmarks/test_training), then its continuation at an exploding rate: that one
    stops on the non-finite loss and the first run's checkpoint is kept. One test, so the
    two share a run instead of paying Ray Train's start-up twice."""
    on_device = ("augment.on_train_device=true", "train.online_knn_bank=0")
    result = pretrain(_config(fmnist_small, tmp_path, 1, *on_device))
    steps_per_epoch = (2048 // 2) // 64
    assert result.metrics["step"] == steps_per_epoch
    assert result.metrics["loss_last_steps"] < result.metrics["loss_first_steps"]
    assert result.metrics["seconds_to_first_step"] > 0

    exploding = _config(
        fmnist_small,
        tmp_path,
        2,
        *on_device,
        "train.max_failures=0",
        "train.base_lr=1e30",
        "train.warmup_epochs=0",
    )
    with pytest.raises(Exception, match=r"loss became (nan|inf).*last good checkpoint is kept"):
        pretrain(exploding)
    state = load_checkpoint(latest_checkpoint(run_dir(exploding)))
    assert state.epoch == 1
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


def _train_workers() -> set[int]:
    """This session's Ray Train worker processes (the local raylet is our child), never
    those of another Ray instance on the machine."""
    workers = set()
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.cmdline()[:1] == ["ray::RayTrainWorker"]:
                workers.add(proc.pid)
    return workers


def _kill_a_train_worker_after_first_checkpoint(
    run: Path, earlier: set[int], killed: list[int]
) -> None:
    """Wait until Ray Train has registered epoch 1's checkpoint, then SIGKILL one of this
    run's Train workers (not one left over from an earlier test)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready = (run / "checkpoint_manager_snapshot.json").exists()
        ours = _train_workers() - earlier if ready else set()
        if ours:
            victim = min(ours)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(
    ray_session, fmnist_small, tmp_path
):
    config = _config(
        fmnist_small,
        tmp_path,
        3,
        "train.max_failures=1",
        "train.online_knn_bank=0",
        "model.backbone=resnet18",  # slow enough (about 6 s an epoch) to be killed mid-run
    )
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_a_train_worker_after_first_checkpoint,
        args=(Path(run_dir(config)), _train_workers(), killed),
    )
    killer.start()
    result = pretrain(config)
    killer.join()
    assert killed, "no worker was killed"
    assert result.metrics["epoch"] == 3 and result.metrics["resumed_from_epoch"] >= 1
    state = load_checkpoint(latest_checkpoint(run_dir(config)))
    assert state.step == 3 * (2048 // 2) // 64
    # The restarted stream skipped the trained passes and counted each epoch once.
    report = json.loads((Path(run_dir(config)) / "ingest_report.json").read_text())
    assert {report[e]["delivered"] for e in ("1", "2", "3")} == {2048}


def test_bad_shards_stop_pretraining_before_ray_starts(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shards import ShardError

    monkeypatch.setattr("pipeline.train.driver.init_ray", lambda: pytest.fail("Ray was started"))

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"id": ["a"], "pixels": [b"x"]}), bad / "part-00000.parquet")
    config = load_config(
        None,
        [f"data.{split}={bad}" for split in ("train", "eval_train", "eval_test")]
        + [f"run.root={tmp_path}"],
    )
    with pytest.raises(ShardError, match="part-00000.parquet: missing column 'image'"):
        pretrain(config)


def test_a_method_needing_colour_refuses_grayscale_shards_before_ray_starts(
    fmnist_small, tmp_path, monkeypatch
):
    monkeypatch.setattr("pipeline.train.driver.init_ray", lambda: pytest.fail("Ray was started"))
    colour = MethodRequirements(input_channels=3)
    monkeypatch.setattr(METHODS["simclr"], "requirements", classmethod(lambda cls, _: colour))
    config = _config(fmnist_small, tmp_path, 1)
    with pytest.raises(ValueError, match="'simclr' needs 3-channel images, but .* 1-channel"):
        pretrain(config)


def test_a_multitask_run_with_a_colour_task_refuses_grayscale_shards_before_ray_starts(
    fmnist_small, tmp_path, monkeypatch
):
    monkeypatch.setattr("pipeline.train.driver.init_ray", lambda: pytest.fail("Ray was started"))
    config = _config(
        fmnist_small, tmp_path, 1, "method.name=multitask", "method.tasks=[rotation,colorization]"
    )
    with pytest.raises(ValueError, match="'multitask' needs 3-channel images, but .* 1-channel"):
        pretrain(config)


def test_run_dir_is_absolute_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["run.root=runs", "run.name=abc"])
    assert run_dir(config) == f"{tmp_path}/runs/abc"


def test_view_recipes_are_the_methods_global_views_then_the_local_crops(monkeypatch):
    config = load_config(None, ["augment.crop_scale_min=0.4", "augment.strength=1.0"])
    two = view_recipes(config, 28)
    assert len(two) == 2 and two[0] == two[1]
    assert two[0].size == 28 and two[0].crop_scale == (0.4, 1.0) and two[0].brightness == 0.8
    # A method that takes multi-crop's local views gets them after its global ones; the
    # local side defaults to the papers' 96/224 of the global side.
    multi_crop = MethodRequirements(local_views=True)
    monkeypatch.setattr(METHODS["simclr"], "requirements", classmethod(lambda cls, _: multi_crop))
    config = load_config(None, ["augment.local_crops=3", "augment.local_crop_scale_max=0.3"])
    views = view_recipes(config, 28)
    assert [v.size for v in views] == [28, 28, 12, 12, 12]
    assert views[2].crop_scale == (0.05, 0.3) and views[2].brightness == views[0].brightness
    config = load_config(None, ["augment.local_crops=1", "augment.local_size=16"])
    assert view_recipes(config, 224)[-1].size == 16


def test_each_method_gets_its_papers_views_and_augment_views_overrides_them():
    simclr = view_recipes(load_config(None, ["augment.blur_prob=0.5"]), 28)
    assert simclr[0] == simclr[1] and simclr[0].blur_prob == 0.5  # symmetric
    for method in ("byol", "barlow_twins", "vicreg", "moco_v3"):
        first, second = view_recipes(load_config(None, [f"method.name={method}"]), 28)
        assert (first.blur_prob, first.solarize_prob) == (1.0, 0.0), method
        assert (second.blur_prob, second.solarize_prob) == (0.1, 0.2), method
        assert first.crop_scale == second.crop_scale == (0.2, 1.0)  # the rest is the section's
    dino = view_recipes(load_config(None, ["method.name=dino", "augment.local_crops=2"]), 28)
    assert [(v.size, v.blur_prob, v.solarize_prob) for v in dino] == [
        (28, 1.0, 0.0),
        (28, 0.1, 0.2),
        (12, 0.5, 0.0),
        (12, 0.5, 0.0),
    ]
    # --set augment.views replaces the paper's list: here a symmetric BYOL.
    overridden = load_config(
        None, ["method.name=byol", "augment.views=[{blur_prob: 0.5}, {blur_prob: 0.5}]"]
    )
    first, second = view_recipes(overridden, 28)
    assert first == second and first.blur_prob == 0.5 and first.solarize_prob == 0.0


@pytest.mark.parametrize(
    ("views", "message"),
    [
        ("[{blur_prob: 0.5}]", r"'augment\.views' must have 2 entries"),
        ("[{}, {blur_prob: 2}]", r"'augment\.views\[1\]\.blur_prob' must be a probability"),
        ("[{}, {sharpen: 1}]", r"unknown config key 'augment\.views\[1\]\.sharpen'"),
        ("[{}, {solarize_prob: high}]", r"'augment\.views\[1\]\.solarize_prob' must be a number"),
        ("[{}, 3]", r"'augment\.views\[1\]' must be a mapping"),
    ],
)
def test_bad_per_view_settings_name_the_view_and_key(views, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method.name=byol", f"augment.views={views}"])


def test_train_keeps_the_training_streams_read_ahead_bound(ray_session, fmnist_small):
    """Train replaces a dataset's execution options with the driver's unless told; the
    training stream's object-store bound must reach the executor that Train builds."""
    from pipeline.data.ingest import ImageSpec, training_dataset
    from pipeline.train.driver import own_execution_options

    stream = training_dataset(fmnist_small["train"], ImageSpec(28, 1), None, epochs=5)
    bound = stream.context.execution_options.resource_limits.object_store_memory
    assert bound < 1 << 30
    resolved = own_execution_options({"train": stream})._resolve_execution_options("train")
    assert resolved.resource_limits.object_store_memory == bound
