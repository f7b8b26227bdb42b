"""Training throughput against the synthetic-data ceiling, time to first step, and memory.

For each backbone and worker count, the same SimCLR run is made twice through the real
trainer (Ray Train, DDP, the demo preset's batch and optimiser):

- pipeline: views streamed from the Fashion-MNIST shards by Ray Data (decode + augment on
  CPU workers, overlapped with training), and with ``augment.on_train_device`` (Ray Data
  decodes, the training worker draws the views on its device);
- ceiling: ``data.synthetic=true``, one fixed batch of random views from memory, so no data
  work at all; same model, batch, workers and step.

Throughput is the median of the per-epoch images/s over epochs 2 and later (epoch 1 holds
the start-up, reported separately as time to first step). While a run trains, a sampler
records the peak resident memory summed over this process and every process it started
(raylet, Train workers, Ray Data tasks), the largest single process, and the peak use of
Ray's object store. Time to first step is measured separately for the demo command as a
user runs it: from starting ``python -m pipeline pretrain`` to its first optimiser step.
Prints one Markdown table per measurement.

    .venv/bin/python benchmarks/training.py
    .venv/bin/python benchmarks/training.py --backbones small_cnn:0.5 --workers 2 --epochs 2
    # GPU node, ResNet-50 at 224 px (Fashion-MNIST upscaled by the decoder), bf16 autocast:
    .venv/bin/python benchmarks/training.py --backbones resnet50:1 --workers 1 \
        --first-step-runs 0 --set train.use_gpu=true --set data.image_size=224 \
        --set model.small_images=false --set train.batch_size=128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from ray._private.internal_api import memory_summary
from ray.train import UserCallback

from pipeline.cli import DEMO_CONFIG
from pipeline.cluster import init_ray
from pipeline.config import load_config
from pipeline.train import pretrain

VIEWS = {"cpu": "Ray Data (CPU)", "device": "train device"}


def _resident_sizes() -> list[int]:
    """RSS in bytes of this process and every process it started (raylet, workers, tasks)."""
    sizes = []
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # it may exit while we look
            sizes.append(proc.memory_info().rss)
    return sizes


class MemorySampler(threading.Thread):
    """Peak summed RSS of this process tree, peak single process and peak object store use."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.total = self.largest = self.object_store = 0

    def run(self) -> None:
        while not self.done.wait(self.interval):
            sizes = _resident_sizes()
            self.total = max(self.total, sum(sizes))
            self.largest = max(self.largest, max(sizes))
            used = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
            if used:
                self.object_store = max(self.object_store, int(used.group(1)) << 20)


class EpochRates(UserCallback):
    """Appends rank 0's images/s to a file at every report (callbacks run in Train's
    controller process, so the file is how the figures come back)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with self.path.open("a") as out:
            out.write(f"{metrics[0]['images_per_s']}\n")


def throughput(
    backbone: str, width: float, workers: int, views: str, args: argparse.Namespace
) -> tuple[float, MemorySampler]:
    """Median images/s over epochs 2+ and the memory peaks of one run; ``views`` is
    "ceiling" (synthetic batch), "cpu" (Ray Data draws them) or "device" (the trainer)."""
    name = f"bench-train-{backbone}-{workers}w-{views}"
    shutil.rmtree(args.root / name, ignore_errors=True)
    config = load_config(
        DEMO_CONFIG,
        [
            f"run.name={name}",
            f"run.root={args.root}",
            f"model.backbone={backbone}",
            f"model.width={width}",
            f"train.num_workers={workers}",
            f"train.epochs={args.epochs}",
            f"data.limit={args.limit}",
            f"data.synthetic={str(views == 'ceiling').lower()}",
            f"augment.on_train_device={str(views == 'device').lower()}",
            "train.online_knn_bank=0",
            "train.log_every_steps=1000000",
            *args.set,
        ],
    )
    rates_file = args.root / f"{name}.rates"
    rates_file.unlink(missing_ok=True)
    sampler = MemorySampler()
    sampler.start()
    pretrain(config, callbacks=[EpochRates(rates_file)])
    sampler.done.set()
    sampler.join()
    rates = [float(line) for line in rates_file.read_text().split()]
    return statistics.median(rates[1:] or rates), sampler


def seconds_to_first_step(root: Path) -> float:
    """Start the demo command afresh and time it up to its first optimiser step."""
    shutil.rmtree(root / "bench-first-step", ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "pretrain", "--config", str(DEMO_CONFIG)]
    command += ["--set", "run.name=bench-first-step", "--set", f"run.root={root}"]
    command += ["--set", "train.epochs=1", "--set", "data.limit=2560"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        for line in process.stdout:
            if "first step done" in line:
                elapsed = time.perf_counter() - started
                # Ctrl-C, so the command shuts its Ray cluster down before the next run.
                process.send_signal(signal.SIGINT)
                process.communicate(timeout=120)
                return elapsed
    raise RuntimeError(f"{' '.join(command)} never reported its first step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["resnet18:0.25", "small_cnn:0.5"],
        help="BACKBONE:WIDTH pairs",
    )
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--views",
        nargs="+",
        choices=sorted(VIEWS),
        default=["cpu", "device"],
        help="where the pipeline runs draw views: Ray Data CPU tasks or the training device",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--first-step-runs", type=int, default=3)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every throughput run, e.g. on a GPU node: --set "
        "train.use_gpu=true --set data.image_size=224 --set model.small_images=false",
    )
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks").absolute())
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)

    first_steps = [seconds_to_first_step(args.root) for _ in range(args.first_step_runs)]
    if first_steps:
        print("| demo command | median s to first step | runs |")
        print("|---|---|---|")
        runs = ", ".join(f"{s:.1f}" for s in first_steps)
        print(
            f"| `python -m pipeline pretrain --config {DEMO_CONFIG.name}` "
            f"| {statistics.median(first_steps):.1f} | {runs} |\n",
            flush=True,
        )

    init_ray()  # one local cluster for every run below
    print(
        "| backbone | workers | views drawn by | ceiling img/s | pipeline img/s "
        "| pipeline / ceiling | peak RSS, all processes | largest process | peak object store |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in args.backbones:
        backbone, width = pair.split(":")
        for workers in args.workers:
            ceiling, _ = throughput(backbone, float(width), workers, "ceiling", args)
            for views in args.views:
                rate, memory = throughput(backbone, float(width), workers, views, args)
                print(
                    f"| {backbone} w{width} | {workers} | {VIEWS[views]} | {ceiling:,.0f} "
                    f"| {rate:,.0f} | {rate / ceiling:.2f} | {memory.total / 2**30:.2f} GiB "
                    f"| {memory.largest / 2**30:.2f} GiB "
                    f"| {memory.object_store / 2**20:.0f} MiB |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
