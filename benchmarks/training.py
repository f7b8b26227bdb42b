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

Two more modes run the demo command itself (``python -m pipeline pretrain``, the demo
preset, online kNN off) once per row, back to back, and read rank 0's "epoch N done" lines:

- ``--epochs-compare 3 100``: the same run configured for 3 and for 100 epochs, each stopped
  (Ctrl-C) after epoch 3; the images/s of epochs 2 and 3 should not depend on how many
  epochs the run is configured for (the stream's overhead must be flat in epochs);
- ``--storage-compare``: 3 epochs from the local shards and from the same shards uploaded to
  an S3 server on loopback (moto), so object storage's cost on the training path shows.

    .venv/bin/python benchmarks/training.py
    .venv/bin/python benchmarks/training.py --backbones small_cnn:0.5 --workers 2 --epochs 2
    .venv/bin/python benchmarks/training.py --epochs-compare 3 100 --limit 20000
    .venv/bin/python benchmarks/training.py --storage-compare --limit 20000
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

from pipeline.cli.demo import DEMO_CONFIG
from pipeline.cluster import init_ray
from pipeline.config import load_config
from pipeline.train.driver import pretrain

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


EPOCH_DONE = re.compile(r"epoch (\d+) done: loss \S+, ([\d,.]+) img/s")


def demo_epoch_rates(root: Path, name: str, overrides: list[str], stop_after: int) -> list[float]:
    """Run the demo command with ``overrides``; rank 0's images/s of epochs 1..``stop_after``
    (the run is stopped with Ctrl-C once epoch ``stop_after`` is done, so it shuts its own
    Ray cluster down before the next run)."""
    shutil.rmtree(root / name, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "pretrain", "--config", str(DEMO_CONFIG)]
    for override in [f"run.name={name}", f"run.root={root}", *overrides]:
        command += ["--set", override]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    rates: list[float] = []
    tail: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        for line in process.stdout:
            tail = (tail + [line])[-30:]
            done = EPOCH_DONE.search(line)
            if done:
                rates.append(float(done.group(2).replace(",", "")))
                print(f"  {name}: {line.strip()[-90:]}", flush=True)
                if len(rates) >= stop_after:
                    break
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.communicate(timeout=180)
    if len(rates) < stop_after:
        raise RuntimeError(
            f"{' '.join(command)} stopped after {len(rates)} epochs:\n" + "".join(tail)
        )
    return rates


def _steady(rates: list[float]) -> float:
    """The median of epochs 2 and 3 (epoch 1 holds the start-up)."""
    return statistics.median(rates[1:3])


def epochs_compare(args: argparse.Namespace) -> None:
    """Epochs 2-3 images/s of the demo configured for each of ``args.epochs_compare``."""
    common = [f"data.limit={args.limit}", "train.online_knn_bank=0", *args.set]
    results = []
    for epochs in args.epochs_compare:
        rates = demo_epoch_rates(
            args.root, f"bench-epochs-{epochs}", [f"train.epochs={epochs}", *common], 3
        )
        results.append((epochs, rates))
    base = _steady(results[0][1])
    print(
        "\n| epochs configured | epoch 2 img/s | epoch 3 img/s | epochs 2-3 median "
        f"| vs {results[0][0]} epochs |"
    )
    print("|---|---|---|---|---|")
    for epochs, rates in results:
        print(
            f"| {epochs} | {rates[1]:,.0f} | {rates[2]:,.0f} | {_steady(rates):,.0f} "
            f"| {_steady(rates) / base:.2f} |",
            flush=True,
        )


def storage_compare(args: argparse.Namespace) -> None:
    """Epochs 2-3 images/s of a 3-epoch demo from local shards and from the same shards on
    a loopback S3 server (moto), in this order."""
    import boto3
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    from pipeline.data.locations import resolve

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Before any Ray process starts (each run's own cluster): its workers inherit them.
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
    )
    try:
        local = str((DEMO_CONFIG.parent.parent / load_config(DEMO_CONFIG, []).data.train).resolve())
        uri = "s3://bench-shards/fashion-mnist/train"
        boto3.client("s3").create_bucket(Bucket="bench-shards")
        filesystem, path = resolve(uri)
        pyarrow.fs.copy_files(local, path, destination_filesystem=filesystem)
        common = [
            f"data.limit={args.limit}",
            "train.online_knn_bank=0",
            "train.epochs=3",
            *args.set,
        ]
        results = []
        for where, shards in (("local disk", local), ("S3 (moto, loopback)", uri)):
            name = "bench-storage-" + ("s3" if shards == uri else "local")
            results.append(
                (where, demo_epoch_rates(args.root, name, [f"data.train={shards}", *common], 3))
            )
    finally:
        server.stop()
    base = _steady(results[0][1])
    print("\n| shards on | epoch 2 img/s | epoch 3 img/s | epochs 2-3 median | vs local |")
    print("|---|---|---|---|---|")
    for where, rates in results:
        print(
            f"| {where} | {rates[1]:,.0f} | {rates[2]:,.0f} | {_steady(rates):,.0f} "
            f"| {_steady(rates) / base:.2f} |",
            flush=True,
        )


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
    parser.add_argument(
        "--epochs-compare",
        nargs="+",
        type=int,
        metavar="EPOCHS",
        help="only run the demo configured for each of these epoch counts (each stopped "
        "after epoch 3) and compare their epochs 2-3 images/s, e.g. --epochs-compare 3 100",
    )
    parser.add_argument(
        "--storage-compare",
        action="store_true",
        help="only compare 3 demo epochs from local shards and from the same shards on a "
        "loopback S3 server (moto)",
    )
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if args.epochs_compare or args.storage_compare:
        if args.epochs_compare:
            epochs_compare(args)
        if args.storage_compare:
            storage_compare(args)
        return

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
