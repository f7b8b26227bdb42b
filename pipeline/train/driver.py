"""Pretraining: a TorchTrainer whose workers pull augmented views from Ray Data.

The driver (``pretrain``) builds the lazy view dataset and the trainer; each worker runs
``train_loop_per_worker``: DDP (gloo on CPU, NCCL on GPU), a warm-up + cosine learning rate
per step, one checkpoint per epoch through ``ray.train.report``. Ray Train restores the
latest checkpoint when a run with the same name and storage path is started again.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.cluster import init_ray
from pipeline.config import Config, from_dict, with_absolute_paths
from pipeline.data.dataset_features import dataset_features
from pipeline.data.image_features import extract_features
from pipeline.data.ingest import (
    ImageSpec,
    ViewPlan,
    channel_stats,
    dataset_rows,
    image_slots,
    load_labelled,
    normalize,
    read_decoded,
    synthetic_batch,
    training_dataset,
    views_on_device,
)
from pipeline.data.ledger import IngestLedger, summary_line, write_report
from pipeline.data.shards import load_manifest, validate_shards
from pipeline.train.checkpoint import (
    build_method_for,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.train.monitors import OnlineProbe
from ssl_models import METHODS, SSLMethod
from ssl_models.knn import knn_accuracy
from ssl_models.method import MethodOutput
from ssl_models.optim import build_optimizer, scaled_lr, set_lr, warmup_cosine
from ssl_models.transforms.views import ViewRecipe

EDGE_STEPS = 5  # steps averaged for the per-epoch <name>_first_steps / <name>_last_steps


def run_dir(config: Config) -> str:
    """Where Ray Train keeps this run's checkpoints and where TensorBoard events go."""
    return f"{with_absolute_paths(config).run.root.rstrip('/')}/{config.run.name}"


def view_recipe(config: Config, size: int) -> ViewRecipe:
    """The augment section's SimCLR recipe at ``size`` px (wherever the views are drawn)."""
    options = asdict(config.augment)
    # The keys that say where views are drawn and how many local ones, not what each looks like.
    for key in [key for key in options if key == "on_train_device" or key.startswith("local_")]:
        del options[key]
    return ViewRecipe.simclr(size, **options)


def view_recipes(config: Config, size: int) -> list[ViewRecipe]:
    """One recipe per view the method takes: its global views at ``size`` px, then the
    augment section's multi-crop local views (same recipe, smaller side and crop area)."""
    augment = config.augment
    full = view_recipe(config, size)
    # SwAV and DINO pair 224 px global with 96 px local crops.
    local_side = augment.local_size or max(4, round(size * 96 / 224))
    local = replace(
        full,
        size=local_side,
        crop_scale=(augment.local_crop_scale_min, augment.local_crop_scale_max),
    )
    views = METHODS[config.method_name].views_per_image(config.method_options)
    return [full] * views + [local] * augment.local_crops


def view_plan(config: Config, size: int) -> ViewPlan:
    """The data stage's work per image: :func:`view_recipes`, then the method's pretext
    transform if it is a pretext task."""
    pretext = METHODS[config.method_name].pretext_views(config.method_options)
    return ViewPlan(tuple(view_recipes(config, size)), pretext)


class EpochScalars:
    """Scalars logged every step, summarised per epoch: the mean, and the means of the
    first and last ``EDGE_STEPS`` steps (is it still learning?). Values stay tensors on
    the training device until :meth:`summary`, so recording them costs no synchronisation."""

    def __init__(self) -> None:
        self.steps = 0
        self.sums: dict[str, Any] = {}
        self.first: dict[str, list[torch.Tensor]] = {}
        self.last: dict[str, list[torch.Tensor]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums.get(name, 0.0) + value
            if self.steps <= EDGE_STEPS:
                self.first.setdefault(name, []).append(value)
            self.last[name] = [*self.last.get(name, [])[-(EDGE_STEPS - 1) :], value]

    def summary(self, prefix: str = "") -> dict[str, float]:
        """{prefix+name: epoch mean, ..._first_steps, ..._last_steps} for every name."""
        out = {}
        for name, total in self.sums.items():
            out[f"{prefix}{name}"] = float(total) / self.steps
            for edge, values in (("first", self.first[name]), ("last", self.last[name])):
                out[f"{prefix}{name}_{edge}_steps"] = float(sum(values)) / len(values)
        return out


class ProgressLog:
    """One console line per interval from rank 0: epoch, step, loss, images/s and ETA.

    Rate and ETA come from the latest interval only, so start-up and the pauses for
    checkpoints and the kNN monitor do not distort them.
    """

    def __init__(self, first_step: int, total_steps: int, global_batch: int) -> None:
        self.total_steps, self.global_batch = total_steps, global_batch
        self.mark(first_step)

    def mark(self, step: int) -> None:
        """Start a new interval (also at each epoch start)."""
        self.last, self.last_step = time.perf_counter(), step

    def images_per_second(self, step: int) -> float:
        """Global images/s since the last mark; starts the next interval."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.global_batch / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate

    def line(self, epoch: int, epochs: int, step: int, loss: float, lr: float, rate: float) -> str:
        eta = int((self.total_steps - step) * self.global_batch / max(rate, 1e-9))
        return (
            f"epoch {epoch + 1}/{epochs}  step {step}/{self.total_steps}  loss {loss:.4f}  "
            f"lr {lr:.4f}  {rate:,.0f} img/s  ETA {eta // 60}m{eta % 60:02d}s"
        )


class OnlineKNN:
    """Per-epoch kNN monitor on rank 0: a bank and disjoint queries from the labelled train
    split (never the test set), so sweeps can select on it without touching test data."""

    def __init__(self, config: Config, spec: ImageSpec) -> None:
        bank = config.train.online_knn_bank
        images = load_labelled(config.data.eval_train, spec, bank + config.train.online_knn_queries)
        self.bank_pixels, self.query_pixels = images.pixels[:bank], images.pixels[bank:]
        self.bank_labels = torch.from_numpy(images.labels[:bank])
        self.query_labels = torch.from_numpy(images.labels[bank:])
        self.k, self.temperature = config.train.online_knn_k, config.eval.knn_temperature

    def __call__(self, encoder, mean, std, device) -> float:
        bank = extract_features(encoder, self.bank_pixels, mean, std, device=device)
        queries = extract_features(encoder, self.query_pixels, mean, std, device=device)
        acc = knn_accuracy(
            bank, self.bank_labels, queries, self.query_labels, self.k, self.temperature
        )
        return acc["top1"]


def _restore(
    method: SSLMethod, optimizer: torch.optim.Optimizer, probe: OnlineProbe | None, rank: int
) -> tuple[int, int]:
    """Load the run's latest checkpoint, if any; return (completed epochs, global step)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory)
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if probe is not None and state.get("online_probe"):
        probe.load_state_dict(state["online_probe"])
    # Rank 0 saved its generator; each rank derives its own stream from it, reproducibly.
    torch.set_rng_state(state["torch_rng"])
    torch.manual_seed(int(torch.randint(0, 2**62, ())) + rank)
    return state["epoch"], state["step"]


def _feed_dataset_features(
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    config: Config,
    spec: ImageSpec,
    slots: dict[str, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    step: int,
    writer: Any,
) -> None:
    """Hand ``method`` fresh features of the whole training set (DeepCluster's k-means);
    rank 0 (the one with a TensorBoard ``writer``) logs what the method reports."""
    started = time.perf_counter()
    device = mean.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(config, device)):
        fresh = dataset_features(
            method.backbone,
            method.feature_dim,
            config.data.train,
            spec,
            slots,
            mean,
            std,
            device,
            limit=config.data.limit,
            decode_tasks=config.data.decode_tasks,
        )
    stats = method.take_dataset_features(fresh.features, fresh.slots, optimizer)
    if writer is not None:
        print(
            f"step {step}: features of {len(fresh.slots)} training images "
            f"({fresh.missing} undecodable) in {time.perf_counter() - started:.1f} s; "
            + ", ".join(f"{name} {value:.4g}" for name, value in stats.items()),
            flush=True,
        )
        for name, value in (stats | {"undecodable": fresh.missing}).items():
            writer.add_scalar(f"dataset_features/{name}", value, step)


def amp_enabled(config: Config, device: torch.device) -> bool:
    """Whether steps run under bf16 autocast: on CUDA, unless ``train.amp`` is off."""
    return device.type == "cuda" and config.train.amp


def model_inputs(
    uint8_views: list[torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    memory_format: torch.memory_format,
) -> list[torch.Tensor]:
    """Normalised float views in ``memory_format`` (channels-last on GPU); tiles and patches
    (N, P, C, h, w) stay contiguous, as channels-last is defined for 4-D tensors only."""
    return [
        normalize(view, mean, std).contiguous(
            memory_format=memory_format if view.ndim == 4 else torch.contiguous_format
        )
        for view in uint8_views
    ]


def optimizer_for(config: Config, method: SSLMethod) -> tuple[torch.optim.Optimizer, float]:
    """The config's optimiser over the method's parameter groups, and its peak learning rate
    (``train.base_lr`` scaled to the global batch size)."""
    lr = scaled_lr(config.train.base_lr, config.train.batch_size)
    optimizer = build_optimizer(
        config.train.optimizer,
        method.parameter_groups(config.train.weight_decay),
        lr=lr,
        weight_decay=config.train.weight_decay,
        momentum=config.train.momentum,
        lars_eta=config.train.lars_eta,
    )
    return optimizer, lr


def train_step(
    model: torch.nn.Module,
    method: SSLMethod,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    extra: dict[str, Any],
    use_amp: bool,
    step: int,
    total_steps: int,
) -> MethodOutput:
    """One optimiser step: forward (bf16 autocast when ``use_amp``) through ``model`` (the
    method, DDP-wrapped on more than one worker), backward, and the method's hooks."""
    with torch.autocast(views[0].device.type, dtype=torch.bfloat16, enabled=use_amp):
        output = model(views, **extra)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    method.before_optimizer_step(step)
    optimizer.step()
    method.after_optimizer_step(step, total_steps)
    return output


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker loop; ``loop_config`` carries the config and what the driver measured."""
    config = from_dict(loop_config["config"])
    spec = ImageSpec(**loop_config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = amp_enabled(config, device)
    # Channels-last lets cuDNN use its fastest (tensor-core) convolutions; on CPU it is no gain.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(config.run.seed)

    num_images = loop_config["num_images"]
    method = build_method_for(config, spec.channels, num_images).to(memory_format=memory_format)
    torch.manual_seed(config.run.seed + rank)  # same init everywhere, then per-rank draws
    # Buffers (queues, banks, BN statistics) evolve identically or per rank by design;
    # re-broadcasting them from rank 0 before every forward would only cost time.
    model = ray.train.torch.prepare_model(
        method, parallel_strategy_kwargs={"forward_sync_buffers": False}
    )
    optimizer, lr = optimizer_for(config, method)
    mean = torch.tensor(loop_config["mean"], device=device)
    std = torch.tensor(loop_config["std"], device=device)

    plan = view_plan(config, spec.size)
    probe = None
    if (
        config.train.online_probe
        and loop_config["num_classes"]
        and not config.data.synthetic
        and method.whole_images_first
    ):
        probe = OnlineProbe(method.backbone, method.feature_dim, loop_config["num_classes"])
    start_epoch, step = _restore(method, optimizer, probe, rank)
    ledger = loop_config["ledger"]
    if ledger is not None:  # before this rank's first read: a restarted stream skips ahead
        ray.get(ledger.resume_from.remote(start_epoch))
    if rank == 0 and start_epoch >= config.train.epochs:
        print(
            f"{config.run.name} already has {start_epoch} epochs; raise train.epochs to go on",
            flush=True,
        )
    elif rank == 0 and start_epoch:
        print(f"resuming {config.run.name} from epoch {start_epoch + 1} (step {step})", flush=True)
    steps_per_epoch = loop_config["steps_per_epoch"]
    total_steps = steps_per_epoch * config.train.epochs
    warmup_steps = int(config.train.warmup_epochs * steps_per_epoch)
    method.set_schedule(steps_per_epoch, total_steps)
    local_batch = config.train.batch_size // world
    progress = ProgressLog(step, total_steps, config.train.batch_size)
    writer = monitor = None
    if rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(f"{loop_config['run_dir']}/tensorboard")

    slots = image_slots(config.data.train, num_images) if method.uses_image_indices else None
    augment_gen = None  # a CPU generator when the views are drawn here, not by the data stage
    if config.data.synthetic:
        ids = list(slots or range(num_images))[:local_batch]
        batches = itertools.repeat(synthetic_batch(ids, spec, plan))
    else:
        # One stream for all remaining epochs (see training_dataset); an epoch is a step count.
        batches = iter(
            ray.train.get_dataset_shard("train").iter_batches(
                batch_size=local_batch,
                drop_last=True,
                prefetch_batches=config.data.prefetch_batches,
                batch_format="numpy",
            )
        )
        if config.augment.on_train_device:
            # Parameters come from a CPU generator: a seed gives the same views on any device.
            seed = config.run.seed * 1009 + rank * 101 + start_epoch
            augment_gen = torch.Generator().manual_seed(seed)
    seconds_to_first_step = None
    for epoch in range(start_epoch, config.train.epochs):
        model.train()
        epoch_steps, epoch_start = 0, time.perf_counter()
        losses, method_logs = EpochScalars(), EpochScalars()
        progress.mark(step)
        for batch in itertools.islice(batches, steps_per_epoch):
            if method.needs_dataset_features(step):
                slots = slots if slots is not None else image_slots(config.data.train, num_images)
                _feed_dataset_features(
                    method, optimizer, config, spec, slots, mean, std, step, writer
                )
                progress.mark(step)
            lr_now = warmup_cosine(step, total_steps, warmup_steps, lr)
            set_lr(optimizer, lr_now, base_lr=lr)
            uint8_views, targets = views_on_device(batch, plan, device, augment_gen)
            views = model_inputs(uint8_views, mean, std, memory_format)
            extra: dict[str, Any] = {"targets": targets} if targets else {}
            if slots is not None:
                extra["indices"] = torch.tensor([slots[i] for i in batch["id"]], device=device)
            if probe is not None:
                probe.arm()
            output = train_step(model, method, optimizer, views, extra, use_amp, step, total_steps)
            if probe is not None:
                probe.step(torch.tensor(batch["label"], device=device), views[0])
            step += 1
            epoch_steps += 1
            loss = output.loss.item()
            if seconds_to_first_step is None:
                seconds_to_first_step = time.time() - loop_config["started_at"]
                if rank == 0:
                    print(f"first step done {seconds_to_first_step:.1f} s after start", flush=True)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss} at step {step}; the last good checkpoint is kept. "
                    "Lower train.base_lr or raise method.temperature."
                )
            losses.add({"loss": output.loss})
            method_logs.add(output.logs)
            if rank == 0 and step % config.train.log_every_steps == 0:
                rate = progress.images_per_second(step)
                print(
                    progress.line(epoch, config.train.epochs, step, loss, lr_now, rate), flush=True
                )
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr_now, step)
                writer.add_scalar("train/images_per_s", rate, step)
                for name, value in output.logs.items():
                    writer.add_scalar(f"train/{name}", float(value), step)

        seconds = time.perf_counter() - epoch_start
        if epoch_steps < steps_per_epoch and rank == 0:
            print(
                f"warning: the data stream ended after {epoch_steps} of {steps_per_epoch} "
                f"steps in epoch {epoch + 1} (images rejected by the decoder?)",
                flush=True,
            )
        metrics = {
            "epoch": epoch + 1,
            "resumed_from_epoch": start_epoch,
            "step": step,
            # loss, loss_first_steps, loss_last_steps (NaN for an epoch without steps); the
            # same for each scalar the method logs (method_pretext_accuracy, ...).
            **dict.fromkeys(("loss", "loss_first_steps", "loss_last_steps"), math.nan),
            **losses.summary(),
            **method_logs.summary("method_"),
            "images_per_s": epoch_steps * config.train.batch_size / max(seconds, 1e-9),
            "epoch_seconds": seconds,
            "seconds_to_first_step": seconds_to_first_step,
        }
        probe_top1 = probe.epoch_accuracy() if probe is not None else None  # every rank
        if probe_top1 is not None:
            metrics["probe_top1"] = probe_top1
        if rank != 0:
            ray.train.report(metrics)
            continue
        if ledger is not None:
            data_report = ray.get(ledger.report.remote())
            if epoch + 1 in data_report:
                print(summary_line(epoch + 1, data_report[epoch + 1]), flush=True)
            write_report(loop_config["run_dir"], data_report)
        if config.train.online_knn_bank:
            # Built at the first epoch's end, not before the first step: decoding its
            # images would only delay the start.
            monitor = monitor or OnlineKNN(config, spec)
            method.eval()
            metrics["knn_top1"] = monitor(method.features, mean, std, device)
        for name in ("loss", "images_per_s", "knn_top1", "probe_top1"):
            if name in metrics:
                writer.add_scalar(f"epoch/{name}", metrics[name], epoch + 1)
        writer.flush()
        print(
            "epoch {epoch} done: loss {loss:.4f}, {images_per_s:,.0f} img/s".format(**metrics)
            + (f", online kNN top-1 {metrics['knn_top1']:.4f}" if "knn_top1" in metrics else "")
            + (f", online probe top-1 {probe_top1:.4f}" if probe_top1 is not None else ""),
            flush=True,
        )
        state = {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "config": loop_config["config"],
            "channels": spec.channels,
            "image_size": spec.size,
            "num_images": num_images,
            "mean": loop_config["mean"],
            "std": loop_config["std"],
            "metrics": metrics,
            "online_probe": probe.state_dict() if probe is not None else None,
        }
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    if writer is not None:
        writer.close()


def own_execution_options(datasets: dict[str, ray.data.Dataset]) -> ray.train.DataConfig:
    """Train's dataset config keeping each dataset's own execution options (the training
    stream's read-ahead bound, pipeline.data.ingest); by default Train replaces them with the
    driver's, and the stream would run ahead of training without limit."""
    return ray.train.DataConfig(
        execution_options={name: ds.context.execution_options for name, ds in datasets.items()}
    )


def pretrain(config: Config, callbacks: Sequence[UserCallback] = ()) -> ray.train.Result:
    """Pretrain ``config``'s method; resumes when the run directory already has checkpoints.

    Joins the running Ray instance, or the cluster in ``RAY_ADDRESS``, or starts a local one.
    ``callbacks`` see every report (a sweep forwards rank 0's metrics to Tune with one).
    """
    started_at = time.time()
    config = with_absolute_paths(config)
    for shard_dir in dict.fromkeys(
        [config.data.train, config.data.eval_train, config.data.eval_test]
    ):
        validate_shards(shard_dir)  # a bad shard fails here, not an hour into training
    directory = run_dir(config)
    completed_epochs = check_resumable(directory, config)
    manifest = load_manifest(config.data.train)
    spec = ImageSpec.from_manifest(manifest, config.data.image_size)
    needed = METHODS[config.method_name].needed_channels(config.method_options)
    if needed not in (None, spec.channels):
        raise ValueError(
            f"method {config.method_name!r} needs {needed}-channel images, but "
            f"{config.data.train} holds {spec.channels}-channel ones"
        )
    init_ray()
    rows = dataset_rows(config.data.train, config.data.limit)
    world, batch = config.train.num_workers, config.train.batch_size
    steps_per_epoch = (rows // world) // (batch // world)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{rows} training images give no full batch of {batch} over {world} workers; "
            "lower train.batch_size or use more images"
        )
    mean, std = channel_stats(read_decoded(config.data.train, spec, limit=2048).pixels)
    datasets, ledger = {}, None
    if not config.data.synthetic:
        on_device = config.augment.on_train_device
        # On the driver's node: losing a worker node must not take the accounting with it.
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
        ledger = IngestLedger.options(scheduling_strategy=driver_node).remote(rows)
        datasets["train"] = training_dataset(
            config.data.train,
            spec,
            None if on_device else view_plan(config, spec.size),
            epochs=max(config.train.epochs - completed_epochs, 1),
            first_epoch=completed_epochs,
            seed=config.run.seed,
            limit=config.data.limit,
            decode_tasks=config.data.decode_tasks,
            batch_size=batch // world,
            ledger=ledger,
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "spec": asdict(spec),
            "mean": mean,
            "std": std,
            "steps_per_epoch": steps_per_epoch,
            "num_images": rows,
            "num_classes": manifest.num_classes,
            "started_at": started_at,
            "run_dir": directory,
            "ledger": ledger,
        },
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker}
            | ({"GPU": 1} if config.train.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=config.run.name,
            storage_path=directory.rsplit("/", 1)[0],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A failed worker (or its node) restarts the group from the latest checkpoint.
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            # Our rank-0 progress lines replace Train's per-report logs; Train's print patch
            # would echo each of them twice.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=own_execution_options(datasets),
    )
    try:
        return trainer.fit()
    finally:
        if ledger is not None:  # the final tally, including a last pass cut short
            write_report(directory, ray.get(ledger.report.remote()))
            ray.kill(ledger)
