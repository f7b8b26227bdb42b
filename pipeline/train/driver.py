"""Pretraining: a TorchTrainer whose workers pull augmented views from Ray Data.

The driver (``pretrain``) checks the data, measures what every worker needs (a
:class:`~pipeline.train.runner.LoopConfig`), builds the lazy view dataset and the trainer;
each worker runs ``train_loop_per_worker`` (pipeline.train.runner). Ray Train restores the
latest checkpoint when a run with the same name and storage path is started again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray
import ray.train

# Train v2's classes, which ray.train exports when v2 is on (Ray's default; LoggingConfig and
# UserCallback exist only there); imported from v2 itself so mypy reads these, not v1's.
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.config import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.v2.torch.torch_trainer import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.cluster import init_ray
from pipeline.config import Config, check_trackers_installed, with_absolute_paths
from pipeline.data.ingest import (
    ImageSpec,
    channel_stats,
    dataset_rows,
    read_decoded,
    training_dataset,
)
from pipeline.data.ledger import fetch_report, start_ledger, write_report
from pipeline.data.shards import ShardManifest, load_manifest, validate_shards
from pipeline.train.backbone import check_backbone
from pipeline.train.checkpoint import check_resumable
from pipeline.train.runner import LoopConfig, train_loop_per_worker
from pipeline.train.views import view_plan


def run_dir(config: Config) -> str:
    """Where Ray Train keeps this run's checkpoints and where TensorBoard events go."""
    return f"{with_absolute_paths(config).run.root.rstrip('/')}/{config.run.name}"


def own_execution_options(datasets: dict[str, ray.data.Dataset]) -> ray.train.DataConfig:
    """Train's dataset config keeping each dataset's own execution options (the training
    stream's read-ahead bound, pipeline.data.ingest); by default Train replaces them with the
    driver's, and the stream would run ahead of training without limit."""
    return ray.train.DataConfig(
        execution_options={name: ds.context.execution_options for name, ds in datasets.items()}
    )


def _image_spec(config: Config, manifest: ShardManifest) -> ImageSpec:
    """The training images' spec; raise if the method needs other channels than they have."""
    spec = ImageSpec.from_manifest(manifest, config.data.image_size)
    needed = config.method_requirements.input_channels
    if needed not in (None, spec.channels):
        raise ValueError(
            f"method {config.method_name!r} needs {needed}-channel images, but "
            f"{config.data.train} holds {spec.channels}-channel ones"
        )
    return spec


def _steps_per_epoch(config: Config, rows: int) -> int:
    """Full global batches per epoch over ``rows`` images split across the workers."""
    world, batch = config.train.num_workers, config.train.batch_size
    steps = (rows // world) // (batch // world)
    if steps == 0:
        raise ValueError(
            f"{rows} training images give no full batch of {batch} over {world} workers; "
            "lower train.batch_size or use more images"
        )
    return steps


def _training_stream(
    config: Config, spec: ImageSpec, rows: int, completed_epochs: int
) -> tuple[dict[str, ray.data.Dataset], ray.actor.ActorHandle | None]:
    """The lazy view dataset for the remaining epochs and its ingest ledger; neither for
    synthetic data."""
    if config.data.synthetic:
        return {}, None
    # On the driver's node: losing a worker node must not take the accounting with it.
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
    ledger = start_ledger(rows, scheduling_strategy=driver_node)
    stream = training_dataset(
        config.data.train,
        spec,
        None if config.augment.on_train_device else view_plan(config, spec.size),
        epochs=max(config.train.epochs - completed_epochs, 1),
        first_epoch=completed_epochs,
        seed=config.run.seed,
        limit=config.data.limit,
        decode_tasks=config.data.decode_tasks,
        batch_size=config.train.batch_size // config.train.num_workers,
        ledger=ledger,
    )
    return {"train": stream}, ledger


def _trainer(
    loop: LoopConfig,
    datasets: dict[str, ray.data.Dataset],
    callbacks: Sequence[UserCallback],
) -> TorchTrainer:
    """The TorchTrainer that runs ``loop`` on the config's workers, checkpointing into the
    run directory and restarting from its latest checkpoint after a failure."""
    train = loop.config.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.as_train_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker}
            | ({"GPU": 1} if train.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=loop.config.run.name,
            storage_path=loop.run_dir.rsplit("/", 1)[0],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A failed worker (or its node) restarts the group from the latest checkpoint.
            failure_config=FailureConfig(max_failures=train.max_failures),
            # Our rank-0 progress lines replace Train's per-report logs; Train's print patch
            # would echo each of them twice.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=list(callbacks),
        ),
        datasets=dict(datasets),  # typed as a dict of datasets or dataset factories
        dataset_config=own_execution_options(datasets),
    )


def pretrain(config: Config, callbacks: Sequence[UserCallback] = ()) -> ray.train.Result:
    """Pretrain ``config``'s method; resumes when the run directory already has checkpoints.

    Joins the running Ray instance, or the cluster in ``RAY_ADDRESS``, or starts a local one.
    ``callbacks`` see every report (a sweep forwards rank 0's metrics to Tune with one).
    """
    started_at = time.time()
    config = with_absolute_paths(config)
    check_trackers_installed(config)
    for shard_dir in dict.fromkeys(
        [config.data.train, config.data.eval_train, config.data.eval_test]
    ):
        validate_shards(shard_dir)  # a bad shard fails here, not an hour into training
    directory = run_dir(config)
    completed_epochs = check_resumable(directory, config)
    manifest = load_manifest(config.data.train)
    spec = _image_spec(config, manifest)
    check_backbone(config, spec.channels, spec.size)
    init_ray()
    rows = dataset_rows(config.data.train, config.data.limit)
    steps = _steps_per_epoch(config, rows)
    mean, std = channel_stats(read_decoded(config.data.train, spec, limit=2048).pixels)
    datasets, ledger = _training_stream(config, spec, rows, completed_epochs)
    loop = LoopConfig(
        config=config,
        spec=spec,
        mean=mean,
        std=std,
        steps_per_epoch=steps,
        num_images=rows,
        num_classes=manifest.num_classes,
        started_at=started_at,
        run_dir=directory,
        ledger=ledger,
    )
    try:
        return _trainer(loop, datasets, callbacks).fit()
    finally:
        if ledger is not None:  # the final tally, including a last pass cut short
            write_report(directory, fetch_report(ledger))
            ray.kill(ledger)
