"""Embedding export: a checkpoint's frozen encoder over a shard directory, as Ray Data batch
inference (the stateful-actor pattern of Ray's offline batch inference guide).

CPU tasks decode the shards with the checkpoint's ImageSpec (Ray fuses them into the actors
when those need no GPU); a pool of actors, each holding the encoder once (on a GPU when the
cluster has one), turns the images into L2-normalised features exactly as
``pipeline.data.image_features.extract_features`` does for kNN (Wu et al. 2018,
arXiv:1805.01978).
Every input row is either embedded or rejected with its id and reason; an ``IngestLedger``
counts both, so the export accounts for every row.

Evaluation wants several encoders' features of the same split (the trained encoder, the
random-init floor, the raw pixels): ``embedding_dataset`` gives them all from one pass, each
image decoded once and embedded by every encoder the actor holds, one column per encoder; an
export is the same pass with the trained encoder alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch
from ray.actor import ActorHandle

from pipeline.data import locations
from pipeline.data.image_features import extract_features
from pipeline.data.ingest import ImageSpec, decode_batch, shard_rows_dataset
from pipeline.data.ledger import fetch_report, start_ledger
from pipeline.data.shards import load_manifest, open_parquet, read_parquet
from pipeline.eval.encoders import ENCODER_FEATURES, raw_pixel_features
from pipeline.train.checkpoint import load_checkpoint, method_from_checkpoint, random_init_method
from ssl_models.method import SSLMethod

_PASS = 1  # the ledger counts per pass; an export is a single pass over the shards


def _decode_rows(
    batch: pa.Table, spec: ImageSpec, ledger: ActorHandle | None
) -> dict[str, np.ndarray]:
    """Ray Data batch function: {id, image bytes, label} -> {id, image uint8, label}."""
    ids = batch["id"].to_pylist()
    labels = pc.fill_null(batch["label"], -1).to_numpy().astype(np.int64)
    decoded = decode_batch(ids, batch["image"].to_numpy(zero_copy_only=False), spec)
    if ledger is not None:
        # Waited on, so the counts are complete once the dataset has been consumed.
        rejects = [(ids[p], reason) for p, reason in decoded.rejects.items()]
        ray.get(ledger.record.remote(_PASS, len(decoded.kept), rejects))
    return {
        "id": np.asarray(ids, dtype=object)[decoded.kept],
        "image": decoded.pixels,
        "label": labels[decoded.kept],
    }


def embedding_column(encoder: str) -> str:
    """The column holding ``encoder``'s features in a multi-encoder pass
    (``embedding_dataset``): ``embedding_trained``, ``embedding_random_init``, ..."""
    return f"embedding_{encoder}"


def _embedding_array(features: np.ndarray) -> pa.FixedSizeListArray:
    # A fixed-size list, not Ray's tensor extension type, so any Parquet reader can use it.
    return pa.FixedSizeListArray.from_arrays(
        np.ascontiguousarray(features, np.float32).reshape(-1), features.shape[1]
    )


def _features_table(batch: dict[str, np.ndarray], features: dict[str, np.ndarray]) -> pa.Table:
    """{id, <one column per features entry>, label}: the columns in ``features``' order."""
    columns: dict[str, pa.Array] = {"id": pa.array(batch["id"].tolist(), pa.string())}
    columns.update({name: _embedding_array(values) for name, values in features.items()})
    columns["label"] = pa.array(batch["label"], pa.int64())
    return pa.table(columns)


def _raw_pixels(images: np.ndarray) -> np.ndarray:
    """The raw-pixel floor's features of a decoded batch (also of an empty one)."""
    if not len(images):
        return np.zeros((0, int(np.prod(images.shape[1:]))), np.float32)
    return raw_pixel_features(images).numpy()


def _check_encoders(encoders: Sequence[str]) -> None:
    unknown = [e for e in encoders if e not in ENCODER_FEATURES]
    if unknown or not encoders or len(set(encoders)) != len(encoders):
        raise ValueError(
            f"encoders must be distinct ones of {ENCODER_FEATURES}, got {list(encoders)!r}"
        )


class EmbedActor:
    """Holds a checkpoint's network encoders (eval mode) and embeds decoded batches with each.

    ``columns`` ({encoder: output column}) names the features wanted: the ``trained``
    encoder, the ``random_init`` floor (the same architecture with the run's seed and random
    weights) and the ``raw_pixels``, any of them at once; each image goes through every one,
    and each encoder's features land in its own column."""

    def __init__(self, checkpoint: str, columns: Mapping[str, str]) -> None:
        self.columns = dict(columns)
        _check_encoders(list(self.columns))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        method, config, state = method_from_checkpoint(checkpoint)
        self.methods: dict[str, SSLMethod] = {}
        if "trained" in self.columns:
            self.methods["trained"] = method.to(self.device)
        if "random_init" in self.columns:
            self.methods["random_init"] = random_init_method(config, state).to(self.device)
        self.mean, self.std = torch.tensor(state.mean), torch.tensor(state.std)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """{id, image, label} -> {id, one features column per encoder, label}."""
        rows = len(batch["id"])
        features: dict[str, np.ndarray] = {}
        for encoder, column in self.columns.items():
            if encoder == "raw_pixels":
                features[column] = _raw_pixels(batch["image"])
                continue
            method = self.methods[encoder]
            if rows:  # one pass per batch: Ray Data already sized it
                features[column] = extract_features(
                    method.features, batch["image"], self.mean, self.std, rows, self.device
                ).numpy()
            else:  # every row of the batch was rejected
                features[column] = np.zeros((0, method.feature_dim), np.float32)
        return _features_table(batch, features)


def raw_pixel_rows(batch: dict[str, np.ndarray], column: str = "embedding") -> pa.Table:
    """Ray Data batch function: decoded {id, image, label} -> the raw-pixel floor's
    "embedding": flattened, L2-normalised pixels (``pipeline.eval.encoders.raw_pixel_features``)."""
    return _features_table(batch, {column: _raw_pixels(batch["image"])})


def embedding_dataset(
    checkpoint: str | os.PathLike[str],
    shard_dir: str | os.PathLike[str],
    columns: Mapping[str, str],
    *,
    batch_size: int = 512,
    actors: int = 1,
    ledger: ActorHandle | None = None,
) -> ray.data.Dataset:
    """Lazy dataset of {id, one column of float32 unit-norm features per encoder, label (-1
    if unknown)} for the decodable images of ``shard_dir`` (a local directory or an
    object-storage URI). ``columns`` ({encoder: column}) picks the features: the
    checkpoint's ``trained`` encoder, the ``random_init`` floor (same architecture, run seed)
    and ``raw_pixels`` (flattened, L2-normalised pixels); each image is read and decoded
    once, and the actors hold every network encoder asked for, so an evaluation's encoders
    cost one pass over the split. Rejected rows are logged and, with a ``ledger``
    (``IngestLedger``), counted once each under pass 1 with id and reason. Up to ``actors``
    encoder copies run, one GPU each when the cluster has GPUs."""
    columns = dict(columns)
    _check_encoders(list(columns))
    if batch_size < 1 or actors < 1:
        raise ValueError(f"batch_size and actors must be at least 1, got {batch_size}, {actors}")
    checkpoint = locations.absolute(checkpoint)
    state = load_checkpoint(checkpoint)
    spec = ImageSpec(size=state.image_size, channels=state.channels)
    # Ray types map_batches' fn as taking the batch alone; fn_kwargs supplies the rest.
    ds = shard_rows_dataset(shard_dir, ["id", "image", "label"]).map_batches(
        _decode_rows,  # type: ignore[arg-type]
        fn_kwargs={"spec": spec, "ledger": ledger},
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=1,
    )
    if list(columns) == ["raw_pixels"]:  # no network: the decode tasks do it (fused)
        return ds.map_batches(
            raw_pixel_rows,
            fn_kwargs={"column": columns["raw_pixels"]},
            batch_size=batch_size,
            batch_format="numpy",
        )
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"checkpoint": checkpoint, "columns": columns},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        # Asked of the cluster, not the driver: the driver may well have no GPU.
        num_gpus=1 if ray.cluster_resources().get("GPU", 0) > 0 else 0,
        batch_size=batch_size,
        batch_format="numpy",
    )


@dataclass
class EmbedSummary:
    """What an export did: rows read = written + rejected (the rejects as (id, reason)), and
    the embedding dimension (0 when no row could be decoded)."""

    rows_read: int
    rows_written: int
    rejects: list[tuple[str, str]]
    dim: int

    @property
    def rejected(self) -> int:
        """How many rows were rejected."""
        return len(self.rejects)


def _parquet_files(location: str | os.PathLike[str]) -> list[str]:
    """The Parquet files directly under a location (none when it is not there)."""
    if not locations.exists(location):
        return []
    return [
        entry.location
        for entry in locations.list_files(location, recursive=False)
        if entry.relative.endswith(".parquet")
    ]


def _clear_output(out_dir: str, overwrite: bool) -> None:
    """Refuse an output directory that holds files (unless ``overwrite``) or anything but
    Parquet files; delete the Parquet files of an earlier export when overwriting."""
    if locations.is_file(out_dir):
        raise ValueError(f"{out_dir}: the output must be a directory, this is a file")
    existing = locations.list_files(out_dir, recursive=False) if locations.exists(out_dir) else []
    if existing and not overwrite:
        raise ValueError(f"{out_dir} already holds files; pass overwrite=True to replace them")
    if any(not entry.relative.endswith(".parquet") for entry in existing):
        raise ValueError(f"{out_dir}: refusing to overwrite, it holds more than Parquet files")
    for entry in existing:
        locations.delete_file(entry.location)


def export_embeddings(
    checkpoint: str | os.PathLike[str],
    shard_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 512,
    actors: int = 1,
    overwrite: bool = False,
) -> EmbedSummary:
    """Write ``embedding_dataset`` as Parquet files under ``out_dir`` (a local directory or an
    object-storage URI; so may the checkpoint and the shards be) and account for every row.

    An ``out_dir`` that already holds files is refused, so two runs never mix; with
    ``overwrite`` its Parquet files are replaced (anything else there is still refused).
    """
    out_dir = locations.absolute(out_dir)
    _clear_output(out_dir, overwrite)
    rows = load_manifest(shard_dir).rows
    ledger = start_ledger(rows)
    try:
        ds = embedding_dataset(
            checkpoint,
            shard_dir,
            {"trained": "embedding"},
            batch_size=batch_size,
            actors=actors,
            ledger=ledger,
        )
        filesystem, path = locations.resolve(out_dir)
        ds.write_parquet(path, filesystem=filesystem)
        counts = fetch_report(ledger)[_PASS]
    finally:
        ray.kill(ledger)
    files = _parquet_files(out_dir)
    written = sum(open_parquet(location).metadata.num_rows for location in files)
    rejects = [(r["id"], r["reason"]) for r in counts["rejects"]]
    if written != counts["delivered"] or written + len(rejects) != rows:
        raise RuntimeError(
            f"{out_dir}: {rows} rows read but {written} written and {len(rejects)} rejected "
            f"({counts['delivered']} decoded)"
        )
    dim = open_parquet(files[0]).schema_arrow.field("embedding").type.list_size if files else 0
    return EmbedSummary(rows_read=rows, rows_written=written, rejects=rejects, dim=dim)


def read_embeddings(out_dir: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """An export's ids, float32 embeddings (N, D) and int64 labels, sorted by id (the whole
    export in memory: for inspection and tests, not for evaluation at scale)."""
    files = _parquet_files(out_dir)
    if not files:
        raise ValueError(f"{out_dir}: no embedding Parquet files (run the embed export first)")
    table = pa.concat_tables(read_parquet(location) for location in files)
    table = table.sort_by("id")
    column = table.column("embedding").combine_chunks()
    embeddings = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    labels = table.column("label").to_numpy().astype(np.int64)
    return table.column("id").to_pylist(), embeddings.astype(np.float32), labels
