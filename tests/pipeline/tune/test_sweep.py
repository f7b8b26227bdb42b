"""Ray Tune sweeps: concurrency from resources, bad sweeps stop before Ray, and a real
4-trial ASHA sweep on Fashion-MNIST writes its table, plot and a best config that
`pretrain` accepts; an interrupted sweep resumes and finishes."""

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from ray import tune
from ray.air.integrations.wandb import WandbLoggerCallback

import pipeline.tune.sweep as sweep_module
from pipeline.config import load_config
from pipeline.tune.mlflow_trials import OneRunPerTrial
from pipeline.tune.sweep import (
    SweepSettings,
    sweep,
    sweep_dir,
    tracker_callbacks,
    trial_concurrency,
)
from tune_spaces import SpaceError


def _config(fmnist_small, tmp_path, *extra: str):
    return load_config(
        None,
        [
            f"run.root={tmp_path / 'runs'}",
            "run.name=sweep",
            f"data.train={fmnist_small['train']}",
            f"data.eval_train={fmnist_small['train']}",
            f"data.eval_test={fmnist_small['test']}",
            "data.limit=384",
            "data.decode_tasks=1",
            "model.backbone=small_cnn",
            "model.width=0.25",
            "train.batch_size=64",
            "train.num_workers=1",
            "train.epochs=2",
            "train.warmup_epochs=0",
            "train.online_knn_bank=256",
            "train.online_knn_queries=128",
            *extra,
        ],
    )


SPACE = {
    "method.temperature": {"loguniform": [0.05, 0.5]},
    "train.base_lr": {"loguniform": [0.05, 1.0]},
}


def test_concurrency_leaves_a_cpu_per_trial_for_its_data_stage(tmp_path):
    config = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=1"])
    assert trial_concurrency(config, {"CPU": 4}) == 1  # 2 workers + 1 data CPU each
    assert trial_concurrency(config, {"CPU": 9}) == 3
    half = load_config(None, ["train.num_workers=2", "train.cpus_per_worker=0.5"])
    assert trial_concurrency(half, {"CPU": 4}) == 2
    gpu = load_config(None, ["train.num_workers=2", "train.use_gpu=true"])
    assert trial_concurrency(gpu, {"CPU": 64, "GPU": 4}) == 2
    assert trial_concurrency(config, {"CPU": 1}) == 1  # never zero


def test_bad_sweeps_stop_before_ray_starts(fmnist_small, tmp_path, monkeypatch):
    def no_ray():
        raise AssertionError("Ray was started for an invalid sweep")

    monkeypatch.setattr(sweep_module, "init_ray", no_ray)
    config = _config(fmnist_small, tmp_path)
    with pytest.raises(SpaceError, match="method.temperature = 0.0"):
        sweep(config, {"method.temperature": {"uniform": [0.0, 1.0]}}, SweepSettings())
    with pytest.raises(SpaceError, match="search must be one of"):
        sweep(config, SPACE, SweepSettings(search="grid"))
    with pytest.raises(SpaceError, match="online_knn_bank is 0"):
        sweep(_config(fmnist_small, tmp_path, "train.online_knn_bank=0"), SPACE, SweepSettings())
    with pytest.raises(SpaceError, match="sweep name '../up'"):
        sweep(config, SPACE, SweepSettings(name="../up"))
    with pytest.raises(FileNotFoundError, match="no sweep to resume"):
        sweep(config, SPACE, SweepSettings(), resume=True)


def test_tracker_callbacks_log_each_trial_into_the_runs_experiment(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    directory = str(tmp_path / "sweeps" / "s")
    assert tracker_callbacks(load_config(None, []), directory) == []  # TensorBoard: per trial
    config = load_config(
        None,
        [
            "run.trackers=[mlflow, wandb]",
            "run.tracking_uri=sqlite:///m.db",
            "run.experiment=sweeps",
        ],
    )
    monkeypatch.chdir(tmp_path)
    mlflow, wandb = tracker_callbacks(config, directory)
    assert isinstance(mlflow, OneRunPerTrial) and mlflow.experiment_name == "sweeps"
    assert mlflow.tracking_uri == f"sqlite:///{tmp_path}/m.db" and mlflow.tags == {"sweep": "s"}
    assert isinstance(wandb, WandbLoggerCallback)
    assert (wandb.project, wandb.group) == ("sweeps", "s")
    assert wandb.kwargs == {"dir": directory, "mode": "offline"}  # the logging actors' too


class _InterruptAfterFirstTrial(tune.Callback):
    """Ctrl-C once the first trial has finished: Tune saves its state and returns.

    Fires once per test process: the restored sweep unpickles this callback too."""

    fired = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not _InterruptAfterFirstTrial.fired:
            _InterruptAfterFirstTrial.fired = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_sweep_runs_asha_writes_results_and_resumes(
    ray_session, fmnist_small, tmp_path, mlflow_server
):
    experiment = f"sweep-{tmp_path.name}"
    config = _config(
        fmnist_small,
        tmp_path,
        "run.trackers=[tensorboard, mlflow]",
        f"run.tracking_uri={mlflow_server}",
        f"run.experiment={experiment}",
    )
    settings = SweepSettings(samples=3, concurrency=2, grace_epochs=1, name="s")
    directory = Path(sweep_dir(config, settings))

    first = sweep(config, SPACE, settings, callbacks=[_InterruptAfterFirstTrial()])
    done = [r for r in first if not r["status"].startswith("unfinished")]
    assert 1 <= len(done) < 3, first

    rows = sweep(config, SPACE, settings, resume=True)
    assert len(rows) == 3
    assert all(not r["status"].startswith("ERROR") for r in rows), rows
    assert all(1 <= r["epochs"] <= 2 for r in rows)
    assert all(0.1 < r["best_knn_top1"] <= 1.0 for r in rows)  # above 10-class chance
    assert rows[0]["best_knn_top1"] == max(r["best_knn_top1"] for r in rows)

    table = pd.read_csv(directory / "results.csv")
    assert list(table.columns) == [
        "trial",
        "method.temperature",
        "train.base_lr",
        "epochs",
        "best_knn_top1",
        "status",
        "failures",
    ]
    assert len(table) == 3 and len(pd.read_parquet(directory / "results.parquet")) == 3
    assert (directory / "metric_vs_params.png").stat().st_size > 1000

    best = load_config(directory / "best_config.yaml")  # pretrain accepts it unchanged
    assert best.method["temperature"] == pytest.approx(rows[0]["method.temperature"])
    assert best.train.base_lr == pytest.approx(rows[0]["train.base_lr"])
    assert best.data.limit == 384 and best.run.name == "s-best"

    # One MLflow run per trial, in one experiment, the interrupted trials' included.
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 3
    for row in rows:
        [run] = [r for r in runs if r.data.tags["trial_name"].endswith(row["trial"])]
        assert run.data.tags["sweep"] == "s" and run.info.status == "FINISHED"
        assert float(run.data.params["train.base_lr"]) == pytest.approx(row["train.base_lr"])
        knn = client.get_metric_history(run.info.run_id, "knn_top1")
        assert sorted(m.step for m in knn) == list(range(1, row["epochs"] + 1))
        assert max(m.value for m in knn) == pytest.approx(row["best_knn_top1"])
    # The trials' own pretraining opened no MLflow run: they kept TensorBoard only.
    assert not list((directory / "trials").glob("*/trackers.json"))
    assert list((directory / "trials").glob("*/tensorboard"))


@pytest.mark.slow
def test_a_failing_trial_is_retried_then_reported_not_dropped(ray_session, fmnist_small, tmp_path):
    config = _config(fmnist_small, tmp_path, "train.epochs=1")
    # Valid as a config, but 384 images hold no full batch of 1024: the trial itself fails.
    space = {**SPACE, "train.batch_size": {"choice": [1024]}}
    settings = SweepSettings(samples=1, retries=1, name="failing")
    rows = sweep(config, space, settings)
    assert len(rows) == 1 and rows[0]["status"].startswith("ERROR"), rows
    assert rows[0]["epochs"] == 0 and rows[0]["failures"] == 2  # first try + 1 retry
    directory = Path(sweep_dir(config, settings))
    assert "ERROR" in pd.read_csv(directory / "results.csv")["status"][0]
    assert not (directory / "best_config.yaml").exists()
