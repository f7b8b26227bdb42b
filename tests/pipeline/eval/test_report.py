"""Run comparison: the eval.json contract, the exact Markdown table and the bar chart."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.report import DPI, FIGSIZE, build_report, read_eval, write_eval


def _run(root, name, protocols, **meta):
    run_dir = root / name
    run_dir.mkdir()
    write_eval(run_dir, {"protocols": protocols, **meta})
    return run_dir


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    # Relative paths, so the run names in the table are short and known.
    monkeypatch.chdir(tmp_path)
    simclr = {"knn": {"top1": 0.71234, "top5": 0.95}, "linear": {"top1": 0.74}}
    byol = {"knn": {"top1": 0.6}, "finetune_1pct": {"top1": 0.512345}}
    a = _run(tmp_path, "a", simclr, method="simclr", backbone="resnet18", epochs=100)
    b = _run(tmp_path, "b", byol, method="byol", backbone="resnet18")
    return [a.relative_to(tmp_path), b.relative_to(tmp_path)]


def test_table_is_exact_with_dashes_for_missing_protocols(two_runs, tmp_path):
    table, _ = build_report(two_runs, tmp_path / "out")
    assert table == (
        "| run | method | backbone | epochs | knn | linear | finetune_1pct |\n"
        "|---|---|---|---:|---:|---:|---:|\n"
        "| a | simclr | resnet18 | 100 | **0.7123** | **0.7400** | - |\n"
        "| b | byol | resnet18 | - | 0.6000 | - | **0.5123** |\n"
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert table in report and "(report.png)" in report


def test_runs_that_print_equal_are_both_bold(tmp_path):
    a = _run(tmp_path, "a", {"knn": {"top1": 0.80001}})
    b = _run(tmp_path, "b", {"knn": {"top1": 0.8}})
    c = _run(tmp_path, "c", {"knn": {"top1": 0.7999}})
    table, _ = build_report([a, b, c], tmp_path / "out")
    assert [row.split(" | ")[-1] for row in table.splitlines()[2:]] == [
        "**0.8000** |",
        "**0.8000** |",
        "0.7999 |",
    ]


def test_chart_is_a_png_of_the_figure_size_with_colour(two_runs, tmp_path):
    _, chart = build_report(two_runs, tmp_path / "out")
    assert chart == str(tmp_path / "out" / "report.png")
    with Image.open(chart) as png:
        assert png.format == "PNG"
        assert png.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)) == (800, 450)
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 10
    # Matplotlib's first two cycle colours fill the two runs' bars.
    assert (pixels == (0x1F, 0x77, 0xB4)).all(1).sum() > 500
    assert (pixels == (0xFF, 0x7F, 0x0E)).all(1).sum() > 500


def test_write_eval_merges_protocols_and_fields(tmp_path):
    write_eval(tmp_path, {"protocols": {"knn": {"top1": 0.5, "top5": 0.9}}, "epochs": 10})
    write_eval(tmp_path, {"protocols": {"linear": {"top1": 0.6}}, "method": "simclr"})
    # A rerun of knn replaces its metrics whole: the old top5 does not linger.
    path = write_eval(tmp_path, {"protocols": {"knn": {"top1": 0.55}}, "epochs": 20})
    assert json.loads(Path(path).read_text()) == {
        "protocols": {"knn": {"top1": 0.55}, "linear": {"top1": 0.6}},
        "epochs": 20,
        "method": "simclr",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left


def test_fine_tuning_results_name_their_settings(tmp_path):
    finetune = {"top1": 0.6, "top5": 0.9, "val_top1": 0.61, "lr": 1.6, "weight_decay": 0.0}
    write_eval(tmp_path, {"protocols": {"finetune_1pct": finetune}})
    assert read_eval(tmp_path)["protocols"]["finetune_1pct"] == finetune


@pytest.mark.parametrize(
    "results, message",
    [
        ({"protocols": {"knn": {"top5": 0.9}}}, "'knn' needs 'top1'"),
        ({"protocols": {"knn": {"top1": 71.2}}}, r"in \[0, 1\]"),
        ({"protocols": {"finetune_1pct": {"top1": 0.6, "val_top1": 2.0}}}, r"in \[0, 1\]"),
        ({"protocols": {"finetune_1pct": {"top1": 0.6, "lr": -0.1}}}, "settings >= 0"),
        ({"protocols": {"knn": 0.7}}, "'knn' needs 'top1'"),
        ({"protocols": {}, "epochs": "100"}, "'epochs' must be of type int"),
        ([0.7], "JSON object"),
    ],
)
def test_write_eval_rejects_bad_results_and_keeps_the_file(tmp_path, results, message):
    write_eval(tmp_path, {"protocols": {"knn": {"top1": 0.5}}})
    before = (tmp_path / "eval.json").read_bytes()
    with pytest.raises(ValueError, match=message):
        write_eval(tmp_path, results)
    assert (tmp_path / "eval.json").read_bytes() == before


def test_missing_or_broken_eval_json_names_the_run(tmp_path):
    good = _run(tmp_path, "good", {"knn": {"top1": 0.5}})
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=f"run {bare}: no eval.json"):
        build_report([good, bare], tmp_path / "out")
    (bare / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_eval(bare)
    with pytest.raises(ValueError, match="does not exist"):
        write_eval(tmp_path / "nowhere", {"protocols": {}})
    with pytest.raises(ValueError, match="twice"):
        build_report([good, good], tmp_path / "out")


def test_eval_json_and_report_in_object_storage(s3_bucket, tmp_path):
    run = f"{s3_bucket}/runs/a"
    write_eval(run, {"protocols": {"knn": {"top1": 0.5}}, "epochs": 1})
    write_eval(run, {"protocols": {"linear": {"top1": 0.6}}})
    assert read_eval(run)["protocols"] == {"knn": {"top1": 0.5}, "linear": {"top1": 0.6}}
    table, chart = build_report([run], f"{s3_bucket}/report")
    assert chart == f"{s3_bucket}/report/report.png" and "0.6000" in table
    from pipeline.data import locations

    assert locations.read_bytes(chart)[:4] == b"\x89PNG"
    assert "top-1" in locations.read_text(f"{s3_bucket}/report/report.md")
    with pytest.raises(ValueError, match="no eval.json"):
        read_eval(f"{s3_bucket}/runs/missing")
