"""The cloud workflow with no local copy of the data: raw images -> `prepare` into a bucket ->
`pretrain`, `evaluate`, `embed` and a 2-trial `tune` reading the shards from there, with
every run's outputs in the bucket too, against a real S3-compatible server on loopback
(moto in server mode, shared by the session). Every pass of every stage accounts for each
row: delivered + rejected == rows.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data import locations
from pipeline.data.shards import load_manifest, open_parquet, read_labels, shard_files

TRAIN_PER_CLASS, TEST_PER_CLASS = 96, 32


def _fashion_mnist_folder(root, split: str, per_class: int) -> int:
    """Real Fashion-MNIST images of 4 classes as PNG files in class sub-folders, plus odd
    files that prepare must convert (CMYK JPEG, palette PNG with transparency, 16-bit grey)
    or skip with a reason (a corrupt PNG, a truncated JPEG, a text file). Returns the count
    of images prepare must keep."""
    from pipeline.data.sources import builtin_idx_files, read_idx_array

    images_path, labels_path = builtin_idx_files("fashion-mnist", split)
    images, labels = read_idx_array(images_path), read_idx_array(labels_path)
    kept = 0
    for label in range(4):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
            kept += 1
    odd = images[:3]
    Image.fromarray(odd[0]).convert("CMYK").save(root / "class_0" / "cmyk.jpg")
    palette = Image.fromarray(odd[1]).convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "class_1" / "palette.png")
    Image.fromarray(odd[2].astype(np.uint16) * 257).save(root / "class_2" / "sixteen.png")
    kept += 3
    (root / "class_3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    buffer = io.BytesIO()
    Image.fromarray(odd[0]).save(buffer, format="JPEG")
    (root / "class_3" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (root / "class_3" / "notes.txt").write_text("not an image")
    return kept


@pytest.mark.slow
def test_raw_images_to_an_evaluated_run_and_a_sweep_all_in_a_bucket(
    ray_session, s3_bucket, tmp_path, capsys
):
    shards = f"{s3_bucket}/shards/fm4"
    expected = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        expected[split] = _fashion_mnist_folder(tmp_path / split, split, per_class)
        prepare = ["prepare", f"folder:{tmp_path / split}", "--out", shards, "--split", split]
        assert main([*prepare, "--rows-per-shard", "100"]) == 0, capsys.readouterr().err
        manifest = load_manifest(f"{shards}/{split}")
        assert manifest.rows == expected[split] and manifest.num_classes == 4
        assert set(manifest.skipped) == {
            "class_3/corrupt.png",
            "class_3/truncated.jpg",
            "class_3/notes.txt",
        }
        ids, labels = read_labels(f"{shards}/{split}")
        assert len(set(ids)) == len(ids) == manifest.rows and labels.min() == 0
        assert all(loc.startswith("s3://") for loc in shard_files(f"{shards}/{split}"))

    runs = f"{s3_bucket}/runs"
    common = [
        f"data.train={shards}/train",
        f"data.eval_train={shards}/train",
        f"data.eval_test={shards}/test",
        f"run.root={runs}",
        "model.backbone=small_cnn",
        "model.width=0.25",
        "train.batch_size=64",
        "train.online_knn_bank=200",
        "train.online_knn_queries=100",
        "train.warmup_epochs=0",
        "data.decode_tasks=1",
    ]
    pretrain = ["pretrain", "--config", "configs/fmnist_simclr_demo.yaml"]
    overrides = [*common, "run.name=cloud", "train.epochs=2"]
    assert main([*pretrain, *sum((["--set", o] for o in overrides), [])]) == 0
    out = capsys.readouterr().out
    assert "SSL simclr" in out, out

    run = f"{runs}/cloud"
    report = json.loads(locations.read_text(f"{run}/ingest_report.json"))
    assert sorted(report) == ["1", "2"]
    for counts in report.values():  # every pass: each row delivered or rejected
        assert counts["rows"] == expected["train"]
        assert counts["delivered"] + counts["rejected"] == counts["rows"]
    assert "knn" in json.loads(locations.read_text(f"{run}/eval.json"))["protocols"]

    assert main(["evaluate", "--checkpoint", run, "--protocol", "knn", "linear"]) == 0
    out = capsys.readouterr().out
    protocols = json.loads(locations.read_text(f"{run}/eval.json"))["protocols"]
    assert {"knn", "linear", "linear_raw_pixels", "linear_random_init"} <= set(protocols)
    assert protocols["knn"]["top1"] > 0.4, out  # 4 classes: chance is 0.25

    embeddings = f"{s3_bucket}/embeddings/test"
    embed = ["embed", "--checkpoint", run, "--data", f"{shards}/test", "--out", embeddings]
    assert main(embed) == 0, capsys.readouterr().err
    written = sum(
        open_parquet(entry.location).metadata.num_rows
        for entry in locations.list_files(embeddings)
        if entry.relative.endswith(".parquet")
    )
    assert written == expected["test"]

    # One trial, proposed by Optuna (test_sweep.py runs ASHA over several random ones).
    tune = ["tune", "--config", "configs/fmnist_simclr_demo.yaml", "--space", "simclr"]
    tune += ["--samples", "1", "--search", "optuna", "--name", "sweep"]
    # The space's batch sizes reach 512; the bucket's split holds a few hundred images.
    tune += ["--space-set", "train.batch_size={choice: [64, 128]}"]
    overrides = [*common, "run.name=cloud-sweep", "train.epochs=1", "train.num_workers=1"]
    assert main([*tune, *sum((["--set", o] for o in overrides), [])]) == 0
    sweep = f"{runs}/sweeps/sweep"
    table = pd.read_csv(io.StringIO(locations.read_text(f"{sweep}/results.csv")))
    assert len(table) == 1 and "ERROR" not in table["status"][0], table
    assert table["train.batch_size"][0] in (64, 128)
    assert 0.05 <= table["method.temperature"][0] <= 0.5  # the simclr space's range
    assert locations.is_file(f"{sweep}/best_config.yaml")
