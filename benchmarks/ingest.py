"""Ingest per CPU core: decode + two SimCLR views, ours against the usual DataLoader peer.

Both sides run in this one process on one thread (one core), on the same encoded images and
the same recipe, and produce two uint8 views per image:

- ours: ``pipeline.data.ingest.augment_batch``, the Ray Data stage's batch function (batched
  decode into one array, batched augmentation with per-sample random parameters);
- peer: a ``torch.utils.data.DataLoader`` (``num_workers=0``) over a dataset that decodes
  each image with PIL and applies torchvision ``transforms.v2`` per image, as lightly's
  ``SimCLRTransform`` does.

Images: real Fashion-MNIST (28 px grayscale PNG, the bytes the shards hold, read from the
installed IDX files) and 224 px RGB JPEGs made from them (upscaled and coloured in memory;
blur on, as SimCLR uses it for large images). Prints a Markdown table of medians over
``--repeats`` runs.

    .venv/bin/python benchmarks/ingest.py
    .venv/bin/python benchmarks/ingest.py --images 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from pipeline.data.ingest import ImageSpec, ViewPlan, augment_batch
from pipeline.data.sources import builtin_idx_files, read_idx
from ssl_models.transforms.views import ViewRecipe


def fashion_mnist_bytes(count: int) -> list[bytes]:
    """The first ``count`` training images as the PNG bytes ``prepare`` stores in shards,
    straight from the installed IDX files (no shards need to exist)."""
    records = read_idx(*builtin_idx_files("fashion-mnist", "train"), "fashion-mnist", "train")
    return [record.image for record in itertools.islice(records, count)]


def to_large_jpeg(png: bytes, size: int, rng: random.Random) -> bytes:
    """Upscale a Fashion-MNIST image and colour it between two random colours, so hue,
    saturation and grayscale have real colour to work on."""
    dark, light = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    with Image.open(io.BytesIO(png)) as img:
        large = ImageOps.colorize(img.convert("L"), dark, light).resize(
            (size, size), Image.Resampling.BICUBIC
        )
    out = io.BytesIO()
    large.save(out, format="JPEG", quality=90)
    return out.getvalue()


def peer_transform(recipe: ViewRecipe, channels: int) -> v2.Compose:
    """The recipe as per-image torchvision ops (lightly's SimCLRTransform, uint8 out)."""
    steps: list[v2.Transform] = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(recipe.size, scale=recipe.crop_scale, ratio=recipe.crop_ratio),
        v2.RandomHorizontalFlip(recipe.flip_prob),
        v2.RandomApply(
            [v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)],
            p=recipe.jitter_prob,
        ),
    ]
    if channels == 3:
        steps.append(v2.RandomGrayscale(recipe.grayscale_prob))
    if recipe.blur_prob > 0:
        kernel = max(3, int(0.1 * recipe.size) // 2 * 2 + 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, recipe.blur_sigma)], recipe.blur_prob))
    return v2.Compose(steps)


class PeerDataset(torch.utils.data.Dataset):
    def __init__(self, images: list[bytes], transform: v2.Compose, mode: str) -> None:
        self.images, self.transform, self.mode = images, transform, mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(io.BytesIO(self.images[index])) as img:
            img = img.convert(self.mode)
        return self.transform(img), self.transform(img)


def time_ours(images: list[bytes], spec: ImageSpec, recipe: ViewRecipe, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        chunk = np.array(images[start : start + batch], dtype=object)
        ids = np.arange(start, start + len(chunk))
        labels = np.full(len(chunk), -1, np.int64)  # unlabelled, as a stream's rows may be
        batch_in = {"id": ids, "image": chunk, "label": labels}
        out = augment_batch(batch_in, spec, ViewPlan((recipe,) * 2))
        assert out["view_1"].shape == (len(chunk), spec.channels, spec.size, spec.size)
    return len(images) / (time.perf_counter() - started)


def time_peer(images: list[bytes], spec: ImageSpec, recipe: ViewRecipe, batch: int) -> float:
    dataset = PeerDataset(
        images, peer_transform(recipe, spec.channels), "L" if spec.channels == 1 else "RGB"
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=0, shuffle=True)
    started = time.perf_counter()
    for first, _second in loader:
        assert first.dtype == torch.uint8
    return len(images) / (time.perf_counter() - started)


def median_rate(measure: Callable[..., float], repeats: int, *args: object) -> float:
    return statistics.median(measure(*args) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048, help="28 px images per run")
    parser.add_argument("--large-images", type=int, default=256, help="224 px images per run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for both sides

    small = fashion_mnist_bytes(args.images)
    rng = random.Random(0)
    large = [to_large_jpeg(png, 224, rng) for png in small[: args.large_images]]
    cases = [
        ("Fashion-MNIST 28 px PNG, 1 ch", small, ImageSpec(28, 1), ViewRecipe.simclr(28)),
        (
            "224 px JPEG, 3 ch, blur 0.5",
            large,
            ImageSpec(224, 3),
            ViewRecipe.simclr(224, blur_prob=0.5),
        ),
    ]
    print("| images | ours img/s/core | DataLoader peer img/s/core | ratio |")
    print("|---|---|---|---|")
    for name, images, spec, recipe in cases:
        case = (images, spec, recipe, args.batch)
        ours = median_rate(time_ours, args.repeats, *case)
        peer = median_rate(time_peer, args.repeats, *case)
        print(f"| {name} | {ours:,.0f} | {peer:,.0f} | {ours / peer:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
