"""Embedding export: a checkpoint's frozen encoder over a shard directory, as Ray Data batch
inference (the stateful-actor pattern of Ray's offline batch inference guide).

CPU tasks decode the shards with the checkpoint's ImageSpec (Ray fuses them into the actors
when those need no GPU); a pool of actors, each holding the encoder once (on a GPU when the
cluster has one), turns the images into L2-normalised features exactly as
``pipeline.evaluate.extract_features`` does for kNN (Wu et al. 2018, arXiv:1805.01978).
Every input row is either embedded or rejected with its id and reason; an ``IngestLedger``
counts both, so the export accounts for every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.actor import ActorHandle

from pipeline.checkpoint import load_checkpoint, method_from_checkpoint
from pipeline.evaluate import extract_features
from pipeline.ingest import ImageSpec, decode_batch
from pipeline.ledger import IngestLedger
from pipeline.shards import load_manifest, shard_files

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


class EmbedActor:
    """Holds one checkpoint's encoder (eval mode) and embeds decoded batches."""

    def __init__(self, checkpoint: str) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        method, _, state = method_from_checkpoint(checkpoint)
        self.method = method.to(self.device)
        self.mean, self.std = torch.tensor(state["mean"]), torch.tensor(state["std"])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = len(batch["id"])
        if rows:  # one pass per batch: Ray Data already sized it
            encoder = self.method.features
            features = extract_features(
                encoder, batch["image"], self.mean, self.std, rows, self.device
            ).numpy()
        else:  # every row of the batch was rejected
            features = np.zeros((0, self.method.feature_dim), np.float32)
        # A fixed-size list, not Ray's tensor extension type, so any Parquet reader can use it.
        embedding = pa.FixedSizeListArray.from_arrays(features.reshape(-1), features.shape[1])
        return pa.table(
            {
                "id": pa.array(batch["id"].tolist(), pa.string()),
                "embedding": embedding,
                "label": pa.array(batch["label"], pa.int64()),
            }
        )


def embedding_dataset(
    checkpoint: str | Path,
    shard_dir: str | Path,
    *,
    batch_size: int = 512,
    actors: int = 1,
    ledger: ActorHandle | None = None,
) -> ray.data.Dataset:
    """Lazy dataset of {id, embedding (float32, unit norm), label (-1 if unknown)} for the
    decodable images of ``shard_dir``; rejected rows are logged and, with a ``ledger``
    (``IngestLedger``), counted under pass 1 with id and reason. Up to ``actors`` encoder
    copies run, one GPU each when the cluster has GPUs."""
    if batch_size < 1 or actors < 1:
        raise ValueError(f"batch_size and actors must be at least 1, got {batch_size}, {actors}")
    state = load_checkpoint(checkpoint)
    spec = ImageSpec(size=state["image_size"], channels=state["channels"])
    files = shard_files(shard_dir)
    ds = (
        ray.data.read_parquet(files)
        .select_columns(["id", "image", "label"])
        .map_batches(
            _decode_rows,
            fn_kwargs={"spec": spec, "ledger": ledger},
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=1,
        )
    )
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).absolute())},
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
        return len(self.rejects)


def export_embeddings(
    checkpoint: str | Path,
    shard_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 512,
    actors: int = 1,
    overwrite: bool = False,
) -> EmbedSummary:
    """Write ``embedding_dataset`` as Parquet files under ``out_dir`` and account for every row.

    An ``out_dir`` that already holds files is refused, so two runs never mix; with
    ``overwrite`` its Parquet files are replaced (anything else there is still refused).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: the output must be a directory, this is a file")
    existing = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"{out_dir} already holds files; pass overwrite=True to replace them")
    if any(path.suffix != ".parquet" or not path.is_file() for path in existing):
        raise ValueError(f"{out_dir}: refusing to overwrite, it holds more than Parquet files")
    for path in existing:
        path.unlink()
    rows = load_manifest(shard_dir).rows
    ledger = IngestLedger.remote(rows)
    try:
        ds = embedding_dataset(
            checkpoint, shard_dir, batch_size=batch_size, actors=actors, ledger=ledger
        )
        ds.write_parquet(str(out_dir.absolute()))
        counts = ray.get(ledger.report.remote())[_PASS]
    finally:
        ray.kill(ledger)
    files = sorted(out_dir.glob("*.parquet"))
    written = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    rejects = [(r["id"], r["reason"]) for r in counts["rejects"]]
    if written != counts["delivered"] or written + len(rejects) != rows:
        raise RuntimeError(
            f"{out_dir}: {rows} rows read but {written} written and {len(rejects)} rejected "
            f"({counts['delivered']} decoded)"
        )
    dim = pq.read_schema(files[0]).field("embedding").type.list_size if files else 0
    return EmbedSummary(rows_read=rows, rows_written=written, rejects=rejects, dim=dim)


def read_embeddings(out_dir: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """An export's ids, float32 embeddings (N, D) and int64 labels, sorted by id."""
    files = sorted(Path(out_dir).glob("*.parquet"))
    if not files:
        raise ValueError(f"{out_dir}: no embedding Parquet files (run the embed export first)")
    table = pa.concat_tables(pq.read_table(path) for path in files)
    table = table.sort_by("id")
    column = table.column("embedding").combine_chunks()
    embeddings = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    labels = table.column("label").to_numpy().astype(np.int64)
    return table.column("id").to_pylist(), embeddings.astype(np.float32), labels
