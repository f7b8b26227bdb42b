"""Transfer: checkpoints pretrained on Fashion-MNIST, scored on handwritten digits.

No second labelled image dataset is installed on the build machine, but scikit-learn's wheel
carries one: the UCI optical-recognition digits (1,797 grayscale 8x8 images with 17 grey
levels, 10 classes; Alpaydin & Kaynak 1998). This script writes them once as an image
folder per split (half of each class in each split, seeded), turns each folder into shards
with the pipeline's own ``prepare folder:DIR``, and then runs

    python -m pipeline evaluate --checkpoint RUN --protocol knn linear --k 20 \\
        --train-data data/shards/digits/train --test-data data/shards/digits/test

for every run given, so the images go through the same path a user's labelled folder
would: decoded and resized to the checkpoint's input, results merged into the run's
eval.json under ``@digits`` keys (``report`` shows them next to the in-domain ones). kNN
uses k=20 because the bank holds only about 90 images per class.

    .venv/bin/pip install scikit-learn
    .venv/bin/python benchmarks/transfer.py runs/eval-simclr runs/eval-byol
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import main as cli
from pipeline.data.prepare import prepare


def write_digit_folders(root: Path, seed: int) -> None:
    """``root/{train,test}/<digit>/<index>.png``: half of each class per split, 0-16 grey
    levels stretched to 0-255."""
    from sklearn.datasets import load_digits  # the benchmark's only use of scikit-learn

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        rows = rng.permutation(np.flatnonzero(digits.target == label))
        half = len(rows) // 2
        for split, chosen in (("train", rows[:half]), ("test", rows[half:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                pixels = np.round(digits.images[row] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{row:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories to evaluate")
    parser.add_argument("--images", type=Path, default=Path("data/digits"))
    parser.add_argument("--shards", type=Path, default=Path("data/shards/digits"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    args = parser.parse_args()
    if not (args.images / "test").is_dir():
        write_digit_folders(args.images, args.seed)
    for split in ("train", "test"):
        manifest = prepare(f"folder:{args.images / split}", args.shards, split=split)[split]
        print(f"digits {split}: {manifest.rows} images, {len(manifest.skipped)} skipped")
    splits = ["--train-data", str(args.shards / "train"), "--test-data", str(args.shards / "test")]
    protocols = ["--protocol", "knn", "linear", "--k", "20"]
    for run in args.runs:
        status = cli(["evaluate", "--checkpoint", str(run), *protocols, *splits])
        if status:
            raise SystemExit(status)


if __name__ == "__main__":
    main()
