"""``prepare`` throughput: the Ray Data job on 1, 2 and 4 worker nodes against one process.

Makes ``--images`` 224 px JPEGs once (smooth random colour fields with a little grain, so
they compress like photos; cached under ``data/bench/prepare-jpegs-<size>/``, ten class
folders), then times:

- ``single process``: the sequential reader (``read_image_folder``) feeding ``write_shards``
  in this process, today's one-process path;
- ``ray data``: ``prepare folder:...`` on a multi-node Ray cluster on loopback
  (``ray.cluster_utils.Cluster``: a head with 0 CPUs, and ``add_node(num_cpus=1)`` per
  worker), one fresh cluster per size, warmed up by a tiny prepare first so that worker
  start-up is not in the timing.

Every run reads the same folder and writes its own shard directory (overwritten). The table
gives images/s, images/s per worker and the efficiency of each worker against the single
process (1.0: each worker node is as fast as one whole process). Worker nodes beyond the
machine's physical cores share them, so read efficiency on a small machine with that in mind.

    python benchmarks/prepare.py                      # 20,000 images, 1/2/4 workers
    python benchmarks/prepare.py --images 200         # smoke run
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pipeline.data.prepare import prepare  # noqa: E402
from pipeline.data.shards import write_shards  # noqa: E402
from pipeline.data.sources import SkipCounter, read_image_folder  # noqa: E402

CLASSES = 10


def _image(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour field plus grain, as a JPEG of about photo-like size."""
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 6, size=smooth.shape)
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_images(folder: Path, count: int, size: int) -> Path:
    """``count`` JPEGs under ``folder/c<k>/`` (kept between runs; extended when too few)."""
    existing = sorted(folder.glob("c*/*.jpg"))
    if len(existing) >= count:
        return folder
    rng = np.random.default_rng(len(existing))
    started = time.perf_counter()
    for index in range(len(existing), count):
        path = folder / f"c{index % CLASSES}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image(rng, size))
    print(f"made {count - len(existing)} images in {time.perf_counter() - started:.0f} s")
    return folder


def subset(folder: Path, count: int, work: Path) -> Path:
    """A folder of hard links to the first ``count`` images (the cache may hold more)."""
    chosen = sorted(folder.glob("c*/*.jpg"), key=lambda p: p.name)[:count]
    target = work / f"images-{count}"
    if target.exists() and sum(1 for _ in target.glob("c*/*.jpg")) == count:
        return target
    shutil.rmtree(target, ignore_errors=True)
    for path in chosen:
        link = target / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, link)
    return target


def single_process(images: Path, out: Path, rows_per_shard: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    skipped = SkipCounter()
    manifest = write_shards(
        read_image_folder(images, skipped), out, rows_per_shard=rows_per_shard, skipped=skipped
    )
    return time.perf_counter() - started, manifest.rows


def on_cluster(
    images: Path, warmup: Path, out: Path, workers: int, rows_per_shard: int
) -> tuple[float, int]:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.cluster import configure_data_context

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        configure_data_context()
        cluster.wait_for_nodes()
        quiet = lambda progress: None  # noqa: E731
        prepare(f"folder:{warmup}", out / "warmup", overwrite=True, tasks=workers, progress=quiet)
        started = time.perf_counter()
        manifest = prepare(
            f"folder:{images}",
            out / "shards",
            rows_per_shard=rows_per_shard,
            overwrite=True,
            tasks=workers,
            progress=lambda p: (
                print("   ", p.line(), flush=True) if p.chunks_done % 10 == 0 else None
            ),
        )["train"]
        return time.perf_counter() - started, manifest.rows
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--rows-per-shard",
        type=int,
        default=None,
        help="default: about 40 shards, at most 512 images each",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench")
    args = parser.parse_args()
    rows_per_shard = args.rows_per_shard or max(8, min(512, args.images // 40))

    cache = make_images(args.work / f"prepare-jpegs-{args.size}", args.images, args.size)
    images = subset(cache, args.images, args.work / "prepare-run")
    warmup = subset(cache, 2 * max(args.workers), args.work / "prepare-run")
    out = args.work / "prepare-out"
    print(
        f"{args.images} images of {args.size} px, {rows_per_shard} per shard, "
        f"{os.cpu_count()} logical CPUs on this machine"
    )

    results = []
    seconds, rows = single_process(images, out / "single", rows_per_shard)
    results.append(("single process", 1, rows, seconds))
    print(f"single process: {rows / seconds:,.0f} images/s")
    for workers in args.workers:
        seconds, rows = on_cluster(images, warmup, out / f"ray-{workers}", workers, rows_per_shard)
        results.append(("ray data", workers, rows, seconds))
        print(f"ray data, {workers} worker nodes: {rows / seconds:,.0f} images/s")

    base = results[0][2] / results[0][3]
    header = ("setup", "workers", "images", "seconds", "images/s", "img/s/worker", "efficiency")
    print()
    print(
        f"{header[0]:<15} {header[1]:>7} {header[2]:>7} {header[3]:>8} {header[4]:>9} "
        f"{header[5]:>12} {header[6]:>10}"
    )
    for setup, workers, rows, seconds in results:
        rate = rows / seconds
        print(
            f"{setup:<15} {workers:>7} {rows:>7} {seconds:>8.2f} {rate:>9,.0f} "
            f"{rate / workers:>12,.0f} {rate / workers / base:>10.2f}"
        )


if __name__ == "__main__":
    main()
