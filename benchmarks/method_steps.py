"""Each method's training step alone on one device: no Ray, no data stage.

A step is the training loop's own (``pipeline.train.step.train_step``: bf16 autocast and
channels-last on CUDA, the method's hooks, its optimiser) on the demo preset with the
method's RECIPES entry (benchmarks/methods.py), on real Fashion-MNIST images. The views are
drawn beforehand by the method's own data-stage plan and cycled, so the figures are the
step alone: the compute ceiling per method that the Ray pipeline is measured against. On a
GPU it is also the check that every method trains there: every loss finite, and the loss
of the last steps below that of the first (the same few batches are revisited; the learning
rate warms up over as many steps as the preset's warm-up in a real epoch).

    .venv/bin/python benchmarks/method_steps.py --methods rotation jigsaw --steps 20
    python benchmarks/method_steps.py --device cuda               # every method, on a GPU

Fashion-MNIST is grayscale; a method that needs colour (colorization) gets its images
tinted with one random colour each, which the table says.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from methods import recipe_config

from pipeline.config import from_dict
from pipeline.data.ingest import ImageSpec, channel_stats, normalize, read_decoded
from pipeline.data.shards import load_manifest
from pipeline.train.checkpoint import build_method_for
from pipeline.train.step import amp_enabled, model_inputs, optimizer_for, train_step
from pipeline.train.views import view_plan
from ssl_models import METHODS, SSLMethod
from ssl_models.method import Batch
from ssl_models.optim import set_lr, warmup_cosine
from ssl_models.transforms.pretext import split_columns

SHARDS = "data/shards/fashion-mnist/train"
EDGE = 5  # steps averaged for the first and last loss


def tinted(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """Grayscale uint8 (N, 1, H, W) -> RGB, each image scaled by its own random colour."""
    colours = np.random.default_rng(seed).uniform(0.3, 1.0, (len(gray), 3, 1, 1))
    return (gray * colours).round().astype(np.uint8)


@torch.no_grad()
def backbone_features(method: SSLMethod, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Eval-mode backbone features of every image, for methods that ask for them."""
    method.backbone.eval()
    features = [method.backbone(normalize(chunk, mean, std)).float() for chunk in images.split(512)]
    method.backbone.train()
    return torch.cat(features)


def measure(name: str, args: argparse.Namespace, gray: np.ndarray) -> dict[str, object]:
    """Train ``name`` for ``args.steps`` steps on prepared views; losses, speed, memory."""
    config = from_dict(recipe_config(name, [f"train.batch_size={args.batch}", *args.set]))
    device = torch.device(args.device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    colour = config.method_requirements.input_channels == 3 and gray.shape[1] == 1
    pixels = tinted(gray) if colour else gray
    spec = ImageSpec(pixels.shape[-1], pixels.shape[1])
    mean, std = (torch.tensor(v, device=device) for v in channel_stats(pixels[:2048]))

    torch.manual_seed(0)
    method = build_method_for(config, spec.channels, len(pixels))
    method = method.to(device=device, memory_format=memory_format)
    optimizer, lr = optimizer_for(config, method)
    plan, gen, size = view_plan(config, spec.size), torch.Generator().manual_seed(0), args.batch
    batches = []
    for start in range(0, args.batches * size, size):
        columns = plan(torch.from_numpy(pixels[start : start + size]), gen)
        views, targets = split_columns({k: v.to(device) for k, v in columns.items()})
        indices = torch.arange(start, start + size, device=device)
        inputs = model_inputs(views, mean, std, memory_format)
        batches.append(Batch(inputs, indices, targets))

    # One epoch for the whole run: epoch-level work (DeepCluster's k-means) happens once,
    # at step 0, inside the warm-up, and the timed steps are steps alone.
    method.set_schedule(args.steps, args.steps)
    # The preset's warm-up, counted in the steps of a real epoch: pixel regression (the
    # denoising autoencoder) diverges under SGD when the rate rises faster.
    images_per_epoch = min(config.data.limit or math.inf, load_manifest(Path(SHARDS)).rows)
    warmup = int(config.train.warmup_epochs * images_per_epoch / size)
    all_images = torch.from_numpy(pixels).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, started = [], 0.0
    for step in range(args.steps):
        if step == args.warmup:  # cuDNN autotuning and first-call work stay out of the time
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        if method.needs_dataset_features(step):
            slots = torch.arange(len(pixels), device=device)
            method.take_dataset_features(
                backbone_features(method, all_images, mean, std), slots, optimizer
            )
        set_lr(optimizer, warmup_cosine(step, args.steps, warmup, lr), base_lr=lr)
        batch = batches[step % len(batches)]
        output = train_step(
            method, method, optimizer, batch, amp_enabled(config, device), step, args.steps
        )
        losses.append(output.loss.detach().float())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    losses = torch.stack(losses).cpu()
    timed = args.steps - args.warmup
    return {
        "method": name + (" (tinted RGB)" if colour else ""),
        "views": " ".join("x".join(map(str, v.shape[1:])) for v in batches[0].views),
        "first": losses[:EDGE].mean().item(),
        "last": losses[-EDGE:].mean().item(),
        "finite": bool(torch.isfinite(losses).all()),
        "ms": 1000 * seconds / timed,
        "images_per_s": timed * size / seconds,
        "peak": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=sorted(METHODS),
        choices=sorted(METHODS),
        metavar="METHOD",
        help="registered methods to time (default: all)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60, help="steps per method, warm-up included")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the time")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the preset"
    )
    args = parser.parse_args()
    if not args.warmup < args.steps - EDGE:
        parser.error("--steps must exceed --warmup by more than 5")
    # At least 4,096 images: methods that cluster the whole training set (DeepCluster) see
    # them all; the steps use the first batch * batches.
    count = max(args.batch * args.batches, 4096)
    gray = read_decoded(SHARDS, ImageSpec(28, 1), count).pixels

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device_name}, torch {torch.__version__}, batch {args.batch}")
    print(
        "| method | views per image (C x H x W) | loss, first steps | loss, last steps "
        "| all finite | ms / step | images / s | peak memory |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.methods:
        r = measure(name, args, gray)
        peak = "-" if r["peak"] is None else f"{r['peak']:.2f} GiB"
        print(
            f"| {r['method']} | {r['views']} | {r['first']:.4f} | {r['last']:.4f} "
            f"| {'yes' if r['finite'] else 'NO'} | {r['ms']:.1f} | {r['images_per_s']:,.0f} "
            f"| {peak} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
