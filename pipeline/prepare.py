"""``prepare``: turn an image source into Parquet shards, once.

Sources are named like ``fashion-mnist``, ``mnist``, ``cifar10:DIR``, ``folder:DIR`` or
``parquet:PATH``. Known datasets with a train/test split produce ``OUT/train`` and
``OUT/test``; a folder or Parquet source produces one split, ``OUT/<split>``. Writing is
idempotent: a split whose manifest exists is not rewritten unless ``overwrite`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.shards import MANIFEST_NAME, ShardManifest, load_manifest, write_shards
from pipeline.sources import (
    ImageRecord,
    SkipCounter,
    SourceError,
    builtin_idx_files,
    read_cifar10,
    read_idx,
    read_image_folder,
    read_parquet_images,
)

BUILTIN = ("fashion-mnist", "mnist")
SOURCE_KINDS = ("cifar10", "folder", "parquet")


def _split_readers(
    source: str, root: Path | None, split: str
) -> dict[str, Callable[[SkipCounter], Iterator[ImageRecord]]]:
    """Map each split the source has to a function producing its records."""
    if source in BUILTIN:

        def idx(name: str) -> Callable[[SkipCounter], Iterator[ImageRecord]]:
            return lambda skipped: read_idx(*builtin_idx_files(source, name, root), source, name)

        return {"train": idx("train"), "test": idx("test")}
    kind, sep, location = source.partition(":")
    if not sep or kind not in SOURCE_KINDS or not location:
        raise SourceError(
            f"unknown source {source!r}: use one of {', '.join(BUILTIN)}, "
            + ", ".join(f"{k}:PATH" for k in SOURCE_KINDS)
        )
    path = Path(location).expanduser()
    if not path.exists():
        raise SourceError(f"source path {path} does not exist")
    if kind == "cifar10":
        return {name: (lambda s, n=name: read_cifar10(path, n)) for name in ("train", "test")}
    if kind == "folder":
        return {split: lambda skipped: read_image_folder(path, skipped)}
    return {split: lambda skipped: read_parquet_images(path)}


def default_out(source: str) -> Path:
    """``data/shards/<name>`` for a source, e.g. data/shards/fashion-mnist."""
    name = source if source in BUILTIN else Path(source.partition(":")[2]).name or "dataset"
    return Path("data") / "shards" / name


def prepare(
    source: str,
    out: Path | None = None,
    *,
    root: Path | None = None,
    split: str = "train",
    rows_per_shard: int = 4096,
    overwrite: bool = False,
) -> dict[str, ShardManifest]:
    """Write (or reuse) the shards of every split of ``source``; returns their manifests."""
    out = out or default_out(source)
    manifests = {}
    for name, records in _split_readers(source, root, split).items():
        if not overwrite and (out / name / MANIFEST_NAME).is_file():
            manifests[name] = load_manifest(out / name)
            continue
        skipped = SkipCounter()
        manifests[name] = write_shards(
            records(skipped),
            out / name,
            rows_per_shard=rows_per_shard,
            source=f"{source}:{name}",
            skipped=skipped,
            overwrite=overwrite,
        )
    return manifests
