"""Ray Data ingest: exact delivery per epoch across workers, fresh views every epoch."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.augment import ViewRecipe
from pipeline.ingest import ImageSpec, augment_batch, decode_image, read_decoded, training_dataset
from pipeline.shards import load_manifest


def _record_epochs(config: dict) -> None:
    """Iterate the shard twice; write every id and a digest of both views per epoch."""
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(2):
        seen = {}
        for batch in shard.iter_batches(batch_size=64, batch_format="numpy"):
            for image_id, a, b in zip(batch["id"], batch["view_0"], batch["view_1"], strict=True):
                digests = [hashlib.sha1(view.tobytes()).hexdigest() for view in (a, b)]
                seen[str(image_id)] = [*digests, bool((a != b).any())]
        Path(config["out"], f"rank{rank}_epoch{epoch}.json").write_text(json.dumps(seen))
        ray.train.report({"epoch": epoch})


@pytest.mark.slow
def test_each_id_once_per_epoch_and_views_change(ray_session, fmnist_small, tmp_path):
    spec = ImageSpec.from_manifest(load_manifest(fmnist_small["train"]), None)
    limit = 1000
    ds = training_dataset(
        fmnist_small["train"], spec, ViewRecipe.simclr(spec.size), limit=limit, batch_size=128
    )
    TorchTrainer(
        _record_epochs,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ingest", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
    ).fit()
    epochs = []
    for epoch in range(2):
        ranks = [
            json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2)
        ]
        assert not set(ranks[0]) & set(ranks[1]), "an id reached both workers"
        both = ranks[0] | ranks[1]
        # streaming_split(equal=True) gives both workers the same count; 1000 splits evenly.
        assert len(ranks[0]) == len(ranks[1]) == limit // 2
        assert set(both) == set(read_decoded(fmnist_small["train"], spec, limit).ids)
        assert all(differ for _, _, differ in both.values()), "the two views of an image match"
        epochs.append(both)
    changed = sum(epochs[0][i][0] != epochs[1][i][0] for i in epochs[0])
    assert changed == limit, "views were not re-drawn in the second epoch"


def test_augment_batch_drops_and_logs_undecodable_rows(fmnist_small, caplog):
    spec = ImageSpec(size=28, channels=1)
    good = read_decoded(fmnist_small["train"], spec, 2)
    import pyarrow.parquet as pq

    from pipeline.shards import shard_files

    table = pq.read_table(shard_files(fmnist_small["train"])[0]).slice(0, 2)
    batch = {
        "id": np.asarray(["a", "broken", "b"], dtype=object),
        "image": np.asarray(
            [table["image"][0].as_py(), b"not an image", table["image"][1].as_py()], dtype=object
        ),
    }
    out = augment_batch(batch, spec, ViewRecipe.simclr(28), num_views=3)
    assert list(out["id"]) == ["a", "b"]
    assert out["view_2"].shape == (2, 1, 28, 28) and out["view_0"].dtype == np.uint8
    assert "broken" in caplog.text
    np.testing.assert_array_equal(decode_image(table["image"][0].as_py(), spec), good.pixels[0])


def test_decode_resizes_and_converts_to_the_spec(tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (50, 30), (10, 20, 30, 128)).save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), ImageSpec(size=16, channels=3))
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    gray = decode_image(buffer.getvalue(), ImageSpec(size=8, channels=1))
    assert gray.shape == (1, 8, 8)
