"""Every registered method on the same budget: Fashion-MNIST, same data, seed and compute.

Each method pretrains through the real pipeline (Ray Data -> Ray Train, 2 workers) with the
demo preset's data, backbone and optimiser and its own default options, then is scored by
kNN on the 10k test images. The budget is the number of (global) images the encoder
processes, so a one-view method (InstDisc, MAE, SimMIM) runs twice the epochs of a two-view
one. A method whose paper needs another optimiser, backbone (a ViT for masked image
modelling) or views gets them from RECIPES (said in the table). A method whose
test features have collapsed (all embeddings nearly equal) is reported as COLLAPSED, not
as a number. Prints a Markdown table.

    .venv/bin/python benchmarks/methods.py                       # all methods, 20 epochs
    .venv/bin/python benchmarks/methods.py --methods simclr byol --epochs 3 --limit 10000

The default budget (20 two-view epochs over 20,000 images) is the shortest on which every
method, InstDisc included, clears the random-init floor (benchmarks/RESULTS.md); it takes
a bit over an hour on 2 CPU cores and minutes on a GPU
(--set train.use_gpu=true --set train.num_workers=1).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.cli.demo import DEMO_CONFIG
from pipeline.config import from_dict, load_config
from pipeline.eval.evaluate import evaluate_checkpoint
from pipeline.train.driver import pretrain
from ssl_models import METHODS
from ssl_models.registry import method_params

COLLAPSE_SPREAD = 0.05  # feature_spread below this: all embeddings are nearly the same

# Config sections a method needs beyond the demo preset, from its paper:
# - InstDisc (Wu et al. 2018) trains with SGD, lr 0.03, weight decay 5e-4; under LARS at the
#   preset's rate its features fall below the random-init floor (in_memory_probe.py).
# - SwAV and DINO add multi-crop local views (the papers use 6 and 10; 2 here, each a
#   12 px crop), DINO with its AdamW (lr 5e-4 per 256 images, weight decay 0.04).
# - DeepCluster trains with its paper's SGD (lr 0.05 per 256 images, weight decay 1e-5) on
#   crops and flips, no colour.
# - MAE and SimMIM need a ViT, train with AdamW (MAE: lr 1.5e-4 per 256, weight decay
#   0.05; SimMIM: 8e-4 per 512) and use crops and flips only, no colour distortion.
# - The pretext tasks' papers augment with crops and flips only, and train with SGD
#   (RotNet: lr 0.1, weight decay 5e-4; Exemplar, jigsaw, context prediction, DAE alike;
#   PIRL lr 0.12 per 1024 images, weight decay 1e-4) or Adam (context encoder 2e-4,
#   CPC 4e-4 in CPC v2).
_NO_COLOUR = {"jitter_prob": 0.0, "grayscale_prob": 0.0}
_PRETEXT_SGD = {
    "train": {"optimizer": "sgd", "base_lr": 0.05, "weight_decay": 5e-4},
    "augment": _NO_COLOUR,
}
RECIPES: dict[str, dict[str, dict[str, object]]] = {
    **dict.fromkeys(["rotation", "relative_patch", "jigsaw", "denoising_ae"], _PRETEXT_SGD),
    # Exemplar's N-way softmax gives each class's weights a gradient only when one of its
    # samples is in the batch: under SGD (lr 0.05 or 0.5) 2,000 surrogate classes stayed at
    # chance for 150 steps, where AdamW learns. Its seed is the whole image (no random crop;
    # the paper's own translations and scalings move the patch), as in the paper.
    "exemplar": {
        "train": {"optimizer": "adamw", "base_lr": 1e-3, "weight_decay": 0.0},
        "augment": {**_NO_COLOUR, "crop_scale_min": 1.0},
    },
    "pirl": {
        "train": {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 1e-4},
        "augment": _NO_COLOUR,
    },
    "context_encoder": {
        "train": {"optimizer": "adamw", "base_lr": 2e-4, "weight_decay": 0.0},
        "augment": _NO_COLOUR,
    },
    "cpc": {
        "train": {"optimizer": "adamw", "base_lr": 4e-4, "weight_decay": 0.0},
        "augment": _NO_COLOUR,
    },
    "instdisc": {"train": {"optimizer": "sgd", "base_lr": 0.03, "weight_decay": 5e-4}},
    "swav": {"augment": {"local_crops": 2}},
    "dino": {
        "augment": {"local_crops": 2},
        "train": {"optimizer": "adamw", "base_lr": 5e-4, "weight_decay": 0.04},
    },
    "deepcluster": {
        "train": {"optimizer": "sgd", "base_lr": 0.05, "weight_decay": 1e-5},
        "augment": _NO_COLOUR,
    },
    "mae": {
        "model": {"backbone": "vit_tiny", "width": 0.5},
        "train": {"optimizer": "adamw", "base_lr": 1.5e-4, "weight_decay": 0.05},
        "augment": _NO_COLOUR,
    },
    "simmim": {
        "model": {"backbone": "vit_tiny", "width": 0.5},
        "train": {"optimizer": "adamw", "base_lr": 4e-4, "weight_decay": 0.05},
        "augment": _NO_COLOUR,
    },
}

# Exemplar CNN (Dosovitskiy et al. 2014) makes one surrogate class of each training image and
# learns from many transformed samples per class (N = 16,000 seeds, 100 samples each on
# STL-10); the budget is spent on this many seed images instead of the usual --limit.
SEED_IMAGES = {"exemplar": 2000}


def recipe_config(method: str, overrides: list[str]) -> dict[str, Any]:
    """The demo preset with ``overrides``, then ``method`` with its RECIPES entry, as a dict."""
    values = load_config(DEMO_CONFIG, overrides).to_dict()
    values["method"] = {"name": method}
    for section, options in RECIPES.get(method, {}).items():
        values[section].update(options)
    return values


def run(
    method: str, epochs: int, limit: int, root: Path, overrides: list[str]
) -> dict[str, object]:
    values = recipe_config(method, overrides)
    shutil.rmtree(root / f"bench-{method}", ignore_errors=True)  # measure afresh, never resume
    values["run"].update(name=f"bench-{method}", root=str(root))
    images = SEED_IMAGES.get(method, limit)
    values["data"]["limit"] = images
    # The same number of images processed: fewer images, more epochs.
    views = METHODS[method].requirements(method_params(method)).global_views
    two_view_epochs = round(epochs * 2 * limit / (views * images))
    values["train"].update(epochs=two_view_epochs, online_knn_bank=0)
    started = time.perf_counter()
    result = pretrain(from_dict(values))
    seconds = time.perf_counter() - started
    report = evaluate_checkpoint(result.checkpoint.path, floors=True)
    rows = {row.name.split()[0]: row for row in report.rows}
    return {"method": method, "epochs": two_view_epochs, "seconds": seconds, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--epochs", type=int, default=20, help="epochs of a two-view method")
    parser.add_argument("--limit", type=int, default=20000, help="training images per epoch")
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the demo preset for every method, e.g. on one GPU: "
        "--set train.use_gpu=true --set train.num_workers=1",
    )
    args = parser.parse_args()

    print(
        "| method | epochs | recipe | kNN top-1 | random init | raw pixels "
        "| feature spread | pretrain s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        r = run(method, args.epochs, args.limit, args.root, args.set)
        ssl, floor = r["SSL"], r["random-init"]
        collapsed = ssl.spread < COLLAPSE_SPREAD
        top1 = "COLLAPSED" if collapsed else f"{ssl.top1:.4f}"
        seeds = f" ({SEED_IMAGES[method]:,} seed images)" if method in SEED_IMAGES else ""
        beats = "" if collapsed or ssl.top1 > floor.top1 else " (below random init)"
        print(
            f"| {method}{seeds} | {r['epochs']} | {RECIPES.get(method, 'demo preset')} "
            f"| {top1}{beats} | {floor.top1:.4f} | {r['raw'].top1:.4f} "
            f"| {ssl.spread:.3f} | {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
