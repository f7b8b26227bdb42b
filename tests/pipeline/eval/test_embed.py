"""Embedding export: one unit-norm row per decodable image, equal to the in-process features,
labels carried through, every rejected row counted, and no mixing with an earlier export."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import from_dict
from pipeline.data.image_features import extract_features
from pipeline.data.ingest import ImageSpec, read_decoded
from pipeline.data.shards import write_shards
from pipeline.data.sources import ImageRecord
from pipeline.eval.embed import (
    EmbedActor,
    embedding_column,
    export_embeddings,
    raw_pixel_rows,
    read_embeddings,
)
from pipeline.eval.encoders import ENCODER_FEATURES, raw_pixel_features
from pipeline.train.checkpoint import (
    CheckpointState,
    build_method_for,
    method_from_checkpoint,
    save_checkpoint,
)

GOOD, SIZE = 120, 16
BROKEN = ["broken-0", "broken-1"]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _label(index: int) -> int | None:
    return None if index % 9 == 0 else index % 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """120 random 16 px grey images (every 9th unlabelled) and 2 PNGs cut short: their
    headers read, so the shards keep them, but they cannot be decoded."""
    rng = np.random.default_rng(0)
    records = [
        ImageRecord(
            f"img-{i:03d}", _png(rng.integers(0, 256, (SIZE, SIZE), np.uint8)), _label(i), "t"
        )
        for i in range(GOOD)
    ]
    for position, name in zip((7, 70), BROKEN, strict=True):
        whole = _png(rng.integers(0, 256, (SIZE, SIZE), np.uint8))
        records.insert(position, ImageRecord(name, whole[: len(whole) // 2], 3, "t"))
    out = tmp_path_factory.mktemp("embed") / "shards"
    manifest = write_shards(records, out, rows_per_shard=40, source="t")
    assert manifest.rows == GOOD + len(BROKEN) and len(manifest.shards) == 4
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = from_dict({"model": {"backbone": "small_cnn", "width": 0.25}})
    torch.manual_seed(0)
    method = build_method_for(config, channels=1, num_images=GOOD)
    directory = tmp_path_factory.mktemp("checkpoint")
    state = CheckpointState(
        model=method.state_dict(),
        config=config.to_dict(),
        channels=1,
        image_size=SIZE,
        num_images=GOOD,
        mean=[0.4],
        std=[0.3],
        epoch=1,
        optimizer={},
        step=0,
        torch_rng=torch.get_rng_state(),
        metrics={},
    )
    save_checkpoint(directory, state)
    return directory


@pytest.mark.slow
def test_export_embeds_every_decodable_image_once(ray_session, shards, checkpoint, tmp_path):
    out = tmp_path / "embeddings"
    out.mkdir()
    (out / "earlier-run.parquet").write_bytes(b"stale")
    summary = export_embeddings(checkpoint, shards, out, batch_size=32, overwrite=True)
    assert not (out / "earlier-run.parquet").exists()  # replaced, not mixed in
    assert (summary.rows_read, summary.rows_written, summary.rejected) == (122, 120, 2)
    assert sorted(image_id for image_id, _ in summary.rejects) == BROKEN
    assert all("truncated" in reason or "OSError" in reason for _, reason in summary.rejects)

    ids, embeddings, labels = read_embeddings(out)
    expected_ids = [f"img-{i:03d}" for i in range(GOOD)]
    assert ids == expected_ids  # one row per decodable id: none lost, none doubled
    assert embeddings.shape == (GOOD, summary.dim) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    expected_labels = [-1 if _label(i) is None else _label(i) for i in range(GOOD)]
    assert labels.tolist() == expected_labels

    method, _, state = method_from_checkpoint(checkpoint)
    images = read_decoded(shards, ImageSpec(SIZE, 1))
    assert images.ids == expected_ids
    mean, std = torch.tensor(state.mean), torch.tensor(state.std)
    # The export's actor runs on the GPU when there is one, where convolutions use TF32.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = method.to(device).features
    reference = extract_features(encoder, images.pixels, mean, std, device=device).numpy()
    assert summary.dim == method.feature_dim
    np.testing.assert_allclose(embeddings, reference, atol=1e-5 if device == "cpu" else 5e-3)

    with pytest.raises(ValueError, match="already holds files; pass overwrite=True"):
        export_embeddings(checkpoint, shards, out)


def test_raw_pixel_features_are_unit_norm():
    pixels = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8).numpy()
    norms = raw_pixel_features(pixels).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(5))


def test_a_batch_whose_rows_were_all_rejected_embeds_to_no_rows(checkpoint):
    empty = {
        "id": np.zeros(0, dtype=object),
        "image": np.zeros((0, 1, SIZE, SIZE), np.uint8),
        "label": np.zeros(0, np.int64),
    }
    actor = EmbedActor(str(checkpoint), {"trained": "embedding"})
    table = actor(empty)
    assert table.num_rows == 0
    assert table.schema.field("embedding").type.list_size == actor.methods["trained"].feature_dim


def test_overwrite_spares_a_directory_with_other_files(shards, checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        export_embeddings(checkpoint, shards, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_reading_an_empty_export_names_the_directory(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no embedding Parquet files"):
        read_embeddings(tmp_path)


def test_one_actor_holding_every_encoder_embeds_as_the_single_encoder_passes_do(checkpoint):
    # One pass of the evaluation: each decoded batch goes through the trained and the
    # random-init encoder and the raw pixels, each into its own column, with exactly the
    # features that a pass per encoder gives.
    rng = np.random.default_rng(1)
    batch = {
        "id": np.asarray([f"img-{i}" for i in range(9)], dtype=object),
        "image": rng.integers(0, 256, (9, 1, SIZE, SIZE), np.uint8),
        "label": np.arange(9, dtype=np.int64) % 4,
    }
    columns = {encoder: embedding_column(encoder) for encoder in ENCODER_FEATURES}
    table = EmbedActor(str(checkpoint), columns=columns)(batch)
    assert table.column_names == ["id", *columns.values(), "label"]
    assert table.column("id").to_pylist() == batch["id"].tolist()
    assert table.column("label").to_pylist() == batch["label"].tolist()
    for encoder, column in columns.items():
        single = (
            raw_pixel_rows(batch)
            if encoder == "raw_pixels"
            else EmbedActor(str(checkpoint), {encoder: "embedding"})(batch)
        )
        np.testing.assert_array_equal(
            table.column(column).combine_chunks().flatten().to_numpy(),
            single.column("embedding").combine_chunks().flatten().to_numpy(),
        )
    empty = {key: value[:0] for key, value in batch.items()}
    assert EmbedActor(str(checkpoint), columns=columns)(empty).num_rows == 0
    with pytest.raises(ValueError, match="encoders must be distinct ones of"):
        EmbedActor(str(checkpoint), columns={"pixels": "embedding"})
