"""Experiment tracking without a Ray cluster: the worker loop (Ray Train's calls replaced, see
conftest) logs into a real MLflow server on loopback and into W&B in offline mode; a resumed
run, its evaluation and its model card land in the same MLflow and W&B runs."""

import importlib.util
import json
import math
import struct
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import pipeline.config
from pipeline.config import (
    ConfigError,
    absolute_tracking_uri,
    check_trackers_installed,
    load_config,
    with_absolute_paths,
)
from pipeline.train.driver import pretrain
from pipeline.train.runner import TrainLoopRunner
from pipeline.train.trackers import (
    TRACKERS_FILE,
    RunTrackers,
    flat_params,
    log_evaluation,
    log_model_card,
)
from tests.pipeline.train.test_runner import STEPS_PER_EPOCH, _loop

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def wandb_dir(monkeypatch, tmp_path) -> Path:
    """W&B in offline mode, writing under a temporary directory (returned)."""
    directory = tmp_path / "wandb-files"
    directory.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return directory


def wandb_records(path: Path):
    """The records of an offline run's ``run-<id>.wandb`` log: W&B's LevelDB-style format,
    a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last), each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            return
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_runs(directory: Path) -> dict[str, list]:
    """Each offline run directory's (oldest first) records, by run directory name."""
    runs = sorted((directory / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    return {run.name: list(wandb_records(next(run.glob("run-*.wandb")))) for run in runs}


def _items(items) -> dict[str, str]:
    return {item.key or "/".join(item.nested_key): item.value_json for item in items}


def _tracked(tmp_path, server: str, experiment: str, epochs: int, trackers: str):
    loop = _loop(
        tmp_path,
        epochs,
        f"run.trackers={trackers}",
        f"run.tracking_uri={server}",
        f"run.experiment={experiment}",
        "run.name=tracked",
    )
    loop.config = with_absolute_paths(loop.config)
    return loop


def test_a_run_its_resume_evaluation_and_model_card_share_one_mlflow_and_wandb_run(
    ray_train, mlflow_server, wandb_dir, tmp_path
):
    experiment = f"tracked-{uuid.uuid4().hex[:8]}"
    trackers = "[tensorboard, mlflow, wandb]"
    first = _tracked(tmp_path, mlflow_server, experiment, 2, trackers)
    TrainLoopRunner(first, 0, 1, torch.device("cpu")).run()
    run_dir = Path(first.run_dir)
    ids = json.loads((run_dir / TRACKERS_FILE).read_text())
    ray_train["resume_from"] = ray_train["reports"][-1][1]
    resumed = _tracked(tmp_path, mlflow_server, experiment, 3, trackers)
    TrainLoopRunner(resumed, 0, 1, torch.device("cpu")).run()
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == ids, "the resume opened new runs"

    eval_file = run_dir / "eval.json"
    eval_file.write_text('{"protocols": {"knn": {"top1": 0.5, "top5": 0.9}}}\n')
    results = {"knn": {"top1": 0.5, "top5": 0.9}, "linear@mnist": {"top1": 0.25}}
    log_evaluation(str(run_dir), resumed.config, results, 3, str(eval_file))
    card = [tmp_path / "model_card.json", tmp_path / "MODEL_CARD.md"]
    card[0].write_text("{}\n")
    card[1].write_text("# tracked\n")
    log_model_card(str(run_dir), resumed.config, [str(p) for p in card])

    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.run_name == "tracked"
    assert run.info.status == "FINISHED"
    params = flat_params(first.config)
    assert run.data.params == {key: str(value) for key, value in params.items()}
    assert run.data.params["train.epochs"] == "2"  # logged once, at the first start
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]  # one entry per epoch, resumed included
    reports = [metrics["loss"] for metrics, _ in ray_train["reports"]]
    assert [m.value for m in history] == pytest.approx(reports)
    assert client.get_metric_history(run.info.run_id, "step")[-1].value == 3 * STEPS_PER_EPOCH
    assert not any(key.startswith("train/") for key in run.data.metrics)  # steps: TB only
    assert run.data.metrics["eval/knn/top5"] == 0.9
    assert run.data.metrics["eval/linear_mnist/top1"] == 0.25
    assert client.get_metric_history(run.info.run_id, "eval/knn/top1")[0].step == 3
    artifacts = {
        a.path
        for folder in ("evaluation", "model-card")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert artifacts == {
        "evaluation/eval.json",
        "model-card/model_card.json",
        "model-card/MODEL_CARD.md",
    }
    assert list((run_dir / "tensorboard").iterdir())

    # W&B offline: each opening writes its own directory, all of them the same run id.
    runs = list(wandb_offline_runs(wandb_dir).values())
    starts = [r.run for records in runs for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 4 and [s.run_id for s in starts] == [ids["wandb"]] * 4
    first_run, second_run, evaluation, model_card = runs
    start = starts[0]
    assert start.display_name == "tracked"
    assert start.project == experiment
    assert json.loads(_items(start.config.update)["train.epochs"]) == 2
    steps = [
        json.loads(_items(r.history.item)["_step"])
        for records in (first_run, second_run)
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert steps == [1, 2, 3]
    summaries = {}
    for record in evaluation:
        if record.WhichOneof("record_type") == "summary":
            summaries |= _items(record.summary.update)
    assert json.loads(summaries["eval/knn/top1"]) == 0.5
    kinds = [
        r.artifact.type
        for r in evaluation + model_card
        if r.WhichOneof("record_type") == "artifact"
    ]
    assert "evaluation" in kinds and "model-card" in kinds


def test_without_tensorboard_no_event_files_and_without_servers_nothing_opens(tmp_path):
    config = load_config(None, ["run.trackers=[]"])
    with RunTrackers.open(str(tmp_path), config) as trackers:
        trackers.scalars({"train/loss": 1.0}, 1)
        trackers.epoch({"epoch": 1, "loss": 1.0})
    log_evaluation(str(tmp_path), config, {"knn": {"top1": 0.5}}, 1, str(tmp_path / "eval.json"))
    log_model_card(str(tmp_path), config, [str(tmp_path / "card.md")])  # not even read
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_is_marked_failed_and_a_vanished_run_is_explained(mlflow_server, tmp_path):
    experiment = f"failed-{uuid.uuid4().hex[:8]}"
    config = load_config(
        None,
        [
            "run.trackers=[mlflow]",
            f"run.tracking_uri={mlflow_server}",
            f"run.experiment={experiment}",
        ],
    )
    with pytest.raises(KeyboardInterrupt), RunTrackers.open(str(tmp_path), config):
        raise KeyboardInterrupt
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    (tmp_path / TRACKERS_FILE).write_text(json.dumps({"mlflow": "0" * 32}))
    with pytest.raises(RuntimeError, match="records MLflow run 0{32}.*delete the file"):
        RunTrackers.open(str(tmp_path), config)


def test_trackers_json_and_model_card_files_may_live_in_object_storage(
    mlflow_server, s3_bucket, tmp_path
):
    from pipeline.data import locations

    experiment = f"remote-{uuid.uuid4().hex[:8]}"
    config = load_config(
        None,
        [
            "run.trackers=[mlflow]",
            f"run.tracking_uri={mlflow_server}",
            f"run.experiment={experiment}",
        ],
    )
    run_dir = f"{s3_bucket}/runs/remote"
    card = f"{run_dir}/export/model_card.json"
    locations.write_text(card, '{"name": "remote"}\n')
    log_model_card(run_dir, config, [card])
    log_model_card(run_dir, config, [card])  # the same run again, found in trackers.json
    run_id = json.loads(locations.read_text(f"{run_dir}/{TRACKERS_FILE}"))["mlflow"]
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == run_id
    [artifact] = client.list_artifacts(run_id, "model-card")
    assert artifact.path == "model-card/model_card.json"


def test_the_tracking_uri_is_made_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert absolute_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    for server in ("http://127.0.0.1:5000", "databricks", "postgresql://h/db"):
        assert absolute_tracking_uri(server) == server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert absolute_tracking_uri(None) == "http://tracking:5000"
    tracked = with_absolute_paths(load_config(None, ["run.trackers=[mlflow]"]))
    assert tracked.run.tracking_uri == "http://tracking:5000"
    assert with_absolute_paths(load_config(None, [])).run.tracking_uri is None  # not used


def test_a_tracker_whose_package_is_missing_stops_the_config(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        pipeline.config.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "wandb" else real(name, *args),
    )
    # The config loads (a run tracked elsewhere can still be read, e.g. by load_encoder) ...
    tracked = load_config(None, ["run.trackers=[tensorboard, wandb]"])
    # ... but training, sweeping and opening the trackers stop, naming the key.
    with pytest.raises(ConfigError, match=r"'run.trackers' names 'wandb'.*ray-ssl\[tracking\]"):
        check_trackers_installed(tracked)
    with pytest.raises(ConfigError, match=r"'run.trackers' names 'wandb'"):
        pretrain(tracked)
    check_trackers_installed(load_config(None, ["run.trackers=[mlflow]"]))


def test_per_epoch_metrics_keep_the_numbers_nan_included(mlflow_server, tmp_path):
    experiment = f"numbers-{uuid.uuid4().hex[:8]}"
    config = load_config(
        None,
        [
            "run.trackers=[mlflow]",
            f"run.tracking_uri={mlflow_server}",
            f"run.experiment={experiment}",
        ],
    )
    with RunTrackers.open(str(tmp_path), config) as trackers:
        # An epoch whose stream ended at once: NaN loss, no time to the first step yet.
        trackers.epoch({"epoch": 1, "loss": math.nan, "steps": 0, "seconds_to_first_step": None})
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert set(run.data.metrics) == {"loss", "steps"} and math.isnan(run.data.metrics["loss"])
