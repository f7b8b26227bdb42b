"""``prepare``: convert an image source into Parquet shards (a Ray Data job)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.arguments import add_command

SUMMARY = "convert an image source into Parquet shards (a Ray Data job)"
DESCRIPTION = """\
Convert an image source into Parquet shards (columns id, image, label, source) plus a
manifest.json, as a Ray Data job: reading, decoding, checking and re-encoding run as
parallel tasks over the cluster's CPUs (RAY_ADDRESS, else a local cluster). JPEG/PNG bytes
are kept as they are; other formats and odd modes (CMYK, palette, 16-bit, ...) become 8-bit
PNG; unreadable, truncated and over-large images are skipped and listed with their reason
in the manifest's `skipped`. Progress is printed every few seconds with an ETA.

SOURCE is one of (folder:, parquet:, tar: and list: take a local path or an s3://, gs:// URI):
  fashion-mnist      Debian package dataset-fashion-mnist (IDX files); train + test splits
  mnist              MNIST IDX files under --root; train + test splits
  cifar10:DIR        CIFAR-10 python batches (data_batch_1..5, test_batch); train + test
  folder:DIR         an image folder or bucket prefix; first-level sub-folders are classes
                     (optional); id = path relative to DIR
  parquet:PATH       Parquet file(s) with an `image` column (binary, or a Hugging Face
                     {bytes, path} struct) and optional id, label; id = `id` or FILE/ROW
  tar:PATH           WebDataset tar shards (a .tar file or a folder/prefix of them): the
                     image is a sample's jpg/jpeg/png/webp/... member, the label its
                     cls/label/class member; id = TARNAME/KEY
  list:FILE          a CSV (with a header) or Parquet list of images: column uri or path
                     (relative to FILE's folder), optional label (ints, or names numbered
                     in sorted order) and id (default: the uri)

Ids and labels do not depend on the parallelism: the source is listed in sorted order and
cut into chunks of --rows-per-shard entries (one per tar file), chunk i -> part-0000i.parquet.
On a multi-node cluster, local paths (folder, parquet, tar, list and --out) must mean the same
on every node (a shared filesystem); bucket URIs work everywhere.

Cached and resumable: a split whose manifest exists is reused unless --overwrite. An
interrupted prepare, run again with the same arguments, keeps the shards it finished
(OUT/SPLIT/_prepare.json and _parts/ record them) and does only the rest; if the source or
--rows-per-shard changed meanwhile it refuses unless --overwrite, which starts again. The
manifest is written last, then the bookkeeping files are removed. --overwrite never deletes
a directory that holds files other than shards.

Examples:
  python -m pipeline prepare fashion-mnist
  python -m pipeline prepare folder:~/photos --out data/shards/photos --split train
  python -m pipeline prepare folder:s3://bucket/raw-images/ --out s3://bucket/shards/photos
  python -m pipeline prepare tar:s3://bucket/wds/ --out s3://bucket/shards/wds --tasks 32
  python -m pipeline prepare list:images.csv --split val
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``prepare`` and its options."""
    parser = add_command(commands, "prepare", SUMMARY, DESCRIPTION)
    parser.add_argument("source", help="what to convert (see above)")
    parser.add_argument(
        "--out",
        help="output directory or s3:// / gs:// prefix (default data/shards/NAME); each "
        "split goes to OUT/SPLIT",
    )
    parser.add_argument(
        "--root", type=Path, help="directory holding IDX files (fashion-mnist, mnist)"
    )
    parser.add_argument(
        "--split", default="train", help="split name for folder/parquet/tar/list sources"
    )
    parser.add_argument(
        "--rows-per-shard", type=int, default=4096, help="images per shard (default 4096)"
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        metavar="N",
        help="parallel Ray tasks (default: the cluster's CPUs)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite existing shards, or restart an unfinished prepare from scratch",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the shards and print one line per split: images, shards and skipped images."""
    from pipeline.data.prepare import prepare

    manifests = prepare(
        args.source,
        args.out,
        root=args.root,
        split=args.split,
        rows_per_shard=args.rows_per_shard,
        overwrite=args.overwrite,
        tasks=args.tasks,
    )
    for split, manifest in manifests.items():
        print(
            f"{split}: {manifest.rows} images in {len(manifest.shards)} shards, "
            f"{len(manifest.skipped)} skipped"
        )
    return 0
