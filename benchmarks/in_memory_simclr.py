"""SimCLR in one process from in-memory images: a quick quality and speed probe.

No Ray and no data pipeline: the whole training split is decoded once into memory and views
are drawn with the same batched augmentation the pipeline uses. It answers "which settings
learn fastest on this budget" in a minute or two per setting, and its images/s is the
ceiling the Ray pipeline is compared against. kNN uses a 20k-image bank and 2k test queries
(a cheaper protocol than `evaluate`; compare rows within this table only).

    .venv/bin/python benchmarks/in_memory_simclr.py --backbone small_cnn --width 0.5 --steps 500
    .venv/bin/python benchmarks/in_memory_simclr.py --steps 0   # the random-init floor
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.augment import ViewRecipe, random_views
from pipeline.evaluate import extract_features, knn_accuracy, raw_pixel_features
from pipeline.ingest import ImageSpec, channel_stats, normalize, read_decoded
from ssl_models import build_method
from ssl_models.optim import build_optimizer, param_groups, scaled_lr, warmup_cosine

SHARDS = "data/shards/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--optimizer", default="lars")
    parser.add_argument("--base-lr", type=float, default=0.3)
    parser.add_argument("--lars-eta", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=0.1)
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
    method = build_method(
        "simclr",
        backbone=args.backbone,
        width=args.width,
        in_channels=1,
        temperature=args.temperature,
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
    pixels = torch.from_numpy(train.pixels)
    started = time.perf_counter()
    for step in range(args.steps):
        batch = pixels[torch.randint(0, len(pixels), (args.batch_size,), generator=gen)]
        views = [normalize(random_views(batch, recipe, gen), mean, std) for _ in range(2)]
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, args.steps, args.steps // 10, lr)
        loss = method(views).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started

    method.eval()
    bank = extract_features(method.features, train.pixels[:20000], mean, std)
    queries = extract_features(method.features, test.pixels, mean, std)
    acc = knn_accuracy(bank, bank_labels, queries, query_labels, 200, 0.1)
    images = args.steps * args.batch_size
    print(
        json.dumps(
            {
                **vars(args),
                "seconds": round(seconds),
                "images_per_s": round(images / max(seconds, 1e-9)),
                **acc,
            }
        )
    )


if __name__ == "__main__":
    main()
