"""A run's experiment trackers (``run.trackers``): TensorBoard, MLflow and W&B behind one object.

Rank 0 of the training loop opens a :class:`RunTrackers` for the run directory; what each
tracker receives:

- ``tensorboard``: event files in RUN_DIR/tensorboard: every logged step's scalars
  (``train/*``, ``dataset_features/*``) and each epoch's ``epoch/*``. Without it, no event
  files are written.
- ``mlflow``: a run named ``run.name`` in experiment ``run.experiment`` on
  ``run.tracking_uri``, opened through Ray's own ``setup_mlflow``: the flattened config as
  params (once, at the run's first start), every numeric metric of each epoch with
  ``step=epoch``, evaluation rows (``eval/<protocol>/<metric>``, step = the checkpoint's epoch)
  with eval.json, and the exported model card, as artifacts.
- ``wandb``: the same in W&B project ``run.experiment``, through Ray's ``setup_wandb``
  (config, per-epoch history, evaluation summary, table and artifact, model card artifact);
  its files go to $WANDB_DIR, else a local run directory (RUN_DIR/wandb).

Per-step scalars stay in TensorBoard: a tracking server should not take a request a step.
The MLflow and W&B run ids are kept in RUN_DIR/trackers.json, so a resumed run (same
``run.name``) and a later ``evaluate`` or ``export`` log into the same runs.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from pipeline.config import Config, absolute_tracking_uri, check_trackers_installed
from pipeline.data import locations

TRACKERS_FILE = "trackers.json"  # in the run directory: {"mlflow": run id, "wandb": run id}
EPOCH_SCALARS = ("loss", "images_per_s", "knn_top1", "probe_top1")  # TensorBoard's epoch/*
_METRIC_UNSAFE = re.compile(r"[^\w.\-]")  # what a metric name's component may not hold


def flat_params(config: Config) -> dict[str, Any]:
    """The config as one level of dotted keys, as ``--set`` names them (``train.epochs``)."""
    return {
        f"{section}.{key}": value
        for section, values in config.to_dict().items()
        for key, value in values.items()
    }


def wandb_settings(directory: str) -> dict[str, Any]:
    """``wandb.init`` settings for a run kept under ``directory``: its files there when that
    is local and $WANDB_DIR is unset, and the $WANDB_MODE of this process (Ray's logging
    actors and workers may not inherit it)."""
    settings: dict[str, Any] = {}
    if "WANDB_DIR" not in os.environ and not locations.is_remote(directory):
        locations.make_dirs(directory)
        settings["dir"] = directory
    if "WANDB_MODE" in os.environ:
        settings["mode"] = os.environ["WANDB_MODE"]
    return settings


def _artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment on a local SQLite store keeps its artifacts: ./mlruns next to
    the database, as MLflow's own default has it for ./mlflow.db. MLflow would otherwise
    take the creating process's directory, a Train worker's scratch directory."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None  # a server keeps (or proxies) its own artifacts
    database = tracking_uri.removeprefix(prefix)
    return locations.join(locations.parent(database), "mlruns")


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (None and text left out)."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def _eval_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Protocol rows as metric names: ``eval/<protocol>/<metric>``; a transfer key
    ``knn@mnist`` becomes ``eval/knn_mnist/top1`` (MLflow refuses '@')."""
    return {
        f"eval/{_METRIC_UNSAFE.sub('_', protocol)}/{metric}": float(value)
        for protocol, row in results.items()
        for metric, value in row.items()
    }


@contextlib.contextmanager
def _local_copies(files: list[str]) -> Iterator[list[str]]:
    """Local paths of ``files``: local ones as they are, object-storage ones downloaded into
    a temporary directory for as long as the context lasts (trackers upload local files)."""
    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        for location in files:
            if locations.is_remote(location):
                local = os.path.join(scratch, locations.name(location))
                with open(local, "wb") as copy:
                    copy.write(locations.read_bytes(location))
                paths.append(local)
            else:
                paths.append(locations.absolute(location).removeprefix("file://"))
        yield paths


class RunTrackers:
    """One run's open trackers (see the module docstring): rank 0 of the training loop logs
    steps and epochs through it; ``log_evaluation`` and ``log_model_card`` open one for a
    moment. Close it (or use it as a context manager) to end the MLflow and W&B runs."""

    def __init__(self, run_dir: str, config: Config) -> None:
        self.run_dir, self.config = run_dir, config
        self.writer: Any = None  # TensorBoard's SummaryWriter
        self.mlflow: Any = None  # the mlflow module, with this run active
        self.wandb: Any = None  # the wandb Run

    @classmethod
    def open(cls, run_dir: str, config: Config, *, tensorboard: bool = True) -> RunTrackers:
        """Open every tracker ``config.run.trackers`` names (TensorBoard only with
        ``tensorboard``): the MLflow and W&B runs recorded in RUN_DIR/trackers.json, else new
        ones, recorded there."""
        trackers, names = cls(run_dir, config), config.run.trackers
        if tensorboard and "tensorboard" in names:
            from tensorboardX import SummaryWriter

            trackers.writer = SummaryWriter(locations.join(run_dir, "tensorboard"))
        if "mlflow" not in names and "wandb" not in names:
            return trackers
        check_trackers_installed(config)
        recorded = trackers._recorded()
        try:
            if "mlflow" in names:
                recorded["mlflow"] = trackers._open_mlflow(recorded.get("mlflow"))
            if "wandb" in names:
                recorded["wandb"] = trackers._open_wandb(recorded.get("wandb"))
        except BaseException:
            trackers.close(failed=True)
            raise
        locations.write_text(
            locations.join(run_dir, TRACKERS_FILE), json.dumps(recorded, indent=2) + "\n"
        )
        return trackers

    def _recorded(self) -> dict[str, str]:
        """The run ids RUN_DIR/trackers.json holds ({} before the run's first start)."""
        path = locations.join(self.run_dir, TRACKERS_FILE)
        return json.loads(locations.read_text(path)) if locations.exists(path) else {}

    def _open_mlflow(self, run_id: str | None) -> str:
        """Start (or with ``run_id``, resume) the MLflow run through Ray's ``setup_mlflow``;
        returns its id. Params are logged at the first start only: MLflow refuses to change
        a param, and a resumed run may raise train.epochs."""
        import mlflow
        from ray.air.integrations.mlflow import setup_mlflow

        run = self.config.run
        uri = absolute_tracking_uri(run.tracking_uri)  # as the driver resolved it, if it did
        if run_id is not None:
            # setup_mlflow starts a new run unless one is active: make the recorded one so.
            mlflow.set_tracking_uri(uri)
            try:
                mlflow.start_run(run_id=run_id)
            except mlflow.exceptions.MlflowException as err:
                raise RuntimeError(
                    f"{self.run_dir}/{TRACKERS_FILE} records MLflow run {run_id}, which "
                    f"{uri} does not have ({err}); delete the file to start a "
                    "new MLflow run"
                ) from err
        self.mlflow = setup_mlflow(
            tracking_uri=uri,
            experiment_name=run.experiment,
            artifact_location=_artifact_location(uri),
            run_name=run.name,
            create_experiment_if_not_exists=True,
        )
        if run_id is None:  # one batch request; setup_mlflow's config makes one per param
            self.mlflow.log_params(flat_params(self.config))
        return self.mlflow.active_run().info.run_id

    def _open_wandb(self, run_id: str | None) -> str:
        """Start (or with ``run_id``, resume) the W&B run through Ray's ``setup_wandb``;
        returns its id."""
        from ray.air.integrations.wandb import setup_wandb

        run = self.config.run
        self.wandb = setup_wandb(
            None if run_id else flat_params(self.config),
            rank_zero_only=False,  # its rank check reads Train V1's session; we are rank 0
            trial_id=run_id,  # None: W&B draws a new id
            trial_name=run.name,
            project=run.experiment,
            **wandb_settings(self.run_dir),
        )
        return self.wandb.id

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Per-step scalars (``train/loss``, ...): TensorBoard only."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def epoch(self, metrics: dict[str, Any]) -> None:
        """One epoch's metrics (``end_epoch``'s dict; ``metrics["epoch"]`` counts from 1):
        TensorBoard's ``epoch/*`` scalars, every numeric one to MLflow and W&B."""
        step = int(metrics["epoch"])
        if self.writer is not None:
            for name in EPOCH_SCALARS:
                if name in metrics:
                    self.writer.add_scalar(f"epoch/{name}", metrics[name], step)
            self.writer.flush()
        values = {k: v for k, v in _numbers(metrics).items() if k != "epoch"}
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def evaluation(self, results: dict[str, dict[str, float]], epoch: int, eval_file: str) -> None:
        """Evaluation rows (eval.json's ``protocols`` shape) of the checkpoint of ``epoch``,
        and the merged eval.json at ``eval_file`` as an artifact."""
        metrics = _eval_metrics(results)
        with _local_copies([eval_file]) as [local]:
            if self.mlflow is not None:
                self.mlflow.log_metrics(metrics, step=epoch)
                self.mlflow.log_artifact(local, artifact_path="evaluation")
            if self.wandb is not None:
                import wandb

                self.wandb.summary.update(metrics | {"eval/epoch": epoch})
                rows = [[name, row.get("top1"), row.get("top5")] for name, row in results.items()]
                table = wandb.Table(columns=["protocol", "top1", "top5"], data=rows)
                self.wandb.log({"eval/results": table})
                self._wandb_artifact("evaluation", [local])

    def files(self, files: list[str], kind: str) -> None:
        """Files (local or object storage) as artifacts of kind ``kind`` (``model-card``):
        under that folder in MLflow, as one artifact of that type in W&B."""
        with _local_copies(files) as local:
            if self.mlflow is not None:
                for path in local:
                    self.mlflow.log_artifact(path, artifact_path=kind)
            if self.wandb is not None:
                self._wandb_artifact(kind, local)

    def _wandb_artifact(self, kind: str, paths: list[str]) -> None:
        """``paths`` as one W&B artifact ``<run.name>-<kind>`` of type ``kind``."""
        import wandb

        artifact = wandb.Artifact(f"{self.config.run.name}-{kind}", type=kind)
        for path in paths:
            artifact.add_file(path)
        self.wandb.log_artifact(artifact)

    def close(self, failed: bool = False) -> None:
        """Flush TensorBoard and end the MLflow and W&B runs (marked failed with ``failed``)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None

    def __enter__(self) -> RunTrackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.close(failed=kind is not None)


def log_evaluation(
    run_dir: str, config: Config, results: dict[str, dict[str, float]], epoch: int, eval_file: str
) -> None:
    """Log evaluation rows of the run's checkpoint of ``epoch`` (and the merged eval.json at
    ``eval_file``) into the run's MLflow and W&B runs; nothing for trackers not configured."""
    if {"mlflow", "wandb"}.isdisjoint(config.run.trackers):
        return
    with RunTrackers.open(run_dir, config, tensorboard=False) as trackers:
        trackers.evaluation(results, epoch, eval_file)


def log_model_card(run_dir: str, config: Config, files: list[str]) -> None:
    """Log ``files`` (an export's model card, JSON and Markdown; local paths or object-storage
    URIs) as artifacts of the run's MLflow and W&B runs; nothing for trackers not configured."""
    if {"mlflow", "wandb"}.isdisjoint(config.run.trackers):
        return
    with RunTrackers.open(run_dir, config, tensorboard=False) as trackers:
        trackers.files(files, "model-card")
