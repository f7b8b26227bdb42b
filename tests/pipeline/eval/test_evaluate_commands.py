"""The evaluation commands end to end on a small checkpoint: protocols, transfer, pictures,
report, on local paths and in object storage. The checkpoint is written directly (untrained
weights); features and images stream through the session's Ray instance."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.shards import read_labels
from tests.runs import write_untrained_run

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def run(fmnist_small, tmp_path_factory) -> Path:
    return write_untrained_run(fmnist_small, tmp_path_factory.mktemp("runs") / "simclr-run")


def test_protocols_print_a_table_and_merge_into_eval_json(run, fmnist_small, capsys):
    args = ["evaluate", "--checkpoint", str(run), "--protocol", "knn", "linear", "finetune"]
    # Fine-tuning tries two rates and keeps the one its validation split prefers.
    args += ["--probe-epochs", "5", "--finetune-epochs", "12", "--fractions", "0.25"]
    args += ["--finetune-lr", "0.05", "0.2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for key in ("knn", "knn_raw_pixels", "linear", "finetune_25pct"):
        assert f"\n{key} " in out
    saved = json.loads((run / "eval.json").read_text())
    expected = {"knn", "knn_raw_pixels", "knn_random_init", "linear", "linear_random_init"}
    expected |= {"linear_raw_pixels"}
    expected |= {"finetune_25pct", "finetune_25pct_random_init"}
    assert set(saved["protocols"]) == expected
    assert saved["method"] == "simclr" and saved["epochs"] == 3
    for metrics in saved["protocols"].values():
        # 10 classes, 512 queries: chance is 0.10 +- 0.013; every protocol learns something.
        assert 0.13 < metrics["top1"] <= metrics["top5"] <= 1.0, saved["protocols"]
    for key in ("finetune_25pct", "finetune_25pct_random_init"):
        chosen = saved["protocols"][key]
        assert chosen["lr"] in (0.05, 0.2) and chosen["weight_decay"] == 0.0
    # The label subset is recorded by image id: a quarter of each class of the 2048 images;
    # the validation split, a tenth of each class's rest, shares no image with it.
    subsets = json.loads((run / "finetune_subsets.json").read_text())
    subset, validation = subsets["finetune_25pct"], subsets["validation"]
    labels = dict(zip(*read_labels(fmnist_small["train"]), strict=True))
    per_class = Counter(labels[i] for i in subset)
    everything = Counter(labels.values())
    assert len(set(subset)) == len(subset) and not set(subset) & set(validation)
    assert all(per_class[c] == max(1, round(0.25 * n)) for c, n in everything.items())
    held_out = Counter(labels[i] for i in validation)
    assert all(held_out[c] == round(0.1 * (n - per_class[c])) for c, n in everything.items())


def test_transfer_scores_another_dataset_under_its_own_keys(run, fmnist_small, capsys):
    # Another labelled dataset: here the Fashion-MNIST test shards play it (its parent dir
    # names the dataset), so the keys get that suffix and the run's own keys stay.
    args = ["evaluate", "--checkpoint", str(run), "--protocol", "knn", "--k", "1"]
    args += ["--train-data", str(fmnist_small["test"]), "--test-data", str(fmnist_small["test"])]
    assert main(args) == 0
    suffix = "@" + fmnist_small["test"].resolve().parent.name
    protocols = json.loads((run / "eval.json").read_text())["protocols"]
    assert f"knn{suffix}" in protocols
    # The bank holds every query, so with k=1 each query's nearest neighbour is itself.
    assert protocols[f"knn{suffix}"]["top1"] >= 0.99


def test_retrieval_grid_and_projector(run, tmp_path, capsys):
    out = tmp_path / "retrieval.png"
    args = ["retrieval", "--checkpoint", str(run), "--out", str(out), "--queries", "3", "--k", "4"]
    assert main([*args, "--projector", "50"]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.height > 3 * 28 * 2 and png.width > 5 * 28 * 2  # 3 rows, 1 + 4 columns
    assert list((run / "tensorboard").rglob("projector_config.pbtxt"))


def test_preview_draws_the_configs_views(fmnist_small, tmp_path, capsys):
    out = tmp_path / "preview.png"
    args = ["preview", "--set", f"data.train={fmnist_small['train']}", "--out", str(out)]
    assert main([*args, "--images", "2", "--views", "3"]) == 0
    with Image.open(out) as png:
        assert png.mode == "RGB" and png.width > 4 * 28 * 2 and png.height > 2 * 28 * 2


def test_report_compares_runs(run, fmnist_small, tmp_path, capsys):
    other = write_untrained_run(fmnist_small, tmp_path / "byol-run", method="byol")
    assert main(["evaluate", "--checkpoint", str(other), "--k", "20"]) == 0
    assert main(["report", str(run), str(other), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert " knn " in header and len(rows) == 2
    assert "simclr" in rows[0] and "byol" in rows[1]
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000


def test_report_names_a_run_that_was_never_evaluated(tmp_path, capsys):
    (tmp_path / "fresh").mkdir()
    assert main(["report", str(tmp_path / "fresh")]) == 2
    assert "no eval.json" in capsys.readouterr().err


def _upload(local: Path, uri: str) -> None:
    from pipeline.data import locations

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        locations.write_bytes(f"{uri}/{path.relative_to(local).as_posix()}", path.read_bytes())


@pytest.mark.slow
def test_evaluate_embed_and_report_with_everything_in_object_storage(
    run, fmnist_small, s3_bucket, capsys
):
    from pipeline.data import locations
    from pipeline.eval.embed import read_embeddings

    # The run (its checkpoint), the data and every output live in the bucket.
    checkpoint = next(run.glob("checkpoint_*"))
    s3_run = f"{s3_bucket}/runs/simclr-run"
    _upload(checkpoint, f"{s3_run}/{checkpoint.name}")
    data = f"{s3_bucket}/data/fmnist-s3"
    for split in ("train", "test"):
        _upload(fmnist_small[split], f"{data}/{split}")

    args = ["evaluate", "--checkpoint", s3_run, "--protocol", "knn", "linear"]
    args += ["--probe-epochs", "2", "--train-data", f"{data}/train", "--test-data", f"{data}/test"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # Every row of both splits accounted for: embedded + rejected == rows.
    assert f"{data}/train: 2048 rows = 2048 embedded + 0 rejected" in out
    assert f"{data}/test: 512 rows = 512 embedded + 0 rejected" in out
    saved = json.loads(locations.read_text(f"{s3_run}/eval.json"))
    assert {"knn@fmnist-s3", "knn_raw_pixels@fmnist-s3", "linear@fmnist-s3"} <= set(
        saved["protocols"]
    )
    assert saved["protocols"]["linear@fmnist-s3"]["top1"] > 0.3
    leftover = locations.list_files(s3_run)
    assert [e.relative for e in leftover if "eval_scratch" in e.relative] == []  # removed

    out_dir = f"{s3_bucket}/embeddings/test"
    assert main(["embed", "--checkpoint", s3_run, "--data", f"{data}/test", "--out", out_dir]) == 0
    assert "512 embeddings" in capsys.readouterr().out
    ids, embeddings, labels = read_embeddings(out_dir)
    assert len(set(ids)) == len(ids) == 512 and embeddings.shape[0] == 512

    assert main(["report", s3_run, "--out", f"{s3_bucket}/report"]) == 0
    assert "knn@fmnist-s3" in locations.read_text(f"{s3_bucket}/report/report.md")
    assert locations.read_bytes(f"{s3_bucket}/report/report.png")[:4] == b"\x89PNG"
