"""The per-worker training loop: a runner with one method per phase.

Shaped like Ray Train v2's ``TrainLoopRunner`` and MAE's ``engine_pretrain.train_one_epoch``:
:meth:`TrainLoopRunner.setup` builds the seeded model (DDP-wrapped: gloo on CPU, NCCL on GPU),
the optimiser and the monitors; :meth:`~TrainLoopRunner.restore` continues from the run's
latest checkpoint; :meth:`~TrainLoopRunner.batches` opens this worker's data stream; then per
epoch :meth:`~TrainLoopRunner.train_epoch` takes the steps (warm-up + cosine learning rate per
step), :meth:`~TrainLoopRunner.end_epoch` summarises them and
:meth:`~TrainLoopRunner.save` reports them to Ray Train with rank 0's checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.actor import ActorHandle

from pipeline.config import Config
from pipeline.data.dataset_features import dataset_features
from pipeline.data.ingest import ImageSpec, image_slots, synthetic_batch, views_on_device
from pipeline.data.ledger import fetch_report, summary_line, write_report
from pipeline.train.backbone import run_backbone_weights
from pipeline.train.checkpoint import (
    CheckpointState,
    build_method_for,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.train.monitors import EpochScalars, OnlineKNN, OnlineProbe, ProgressLog
from pipeline.train.step import amp_enabled, model_inputs, optimizer_for, train_step
from pipeline.train.trackers import RunTrackers
from pipeline.train.views import view_plan
from ssl_models.batch_norm import use_global_batch_norm
from ssl_models.method import Batch, MethodOutput
from ssl_models.optim import set_lr, warmup_cosine

StreamBatch = dict[str, np.ndarray]  # one batch of the training stream, as Ray Data gives it


@dataclass
class LoopConfig:
    """What the driver measured and hands every worker."""

    config: Config  # with absolute paths: workers run in their own directories
    spec: ImageSpec
    mean: list[float]  # per-channel input normalisation
    std: list[float]
    steps_per_epoch: int
    num_images: int  # training images (memory-bank slots)
    num_classes: int | None  # labels in the training shards (the online probe needs them)
    started_at: float  # the driver's time.time() at its start: seconds_to_first_step
    run_dir: str
    ledger: ActorHandle | None  # the IngestLedger; None for synthetic data

    def as_train_loop_config(self) -> dict[str, Any]:
        """The fields as ``train_loop_config``: Ray Train 2.60 records that as a dict (its run
        state validates it as one), so the dataclass travels as its fields, shallowly."""
        return dict(vars(self))


def train_loop_per_worker(train_loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: run the loop the driver configured."""
    context = ray.train.get_context()
    TrainLoopRunner(
        LoopConfig(**train_loop_config),
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
    ).run()


@dataclass
class EpochRecord:
    """What one epoch's steps leave for its summary."""

    steps: int = 0
    seconds: float = 0.0
    losses: EpochScalars = field(default_factory=EpochScalars)
    method_logs: EpochScalars = field(default_factory=EpochScalars)


class TrainLoopRunner:
    """One worker's training loop, phase by phase (see the module docstring)."""

    def __init__(self, loop: LoopConfig, rank: int, world: int, device: torch.device) -> None:
        self.loop, self.config = loop, loop.config
        self.rank, self.world, self.device = rank, world, device
        self.use_amp = amp_enabled(self.config, device)
        # Channels-last lets cuDNN use its fastest (tensor-core) convolutions; on CPU no gain.
        cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.total_steps = loop.steps_per_epoch * self.config.train.epochs
        self.warmup_steps = int(self.config.train.warmup_epochs * loop.steps_per_epoch)
        self.start_epoch = self.step = 0
        self.seconds_to_first_step: float | None = None
        self.augment_gen: torch.Generator | None = None  # when views are drawn here
        self.trackers: RunTrackers | None = None  # rank 0's (run.trackers)
        self.knn: OnlineKNN | None = None  # built at the first epoch's end, on rank 0

    def run(self) -> None:
        """Every phase in order, for the epochs the run has left."""
        self.setup()
        # Rank 0 ends its MLflow / W&B runs however the loop ends (failed, if it raised).
        with self.trackers or contextlib.nullcontext():
            self.restore()
            batches = self.batches()
            for epoch in range(self.start_epoch, self.config.train.epochs):
                record = self.train_epoch(epoch, batches)
                self.save(epoch, self.end_epoch(epoch, record))

    def setup(self) -> None:
        """The seeded method (the same weights on every rank) wrapped for DDP, its optimiser,
        the normalisation, the view plan, the online probe and rank 0's trackers."""
        config, loop = self.config, self.loop
        torch.manual_seed(config.run.seed)
        method = build_method_for(
            config, loop.spec.channels, loop.num_images, run_backbone_weights(config)
        )
        if config.global_bn:  # before DDP: its statistics then cover every worker's batch
            use_global_batch_norm(method)
        self.method = method.to(memory_format=self.memory_format)
        torch.manual_seed(config.run.seed + self.rank)  # same init everywhere, then per-rank draws
        # Buffers (queues, banks, BN statistics) evolve identically or per rank by design;
        # re-broadcasting them from rank 0 before every forward would only cost time.
        self.model = ray.train.torch.prepare_model(
            self.method, parallel_strategy_kwargs={"forward_sync_buffers": False}
        )
        self.optimizer, self.lr = optimizer_for(config, self.method)
        self.mean = torch.tensor(loop.mean, device=self.device)
        self.std = torch.tensor(loop.std, device=self.device)
        self.plan = view_plan(config, loop.spec.size)
        self.probe = self._online_probe()
        self.method.set_schedule(loop.steps_per_epoch, self.total_steps)
        self.slots = (
            image_slots(config.data.train, loop.num_images)
            if config.method_requirements.image_indices
            else None
        )
        if self.rank == 0:
            self.trackers = RunTrackers.open(loop.run_dir, config)

    def _online_probe(self) -> OnlineProbe | None:
        """The online linear probe, where it can run: labelled real data, and a method whose
        first backbone call sees whole images."""
        config, method, classes = self.config, self.method, self.loop.num_classes
        if not (
            config.train.online_probe
            and classes
            and not config.data.synthetic
            and config.method_requirements.whole_images_first
        ):
            return None
        return OnlineProbe(method.backbone, method.feature_dim, classes)

    def restore(self) -> None:
        """Continue from the run's latest checkpoint, if Ray Train has one, and tell the
        ingest ledger which epoch this rank's stream starts at."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self._load(load_checkpoint(directory))
        if self.loop.ledger is not None:  # before this rank's first read: it skips ahead
            ray.get(self.loop.ledger.resume_from.remote(self.start_epoch))
        name, epochs = self.config.run.name, self.config.train.epochs
        if self.rank == 0 and self.start_epoch >= epochs:
            print(
                f"{name} already has {self.start_epoch} epochs; raise train.epochs to go on",
                flush=True,
            )
        elif self.rank == 0 and self.start_epoch:
            print(
                f"resuming {name} from epoch {self.start_epoch + 1} (step {self.step})",
                flush=True,
            )
        self.progress = ProgressLog(self.step, self.total_steps, self.config.train.batch_size)

    def _load(self, state: CheckpointState) -> None:
        """Method, optimiser, probe, RNG, completed epochs and step from ``state``."""
        self.method.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        if self.probe is not None and state.online_probe:
            self.probe.load_state_dict(state.online_probe)
        # Rank 0 saved its generator; each rank derives its own stream from it, reproducibly.
        torch.set_rng_state(state.torch_rng)
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + self.rank)
        self.start_epoch, self.step = state.epoch, state.step

    def batches(self) -> Iterator[StreamBatch]:
        """The worker's batches for every remaining epoch: one stream (see
        ``training_dataset``; an epoch is a step count), or with ``data.synthetic`` one fixed
        batch of random views again and again."""
        config, local_batch = self.config, self.config.train.batch_size // self.world
        if config.data.synthetic:
            ids = list(self.slots or range(self.loop.num_images))[:local_batch]
            return itertools.repeat(synthetic_batch(ids, self.loop.spec, self.plan))
        if config.augment.on_train_device:
            # Parameters come from a CPU generator: a seed gives the same views on any device.
            seed = config.run.seed * 1009 + self.rank * 101 + self.start_epoch
            self.augment_gen = torch.Generator().manual_seed(seed)
        shard = ray.train.get_dataset_shard("train")
        return iter(
            shard.iter_batches(
                batch_size=local_batch,
                drop_last=True,
                prefetch_batches=config.data.prefetch_batches,
                batch_format="numpy",
            )
        )

    def train_epoch(self, epoch: int, batches: Iterator[StreamBatch]) -> EpochRecord:
        """Up to ``steps_per_epoch`` steps from ``batches`` (fewer if the stream ends); rank 0
        logs progress every ``train.log_every_steps`` steps."""
        self.model.train()
        record, started = EpochRecord(), time.perf_counter()
        self.progress.mark(self.step)
        for batch in itertools.islice(batches, self.loop.steps_per_epoch):
            output, loss, lr_now = self._step(batch)
            record.steps += 1
            record.losses.add({"loss": output.loss})
            record.method_logs.add(output.logs)
            if self.rank == 0 and self.step % self.config.train.log_every_steps == 0:
                self._log_progress(epoch, output, loss, lr_now)
        record.seconds = time.perf_counter() - started
        return record

    def _step(self, batch: StreamBatch) -> tuple[MethodOutput, float, float]:
        """One optimiser step on ``batch`` with the probe watching; returns the method's
        output, its loss and the step's learning rate. A non-finite loss stops the run."""
        if self.method.needs_dataset_features(self.step):
            self._feed_dataset_features()
            self.progress.mark(self.step)
        lr_now = warmup_cosine(self.step, self.total_steps, self.warmup_steps, self.lr)
        set_lr(self.optimizer, lr_now, base_lr=self.lr)
        uint8_views, targets = views_on_device(batch, self.plan, self.device, self.augment_gen)
        views = model_inputs(uint8_views, self.mean, self.std, self.memory_format)
        method_batch = Batch(views, self._slots_of(batch), targets)
        if self.probe is not None:
            self.probe.arm()
        output = train_step(
            self.model,
            self.method,
            self.optimizer,
            method_batch,
            self.use_amp,
            self.step,
            self.total_steps,
        )
        if self.probe is not None:
            self.probe.step(torch.tensor(batch["label"], device=self.device), views[0])
        self.step += 1
        loss = output.loss.item()
        if self.seconds_to_first_step is None:
            self.seconds_to_first_step = time.time() - self.loop.started_at
            if self.rank == 0:
                print(f"first step done {self.seconds_to_first_step:.1f} s after start", flush=True)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {self.step}; the last good checkpoint is kept. "
                "Lower train.base_lr or raise method.temperature."
            )
        return output, loss, lr_now

    def _slots_of(self, batch: StreamBatch) -> torch.Tensor | None:
        """The batch's images' memory-bank slots, for a method that keeps per-image state."""
        if self.slots is None:
            return None
        return torch.tensor([self.slots[i] for i in batch["id"]], device=self.device)

    def _feed_dataset_features(self) -> None:
        """Hand the method fresh features of the whole training set (DeepCluster's k-means);
        rank 0 logs what the method reports."""
        started, config, method = time.perf_counter(), self.config, self.method
        if self.slots is None:
            self.slots = image_slots(config.data.train, self.loop.num_images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            fresh = dataset_features(
                method.backbone,
                method.feature_dim,
                config.data.train,
                self.loop.spec,
                self.slots,
                self.mean,
                self.std,
                self.device,
                limit=config.data.limit,
                decode_tasks=config.data.decode_tasks,
            )
        stats = method.take_dataset_features(fresh.features, fresh.slots, self.optimizer)
        if self.trackers is None:
            return
        print(
            f"step {self.step}: features of {len(fresh.slots)} training images "
            f"({fresh.missing} undecodable) in {time.perf_counter() - started:.1f} s; "
            + ", ".join(f"{name} {value:.4g}" for name, value in stats.items()),
            flush=True,
        )
        values = stats | {"undecodable": fresh.missing}
        self.trackers.scalars({f"dataset_features/{k}": v for k, v in values.items()}, self.step)

    def _log_progress(self, epoch: int, output: MethodOutput, loss: float, lr_now: float) -> None:
        """Rank 0's progress line and its per-step scalars (TensorBoard's alone)."""
        rate = self.progress.images_per_second(self.step)
        epochs = self.config.train.epochs
        print(self.progress.line(epoch, epochs, self.step, loss, lr_now, rate), flush=True)
        if self.trackers is not None:
            scalars = {"train/loss": loss, "train/lr": lr_now, "train/images_per_s": rate}
            logs = {f"train/{name}": float(value) for name, value in output.logs.items()}
            self.trackers.scalars(scalars | logs, self.step)

    def end_epoch(self, epoch: int, record: EpochRecord) -> dict[str, Any]:
        """The epoch's metrics on every rank (the probe's accuracy is gathered from all);
        rank 0 adds the ingest report, the online kNN and the summary line."""
        steps_per_epoch = self.loop.steps_per_epoch
        if record.steps < steps_per_epoch and self.rank == 0:
            print(
                f"warning: the data stream ended after {record.steps} of {steps_per_epoch} "
                f"steps in epoch {epoch + 1} (images rejected by the decoder?)",
                flush=True,
            )
        metrics = {
            "epoch": epoch + 1,
            "resumed_from_epoch": self.start_epoch,
            "step": self.step,
            # loss, loss_first_steps, loss_last_steps (NaN for an epoch without steps); the
            # same for each scalar the method logs (method_pretext_accuracy, ...).
            **dict.fromkeys(("loss", "loss_first_steps", "loss_last_steps"), math.nan),
            **record.losses.summary(),
            **record.method_logs.summary("method_"),
            "images_per_s": record.steps * self.config.train.batch_size / max(record.seconds, 1e-9),
            "epoch_seconds": record.seconds,
            "seconds_to_first_step": self.seconds_to_first_step,
        }
        probe_top1 = self.probe.epoch_accuracy() if self.probe is not None else None
        if probe_top1 is not None:
            metrics["probe_top1"] = probe_top1
        if self.rank == 0:
            self._report_ingest(epoch)
            self._monitor_epoch(epoch, metrics)
        return metrics

    def _report_ingest(self, epoch: int) -> None:
        """Rank 0: the ingest ledger's line for this epoch and its report file, so far."""
        if self.loop.ledger is None:
            return
        data_report = fetch_report(self.loop.ledger)
        if epoch + 1 in data_report:
            print(summary_line(epoch + 1, data_report[epoch + 1]), flush=True)
        write_report(self.loop.run_dir, data_report)

    def _monitor_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Rank 0: the online kNN into ``metrics``, the epoch's metrics to the trackers and its
        line."""
        if self.config.train.online_knn_bank:
            # Built at the first epoch's end, not before the first step: decoding its
            # images would only delay the start.
            self.knn = self.knn or OnlineKNN(self.config, self.loop.spec)
            self.method.eval()
            metrics["knn_top1"] = self.knn(self.method.features, self.mean, self.std, self.device)
        if self.trackers is not None:
            self.trackers.epoch(metrics)
        print(
            "epoch {epoch} done: loss {loss:.4f}, {images_per_s:,.0f} img/s".format(**metrics)
            + (f", online kNN top-1 {metrics['knn_top1']:.4f}" if "knn_top1" in metrics else "")
            + (
                f", online probe top-1 {metrics['probe_top1']:.4f}"
                if "probe_top1" in metrics
                else ""
            ),
            flush=True,
        )

    def save(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Report the epoch's metrics to Ray Train; rank 0 attaches the checkpoint."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        state = CheckpointState(
            model=self.method.state_dict(),
            optimizer=self.optimizer.state_dict(),
            epoch=epoch + 1,
            step=self.step,
            torch_rng=torch.get_rng_state(),
            config=self.config.to_dict(),
            channels=self.loop.spec.channels,
            image_size=self.loop.spec.size,
            num_images=self.loop.num_images,
            mean=self.loop.mean,
            std=self.loop.std,
            metrics=metrics,
            online_probe=self.probe.state_dict() if self.probe is not None else None,
        )
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
