"""Shared fixtures: one Ray instance for the whole session and small real-data shards."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

# Explicit, so that a new local cluster does not depend on Ray's changing default. The test
# cluster's dashboard listens on loopback only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# As pipeline.cluster.init_ray does for a local cluster: no preemption-watcher actor per run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a small shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server on loopback (moto in server mode) for the whole session.

    Its endpoint and dummy credentials go into this process's environment before Ray starts
    (``ray_session`` depends on this fixture), so Ray's workers inherit them and pyarrow,
    boto3 and Ray Train all reach the server the way they reach S3 in a cloud: through the
    usual ``AWS_*`` variables.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # boto3 and pyarrow both read it
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    yield env
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


_BUCKETS = itertools.count()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server; returns its ``s3://name`` URI."""
    import boto3

    name = f"test-bucket-{next(_BUCKETS)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray cluster shared by every test that needs one (4 logical CPUs); its
    workers see the session's S3 server."""
    import ray

    from pipeline.cluster import configure_data_context

    ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        object_store_memory=1 << 30,
    )
    configure_data_context()
    yield
    ray.shutdown()


def _fashion_mnist_split(split: str, count: int, out: Path):
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import SourceError, builtin_idx_files, read_idx

    try:
        images, labels = builtin_idx_files("fashion-mnist", split)
    except SourceError as err:
        pytest.fail(f"{err}\n(`make test` installs the data; run scripts/get_fashion_mnist.sh)")
    records = itertools.islice(read_idx(images, labels, "fashion-mnist", split), count)
    return write_shards(records, out, rows_per_shard=512, source=f"fashion-mnist:{split}")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory) -> dict[str, Path]:
    """Real Fashion-MNIST: the first 2048 train and 512 test images as shard directories."""
    root = tmp_path_factory.mktemp("fmnist")
    _fashion_mnist_split("train", 2048, root / "train")
    _fashion_mnist_split("test", 512, root / "test")
    return {"train": root / "train", "test": root / "test"}


def _tinted(record, rng):
    """A Fashion-MNIST record as an RGB PNG, tinted with its class's hue (a little jitter):
    colour that lightness and shape predict, so colorization has something to learn."""
    import colorsys
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.sources import ImageRecord

    gray = np.asarray(Image.open(io.BytesIO(record.image)), dtype=np.float32) / 255
    hue = (record.label / 10 + rng.uniform(-0.03, 0.03)) % 1.0
    tint = np.array(colorsys.hsv_to_rgb(hue, 0.8, 1.0), dtype=np.float32)
    rgb = (gray[..., None] * tint * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return ImageRecord(record.id, buffer.getvalue(), record.label, record.source)


@pytest.fixture(scope="session")
def fmnist_colour_small(tmp_path_factory) -> dict[str, Path]:
    """1024 train and 256 test Fashion-MNIST images tinted by class: a small RGB dataset."""
    import numpy as np

    from pipeline.data.shards import write_shards
    from pipeline.data.sources import builtin_idx_files, read_idx

    root, rng = tmp_path_factory.mktemp("fmnist_colour"), np.random.default_rng(0)
    for split, count in (("train", 1024), ("test", 256)):
        records = itertools.islice(
            read_idx(*builtin_idx_files("fashion-mnist", split), "fashion-mnist", split), count
        )
        write_shards(
            (_tinted(r, rng) for r in records),
            root / split,
            rows_per_shard=256,
            source=f"fashion-mnist-tinted:{split}",
        )
    return {"train": root / "train", "test": root / "test"}
