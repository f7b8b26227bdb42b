"""Frozen-feature evaluation of a checkpoint: weighted kNN (Wu et al. 2018, arXiv:1805.01978).

The votes are ssl_models.knn's: train-split features form the memory bank, and each test
image's k most cosine-similar bank rows vote for their labels with weight exp(similarity / T).
The two floors next to it say whether the encoder learned anything: kNN on raw pixels, and
kNN on the same architecture with random weights.

Evaluation at scale never holds a split in one process: ``EvalContext.features_for`` runs
one Ray Data batch-inference pass per split for every encoder the protocols need and writes
the features as Parquet once, and ``evaluate_checkpoint`` streams the bank past the queries
(``ssl_models.knn.streamed_knn_accuracy``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import Config
from pipeline.data import locations
from pipeline.data.ingest import ImageSpec, decode_batch
from pipeline.data.shards import load_manifest, open_parquet, read_labels, shard_files
from pipeline.eval.encoders import check_encoder
from pipeline.eval.features import FeatureSplit, scratch_location
from pipeline.train.checkpoint import (
    CheckpointState,
    method_from_checkpoint,
    random_init_method,
)
from ssl_models.knn import streamed_knn_accuracy
from ssl_models.method import SSLMethod


@dataclass
class KNNRow:
    """One line of the evaluation table; ``spread`` is the queries' feature_spread."""

    name: str
    top1: float
    top5: float
    spread: float


@dataclass
class KNNReport:
    """The kNN protocol's settings and one row per feature set."""

    rows: list[KNNRow]
    k: int
    temperature: float
    queries: str

    def table(self) -> str:
        """The evaluation table printed by ``evaluate`` and ``demo``."""
        width = max(len(r.name) for r in self.rows)
        lines = [
            f"kNN (k={self.k}, cosine, T={self.temperature:g}) on {self.queries}",
            f"{'features':<{width}}  top-1   top-5   spread",
            f"{'-' * width}  ------  ------  ------",
        ]
        lines += [
            f"{r.name:<{width}}  {r.top1:.4f}  {r.top5:.4f}  {r.spread:.3f}" for r in self.rows
        ]
        return "\n".join(lines)


def _checked_labels(shard_dir: str, labels: np.ndarray) -> np.ndarray:
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ValueError(f"{shard_dir}: {unlabelled} images have no label; evaluation needs labels")
    if not len(labels):
        raise ValueError(f"{shard_dir}: no images")
    return labels


@dataclass
class EvalContext:
    """A checkpoint's frozen method and the labelled splits it is judged on.

    ``train_dir`` is the kNN bank / probe training split and ``test_dir`` the queries: by
    default the run's data.eval_train and data.eval_test; other shard directories give
    transfer to another dataset, decoded to the checkpoint's image size and channels. Each
    location may be a local path or an object-storage URI.

    No split is decoded into this process: ``features_for`` runs Ray Data batch inference
    (pipeline.eval.embed) once per split for every encoder asked for, or ``request``ed earlier,
    and not computed yet (one decode of each image, the network encoders side by side in
    the actors) and writes the result as Parquet under a scratch location
    (pipeline.eval.features), which every protocol then streams; only the splits' labels (and
    the train split's ids, for fine-tuning subsets) are read here. ``close`` deletes the
    scratch files.
    """

    method: SSLMethod
    config: Config
    state: CheckpointState
    checkpoint: str
    train_dir: str
    test_dir: str
    test_name: str
    batch_size: int = 512
    actors: int = 1
    accounts: dict[str, str] = field(default_factory=dict)
    _features: dict[tuple[str, str], FeatureSplit] = field(default_factory=dict, repr=False)
    _requested: list[str] = field(default_factory=list, repr=False)
    _passes: int = field(default=0, repr=False)
    _scratch: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)
    _scratch_dir: str | None = field(default=None, repr=False)

    @property
    def spec(self) -> ImageSpec:
        """The image size and channels the checkpoint was trained on."""
        return ImageSpec(size=self.state.image_size, channels=self.state.channels)

    @property
    def mean_std(self) -> tuple[Tensor, Tensor]:
        """The per-channel normalisation the checkpoint was trained with."""
        return torch.tensor(self.state.mean), torch.tensor(self.state.std)

    @property
    def run_dir(self) -> str:
        """The run directory: the checkpoint directory's parent."""
        return locations.parent(self.checkpoint)

    @functools.cached_property
    def train_ids_labels(self) -> tuple[list[str], np.ndarray]:
        """The train split's ids and labels (O(N) small values; no image is read)."""
        ids, labels = read_labels(self.train_dir)
        return ids, _checked_labels(self.train_dir, labels)

    @functools.cached_property
    def test_labels(self) -> np.ndarray:
        """The test split's labels (every image must have one)."""
        return _checked_labels(self.test_dir, read_labels(self.test_dir)[1])

    @property
    def num_classes(self) -> int:
        """One more than the largest label of either split."""
        return int(max(self.train_ids_labels[1].max(), self.test_labels.max())) + 1

    def split_dir(self, split: str) -> str:
        """The shard directory of ``split`` ("train" or "test")."""
        return {"train": self.train_dir, "test": self.test_dir}[split]

    def request(self, encoders: Iterable[str]) -> None:
        """Note encoders whose features will be wanted: the next pass over a split computes
        them too, so that the protocols' encoders share one pass per split. Nothing runs
        until features are asked for."""
        for encoder in encoders:
            check_encoder(encoder)
            if encoder not in self._requested:
                self._requested.append(encoder)

    def features(self, encoder: str, split: str) -> FeatureSplit:
        """``encoder``'s features ('trained', 'random_init' or 'raw_pixels') of ``split``
        ('train' or 'test'): ``features_for(split, [encoder])[encoder]``."""
        return self.features_for(split, [encoder])[encoder]

    def features_for(self, split: str, encoders: Iterable[str]) -> dict[str, FeatureSplit]:
        """Each of ``encoders``' features ('trained', 'random_init', 'raw_pixels') of
        ``split`` ('train' or 'test'). Those not computed yet, together with every
        ``request``ed one, are computed in one Ray Data batch-inference pass over the split,
        streamed through this process into Parquet (one column per encoder) and shared by
        the protocols. Every row is accounted for: written + rejected == the split's rows,
        else RuntimeError."""
        encoders = list(dict.fromkeys(encoders))
        for encoder in encoders:
            check_encoder(encoder)
        shard_dir = self.split_dir(split)  # a split used as both is embedded once
        missing = [
            e
            for e in dict.fromkeys([*encoders, *self._requested])
            if (e, shard_dir) not in self._features
        ]
        if missing:
            self._embed(split, shard_dir, missing)
        return {encoder: self._features[(encoder, shard_dir)] for encoder in encoders}

    def _embed(self, split: str, shard_dir: str, encoders: list[str]) -> None:
        """One pass over ``shard_dir``: every one of ``encoders``' features, into the cache."""
        import ray

        from pipeline.cluster import init_ray
        from pipeline.data.ledger import fetch_report, start_ledger
        from pipeline.eval.embed import embedding_column, embedding_dataset
        from pipeline.eval.features import write_feature_columns

        init_ray()
        if self._scratch_dir is None:
            remote_run = self.run_dir if locations.is_remote(self.checkpoint) else None
            self._scratch_dir = self._scratch.enter_context(scratch_location(remote_run))
        rows = load_manifest(shard_dir).rows
        ledger = start_ledger(rows)
        columns = {encoder: embedding_column(encoder) for encoder in encoders}
        try:
            ds = embedding_dataset(
                self.checkpoint,
                shard_dir,
                columns,
                batch_size=self.batch_size,
                actors=self.actors,
                ledger=ledger,
            )
            self._passes += 1
            out = locations.join(self._scratch_dir, f"{split}-{self._passes}")
            batches = ds.iter_batches(batch_format="pyarrow")
            written = write_feature_columns(batches, out, list(columns.values()))
            counts = fetch_report(ledger).get(1, {"delivered": 0, "rejects": []})
        finally:
            ray.kill(ledger)
        rejects = [(r["id"], r["reason"]) for r in counts["rejects"]]
        some = written[columns[encoders[0]]]
        if some.rows != counts["delivered"] or some.rows + len(rejects) != rows:
            raise RuntimeError(
                f"{shard_dir}: {rows} rows but {some.rows} embedded and {len(rejects)} rejected"
            )
        self.accounts[split] = (
            f"{shard_dir}: {rows} rows = {some.rows} embedded + {len(rejects)} rejected"
        )
        for encoder, column in columns.items():
            written[column].rejects = list(rejects)
            self._features[(encoder, shard_dir)] = written[column]

    @functools.cached_property
    def untrained(self) -> SSLMethod:
        """The same architecture with the run's seed and random weights: the floor."""
        return random_init_method(self.config, self.state)

    def label(self) -> str:
        """The run in a few words (method, backbone, width) for report rows."""
        model = self.config.model
        return f"{self.config.method_name} {model.backbone} w{model.width:g}"

    def close(self) -> None:
        """Delete the scratch features."""
        self._features.clear()
        self._requested.clear()
        self._scratch_dir = None
        self._scratch.close()

    def __enter__(self) -> EvalContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_eval_context(
    path: str | os.PathLike[str],
    train_dir: str | os.PathLike[str] | None = None,
    test_dir: str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 512,
    actors: int = 1,
) -> EvalContext:
    """Load a checkpoint (a checkpoint directory or file, local or a URI) and name its
    labelled evaluation splits (or the given ones); nothing is decoded yet."""
    path = locations.absolute(path)
    method, config, state = method_from_checkpoint(path)
    test = locations.absolute(test_dir or config.data.eval_test)
    train = locations.absolute(train_dir or config.data.eval_train)
    return EvalContext(
        method, config, state, path, train, test, str(test_dir or config.data.eval_test),
        batch_size=batch_size, actors=actors,
    )  # fmt: skip


BANK_CHUNK = 4096  # bank rows per similarity matmul in the streamed kNN
# The features of the kNN table's rows, in order: the encoder, then its two floors.
KNN_ENCODERS = ("trained", "raw_pixels", "random_init")


def evaluate_checkpoint(
    path: str | os.PathLike[str] | EvalContext,
    *,
    floors: bool = False,
    k: int | None = None,
    temperature: float | None = None,
) -> KNNReport:
    """The kNN top-1/top-5 of a checkpoint's frozen backbone on its config's eval splits.

    The queries' features are held (Q x D); the bank streams past them in chunks keeping
    each query's running top-k (ssl_models.knn), so memory does not grow with the bank. With
    ``floors``, also the raw-pixel floor and the random-init floor (same architecture,
    untrained weights, same normalisation), which a useful encoder must beat.
    """
    context = path if isinstance(path, EvalContext) else load_eval_context(path)
    try:
        k = k or context.config.eval.knn_k
        temperature = temperature or context.config.eval.knn_temperature
        num_classes = context.num_classes
        # Every row's encoder in one pass per split (the floors ride along with the encoder).
        context.request(KNN_ENCODERS if floors else KNN_ENCODERS[:1])

        def row(name: str, encoder: str) -> KNNRow:
            queries, labels = context.features(encoder, "test").load()
            bank = context.features(encoder, "train").batches(BANK_CHUNK)
            acc = streamed_knn_accuracy(bank, queries, labels, k, temperature, num_classes)
            return KNNRow(name, acc["top1"], acc["top5"], feature_spread(queries))

        model = context.config.model
        rows = [row(f"SSL {context.label()}, epoch {context.state.epoch}", "trained")]
        if floors:
            rows.append(row("raw pixels", "raw_pixels"))
            rows.append(row(f"random-init {model.backbone} w{model.width:g}", "random_init"))
        return KNNReport(rows, k, temperature, context.test_name)
    finally:
        if not isinstance(path, EvalContext):
            context.close()


def images_by_id(
    shard_dir: str | os.PathLike[str], ids: list[str], spec: ImageSpec
) -> dict[str, tuple[np.ndarray, int]]:
    """Decode only the images with the given ids: {id: (uint8 (C, S, S), label)}. Each shard
    row group's id column is read, and the images of row groups holding a wanted id."""
    wanted = set(ids)
    found: dict[str, tuple[np.ndarray, int]] = {}
    for location in shard_files(shard_dir):
        parquet = open_parquet(location)
        for group in range(parquet.metadata.num_row_groups):
            group_ids = parquet.read_row_group(group, columns=["id"]).column("id").to_pylist()
            if wanted.isdisjoint(group_ids):
                continue
            table = parquet.read_row_group(group, columns=["id", "image", "label"])
            table = table.filter(pc.is_in(table["id"], value_set=pa.array(sorted(wanted))))
            row_ids = table.column("id").to_pylist()
            labels = table.column("label").fill_null(-1).to_numpy()
            images = np.asarray(table.column("image").to_pylist(), dtype=object)
            decoded = decode_batch(row_ids, images, spec)
            for slot, position in enumerate(decoded.kept):
                found[row_ids[position]] = (decoded.pixels[slot], int(labels[position]))
            wanted -= set(row_ids)
            if not wanted:
                return found
    return found


def feature_spread(features: Tensor) -> float:
    """How far apart L2-normalised features are: mean per-dimension std times sqrt(D).

    About 1 for directions spread over the sphere, lower for features confined to a cone
    (e.g. after a ReLU), and 0 when every image maps to the same embedding (collapse).
    """
    normalised = F.normalize(features.float(), dim=1)
    return (normalised.std(dim=0).mean() * normalised.shape[1] ** 0.5).item()
