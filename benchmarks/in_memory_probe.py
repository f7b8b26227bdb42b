"""Any registered method in one process from in-memory images: a quick quality and speed probe.

No Ray and no data pipeline: the training images are decoded once into memory, visited in a
fresh random order every epoch (so memory-bank methods see each image once per epoch), and
views are drawn with the same batched augmentation the pipeline uses. It answers "which settings
learn fastest on this budget" in a minute or two per setting, and its images/s is the
ceiling the Ray pipeline is compared against. kNN uses a 20k-image bank and 2k test queries
(a cheaper protocol than `evaluate`; compare rows within this table only).

    .venv/bin/python benchmarks/in_memory_probe.py --backbone small_cnn --width 0.5 --steps 500
    .venv/bin/python benchmarks/in_memory_probe.py --method instdisc --images 20000 \
        --steps 235 --option objective=nce --option temperature=0.07
    .venv/bin/python benchmarks/in_memory_probe.py --steps 0   # the random-init floor
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from pipeline.data.image_features import extract_features
from pipeline.data.ingest import ImageSpec, channel_stats, normalize, read_decoded
from pipeline.eval.encoders import raw_pixel_features
from ssl_models import METHODS, build_method
from ssl_models.knn import knn_accuracy
from ssl_models.method import Batch
from ssl_models.optim import build_optimizer, param_groups, scaled_lr, set_lr, warmup_cosine
from ssl_models.transforms.views import ViewRecipe, random_views

SHARDS = "data/shards/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="simclr", choices=sorted(METHODS))
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. temperature=0.2 (repeatable; numbers are parsed as YAML)",
    )
    parser.add_argument("--images", type=int, default=60000, help="training images used")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--optimizer", default="lars")
    parser.add_argument("--base-lr", type=float, default=0.3)
    parser.add_argument("--lars-eta", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=1e-6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--crop-scale-min", type=float, default=0.2)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=150, help="0 scores the untrained encoder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--raw-pixels", action="store_true", help="score raw pixels instead")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = ImageSpec(28, 1)
    train = read_decoded(f"{SHARDS}/train", spec)
    test = read_decoded(f"{SHARDS}/test", spec, 2000)
    bank_labels, query_labels = (
        torch.from_numpy(train.labels[:20000]),
        torch.from_numpy(test.labels),
    )
    if args.raw_pixels:
        bank, queries = raw_pixel_features(train.pixels[:20000]), raw_pixel_features(test.pixels)
        print(
            json.dumps(
                {
                    "features": "raw pixels",
                    **knn_accuracy(bank, bank_labels, queries, query_labels, 200, 0.1),
                }
            )
        )
        return

    mean, std = (torch.tensor(v) for v in channel_stats(train.pixels[:2048]))
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.option)}
    if args.method == "simclr":
        options.setdefault("temperature", 0.1)
    images = min(args.images, len(train.pixels))
    method = build_method(
        args.method,
        backbone=args.backbone,
        width=args.width,
        in_channels=1,
        num_images=images,
        **options,
    )
    lr = scaled_lr(args.base_lr, args.batch_size)
    optimizer = build_optimizer(
        args.optimizer,
        param_groups(method, args.weight_decay),
        lr,
        args.weight_decay,
        lars_eta=args.lars_eta,
    )
    recipe = ViewRecipe.simclr(28, strength=args.strength, crop_scale_min=args.crop_scale_min)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.from_numpy(train.pixels[:images])
    order = torch.empty(0, dtype=torch.long)
    started = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:  # a new epoch: every image once, in a new order
            order = torch.randperm(images, generator=gen)
        indices, order = order[: args.batch_size], order[args.batch_size :]
        views = [
            normalize(random_views(pixels[indices], recipe, gen), mean, std)
            for _ in range(method.declared().global_views)
        ]
        lr_now = warmup_cosine(step, args.steps, args.steps // 10, lr)
        set_lr(optimizer, lr_now, base_lr=lr)
        loss = method(Batch(views, indices)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step, args.steps)
    seconds = time.perf_counter() - started

    method.eval()
    bank = extract_features(method.features, train.pixels[:20000], mean, std)
    queries = extract_features(method.features, test.pixels, mean, std)
    acc = knn_accuracy(bank, bank_labels, queries, query_labels, 200, 0.1)
    seen = args.steps * args.batch_size
    print(
        json.dumps(
            {
                **vars(args),
                "seconds": round(seconds),
                "images_per_s": round(seen / max(seconds, 1e-9)),
                **acc,
            }
        )
    )


if __name__ == "__main__":
    main()
