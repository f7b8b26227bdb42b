"""Ray Data ingest: exact delivery per pass across workers, fresh views every pass."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray.data
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.data.ingest import (
    ImageSpec,
    Passes,
    ViewPlan,
    augment_batch,
    decode_image,
    decoded_dataset,
    read_decoded,
    synthetic_batch,
    training_dataset,
    views_on_device,
)
from pipeline.data.shards import load_manifest, shard_files
from ssl_models.transforms.views import ViewRecipe


def _record_stream(config: dict) -> None:
    """Iterate the shard's one stream; write each row's id, digests of its two views, and
    whether the first view is blank (one value everywhere)."""
    rank = ray.train.get_context().get_world_rank()
    rows = []
    for batch in ray.train.get_dataset_shard("train").iter_batches(
        batch_size=64, batch_format="numpy"
    ):
        for image_id, a, b in zip(batch["id"], batch["view_0"], batch["view_1"], strict=True):
            digests = [hashlib.sha1(view.tobytes()).hexdigest() for view in (a, b)]
            rows.append([str(image_id), *digests, bool(a.min() == a.max())])
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(rows))
    ray.train.report({"rows": len(rows)})


@pytest.mark.slow
def test_each_id_once_per_pass_and_views_change(ray_session, fmnist_small, tmp_path):
    spec = ImageSpec.from_manifest(load_manifest(fmnist_small["train"]), None)
    limit, passes = 1000, 3
    ds = training_dataset(
        fmnist_small["train"],
        spec,
        ViewPlan((ViewRecipe.simclr(spec.size),) * 2),
        epochs=passes,
        limit=limit,
        batch_size=128,
    )
    TorchTrainer(
        _record_stream,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ingest", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # streaming_split(equal=True) gives both workers the same count; 3 x 1000 splits evenly.
    assert len(ranks[0]) == len(ranks[1]) == passes * limit // 2
    rows = ranks[0] + ranks[1]
    counts = Counter(image_id for image_id, *_ in rows)
    assert set(counts) == set(read_decoded(fmnist_small["train"], spec, limit).ids)
    assert set(counts.values()) == {passes}, "an image was seen more or less than once a pass"
    # A small crop of a Fashion-MNIST sandal can land on the black background, and colour
    # jitter leaves black black: such blank views may repeat, views with content never do.
    blank = [row for row in rows if row[3]]
    assert len(blank) < len(rows) // 50, "too many blank views"
    assert all(a != b for _, a, b, is_blank in rows if not is_blank), "two views match"
    drawn = {image_id: [] for image_id in counts}
    for image_id, a, _, is_blank in rows:
        if not is_blank:
            drawn[image_id].append(a)
    assert all(len(set(views)) == len(views) for views in drawn.values()), "views not re-drawn"


def test_passes_visit_the_shard_files_in_seeded_orders(fmnist_small):
    files = tuple(shard_files(fmnist_small["train"]))
    assert len(files) == 4

    def order(seed: int) -> list[tuple[str, int]]:
        return list(Passes(files, epochs=4, seed=seed))

    passes = order(0)
    assert [epoch for _, epoch in passes] == [e for e in (1, 2, 3, 4) for _ in files]
    paths = [path for path, _ in passes]
    assert all(sorted(paths[i : i + 4]) == sorted(files) for i in (0, 4, 8, 12))
    assert len({tuple(paths[i : i + 4]) for i in (0, 4, 8, 12)}) > 1, "every pass same order"
    assert passes == order(0) and passes != order(1)
    # A resumed run continues the numbering and the orders of the run it resumes.
    assert list(Passes(files, epochs=2, first_epoch=2, seed=0)) == passes[8:]
    # Lanes share the passes out in order, each pass to exactly one lane.
    lanes = [list(Passes(files, epochs=4).lane(i, 3)) for i in range(3)]
    assert sorted(sum(lanes, [])) == sorted(passes) and lanes[1] == passes[1::3]


def test_the_stream_is_built_from_lanes_not_passes(ray_session, monkeypatch, fmnist_small):
    """What the executor queues up front is one input row per lane, whatever the number of
    epochs: hundreds of queued (file, epoch) inputs slowed training by half."""
    built: list[list[dict]] = []
    real_from_items = ray.data.from_items

    def recording_from_items(items, **kwargs):
        built.append(list(items))
        return real_from_items(items, **kwargs)

    monkeypatch.setattr(ray.data, "from_items", recording_from_items)
    spec = ImageSpec(size=28, channels=1)
    for epochs in (1, 3, 100, 1000):
        training_dataset(fmnist_small["train"], spec, None, epochs=epochs, decode_tasks=2)
    assert built == [[{"lane": 0}, {"lane": 1}]] * 4


def test_lanes_deliver_each_pass_once_and_stream_before_a_lane_ends(ray_session, fmnist_small):
    spec = ImageSpec(size=28, channels=1)
    ds = training_dataset(
        fmnist_small["train"], spec, None, epochs=3, limit=1300, decode_tasks=2, batch_size=100
    )
    ids = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        # A block is about 256 KiB (400 decoded 28 px images), never a lane's whole output.
        assert len(batch["id"]) <= 512, "a lane's output was held back in one large block"
        ids += batch["id"].tolist()
    expected = read_decoded(fmnist_small["train"], spec, 1300).ids
    assert len(ids) == 3 * 1300 and Counter(ids) == Counter(expected * 3)


@pytest.mark.slow
def test_the_stream_runs_a_bounded_distance_ahead_of_a_slow_consumer(ray_session, fmnist_small):
    """However many passes remain, decoding stops a bounded number of bytes ahead of what
    training took: a short run does not decode its whole stream during epoch 1, a long
    one does not fill the object store, so each epoch costs the same."""
    import time

    import pipeline.data.ingest as ingest
    from pipeline.data.ledger import IngestLedger

    spec, epochs, batch = ImageSpec(size=28, channels=1), 40, 100
    ledger = IngestLedger.remote(2048)
    ds = training_dataset(
        fmnist_small["train"], spec, None, epochs=epochs, batch_size=batch, ledger=ledger
    )
    block = ingest._block_bytes(spec, None, batch)
    assert ds.context.execution_options.resource_limits.object_store_memory == (
        ingest.READ_AHEAD_BLOCKS * block
    )
    taken = 0
    for taken_batches, rows in enumerate(ds.iter_batches(batch_size=batch, batch_format="numpy")):
        taken += len(rows["id"])
        if taken_batches == 5:
            time.sleep(4)  # a slow training step: the stream would run on unchecked
            break
    decoded = sum(p["delivered"] for p in ray.get(ledger.report.remote()).values())
    ray.kill(ledger)
    ahead_rows = ingest.READ_AHEAD_BLOCKS * block // (28 * 28)
    assert taken < decoded <= taken + 2 * ahead_rows < epochs * 2048 // 2


def test_a_resumed_stream_skips_completed_passes_unread(ray_session, monkeypatch, tmp_path):
    """After a restart, passes the ledger marks completed are not read at all."""
    import pipeline.data.ingest as ingest
    from pipeline.data.ledger import IngestLedger

    files = tuple(f"{tmp_path}/missing-{i}.parquet" for i in range(3))  # unreadable if read
    ledger = IngestLedger.remote(10)
    ray.get(ledger.resume_from.remote(2))
    passes = Passes(files, epochs=2)
    batches = ingest.lane_batches(
        {"lane": np.array([0])}, passes, 1, [], 8, ImageSpec(28, 1), None, ledger
    )
    assert list(batches) == []
    ray.kill(ledger)


def test_decode_only_stream_feeds_views_drawn_on_the_device(ray_session, fmnist_small):
    spec = ImageSpec(size=28, channels=1)
    ds = training_dataset(fmnist_small["train"], spec, None, limit=300, batch_size=100)
    batch = next(iter(ds.iter_batches(batch_size=300, batch_format="numpy")))
    assert set(batch) == {"id", "image", "label"} and batch["image"].dtype == np.uint8
    decoded = read_decoded(fmnist_small["train"], spec, 300)
    by_id = dict(zip(decoded.ids, zip(decoded.pixels, decoded.labels, strict=True), strict=True))
    for image_id, pixels, label in zip(batch["id"], batch["image"], batch["label"], strict=True):
        np.testing.assert_array_equal(pixels, by_id[image_id][0])
        assert label == by_id[image_id][1]  # labels ride along for the online probe
    gen = torch.Generator().manual_seed(0)
    recipes = (ViewRecipe.simclr(24),) * 2 + (ViewRecipe.simclr(12, crop_scale_min=0.05),)
    views, targets = views_on_device(batch, ViewPlan(recipes), torch.device("cpu"), gen)
    assert targets == {}
    assert [v.shape for v in views] == [(300, 1, 24, 24)] * 2 + [(300, 1, 12, 12)]
    assert views[0].dtype == torch.uint8 and not torch.equal(views[0], views[1])


def test_augment_batch_drops_and_logs_undecodable_rows(fmnist_small, caplog):
    spec = ImageSpec(size=28, channels=1)
    good = read_decoded(fmnist_small["train"], spec, 2)
    import pyarrow.parquet as pq

    from pipeline.data.shards import shard_files

    table = pq.read_table(shard_files(fmnist_small["train"])[0]).slice(0, 2)
    batch = {
        "id": np.asarray(["a", "broken", "b"], dtype=object),
        "image": np.asarray(
            [table["image"][0].as_py(), b"not an image", table["image"][1].as_py()], dtype=object
        ),
        "label": np.asarray([3, 4, -1]),
    }
    # Multi-crop: two global views and a small local one.
    recipes = (ViewRecipe.simclr(28),) * 2 + (ViewRecipe.simclr(12),)
    out = augment_batch(batch, spec, ViewPlan(recipes))
    assert list(out["id"]) == ["a", "b"] and list(out["label"]) == [3, -1]
    assert out["view_1"].shape == (2, 1, 28, 28) and out["view_0"].dtype == np.uint8
    assert out["view_2"].shape == (2, 1, 12, 12)
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


def test_decoded_dataset_parts_partition_the_first_limit_images(ray_session, fmnist_small):
    spec = ImageSpec(size=28, channels=1)
    limit = 1300  # ends inside the third of four 512-image shards
    expected = read_decoded(fmnist_small["train"], spec, limit)
    parts = []
    for index in range(4):  # three files hold the 1300 images: the fourth part is empty
        ds = decoded_dataset(fmnist_small["train"], spec, part=(index, 4), limit=limit)
        ids = [i for b in ds.iter_batches(batch_format="numpy") for i in b["id"].tolist()]
        parts.append(ids)
    assert [len(ids) for ids in parts] == [512, 512, limit - 1024, 0]
    assert sorted(sum(parts, [])) == sorted(expected.ids)
    with pytest.raises(ValueError, match="part must be"):
        decoded_dataset(fmnist_small["train"], spec, part=(2, 2))


def _mirror_task(views: list[torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A toy pretext task: mirror some images (target: which), plus a 5-D stack of copies."""
    image = views[0]
    mirrored = torch.randint(0, 2, (len(image),), generator=gen).bool().to(image.device)
    view = torch.where(mirrored.view(-1, 1, 1, 1), image.flip(-1), image)
    stack = torch.stack([image] * 3, dim=1)
    return {"view_0": view, "view_1": stack, "target_mirrored": mirrored.long()}


def test_a_pretext_plan_ships_its_views_and_targets_in_every_mode(fmnist_small):
    spec = ImageSpec(size=28, channels=1)
    plan = ViewPlan((ViewRecipe.simclr(20),), _mirror_task)
    pixels = read_decoded(fmnist_small["train"], spec, 8).pixels
    gen = torch.Generator().manual_seed(0)
    columns = plan(torch.from_numpy(pixels), gen)
    assert set(columns) == {"view_0", "view_1", "target_mirrored"}
    stack, view = columns["view_1"], columns["view_0"]
    assert stack.shape == (8, 3, 1, 20, 20) and stack.dtype == torch.uint8
    mirrored = columns["target_mirrored"].bool()
    assert torch.equal(view[mirrored], stack[mirrored, 0].flip(-1))
    assert torch.equal(view[~mirrored], stack[~mirrored, 0])

    batch = {"id": np.arange(8), "image": pixels, "label": np.zeros(8, np.int64)}
    shipped = {k: v.numpy() for k, v in columns.items()} | {"id": batch["id"]}
    for views, targets in (
        views_on_device(shipped, plan, torch.device("cpu")),
        views_on_device(batch, plan, torch.device("cpu"), gen),
        views_on_device(synthetic_batch(list(range(8)), spec, plan), plan, torch.device("cpu")),
    ):
        assert [v.shape for v in views] == [(8, 1, 20, 20), (8, 3, 1, 20, 20)]
        assert set(targets) == {"mirrored"} and targets["mirrored"].shape == (8,)
