"""``preview``: a PNG of training images next to the random views the augment section draws."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.arguments import TRAINING_CONFIG, add_command, add_config_args

SUMMARY = "PNG of training images and the random views the augment section draws"
DESCRIPTION = """\
See what an augmentation setting does before training with it: one row per image of
data.train, the original and then --views random views drawn exactly as the data stage
draws them (same recipes, same code). Methods with several kinds of view (BYOL's asymmetric
pair, DINO's local crops) get their columns in turn, one kind after the other.

Examples:
  python -m pipeline preview --config configs/fmnist_simclr.yaml --out preview.png
  python -m pipeline preview --set augment.strength=1.0 --set augment.crop_scale_min=0.08 \\
      --out strong.png
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``preview`` and its options."""
    parser = add_command(commands, "preview", SUMMARY, DESCRIPTION)
    add_config_args(parser, TRAINING_CONFIG)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--images", type=int, default=8, help="images (rows)")
    parser.add_argument("--views", type=int, default=6, help="views per image (columns)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn views")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Draw the views of the first images of data.train and write the PNG."""
    from pipeline.config import load_config
    from pipeline.data.ingest import ImageSpec, read_decoded
    from pipeline.data.shards import load_manifest
    from pipeline.eval.pictures import augmentation_preview
    from pipeline.train.views import view_recipes

    config = load_config(args.config, args.overrides)
    spec = ImageSpec.from_manifest(load_manifest(config.data.train), config.data.image_size)
    images = read_decoded(config.data.train, spec, args.images)
    kinds = list(dict.fromkeys(view_recipes(config, spec.size)))  # each kind of view once
    path = augmentation_preview(images.pixels, kinds, args.views, args.out, seed=args.seed)
    print(f"wrote {path}; columns cycle through {len(kinds)} kind(s) of view:")
    for number, recipe in enumerate(kinds, 1):
        print(
            f"  {number}: {recipe.size} px, crop {recipe.crop_scale}, blur p={recipe.blur_prob}, "
            f"solarize p={recipe.solarize_prob}, jitter p={recipe.jitter_prob}"
        )
    return 0
