"""kNN evaluation of a checkpoint: the table, feature spread, one pass per
split for every requested encoder, and one features file holding every encoder's column.

The kNN votes themselves are tested with ssl_models.knn (tests/ssl_models/test_knn.py)."""

import pytest
import torch

from pipeline.eval.evaluate import KNNReport, KNNRow


def test_table_lists_every_row():
    rows = [KNNRow("ssl", 0.8, 0.99, 0.4), KNNRow("raw pixels", 0.7, 0.95, 0.3)]
    table = KNNReport(rows, 200, 0.1, "t").table()
    assert "0.8000" in table and "raw pixels" in table and "k=200" in table


def test_feature_spread_detects_collapse():
    from pipeline.eval.evaluate import feature_spread

    gen = torch.Generator().manual_seed(0)
    spread_out = torch.randn(2000, 64, generator=gen)
    collapsed = torch.ones(2000, 64) + 1e-4 * torch.randn(2000, 64, generator=gen)
    assert abs(feature_spread(spread_out) - 1.0) < 0.05
    assert feature_spread(collapsed) < 0.01


def test_requested_encoders_share_one_pass_per_split(monkeypatch):
    from pipeline.eval.evaluate import EvalContext
    from pipeline.eval.features import FeatureSplit

    passes = []

    def embed(self, split, shard_dir, encoders):
        passes.append((split, list(encoders)))
        for encoder in encoders:
            self._features[(encoder, shard_dir)] = FeatureSplit([], 0, 1, column=encoder)

    monkeypatch.setattr(EvalContext, "_embed", embed)
    context = EvalContext(None, None, {}, "ckpt", "/data/train", "/data/test", "test")
    context.request(["trained", "raw_pixels"])
    assert passes == []  # requesting runs nothing
    assert context.features("raw_pixels", "test").column == "raw_pixels"
    assert context.features_for("test", ["trained"])["trained"].column == "trained"
    context.features_for("train", ["trained", "random_init"])
    context.features("random_init", "test")  # not requested: a pass of its own
    assert passes == [
        ("test", ["raw_pixels", "trained"]),
        ("train", ["trained", "random_init", "raw_pixels"]),
        ("test", ["random_init"]),
    ]
    with pytest.raises(ValueError, match="encoder must be one of"):
        context.request(["pixels"])
    # A split that is both train and test (transfer onto one split) is embedded once.
    same = EvalContext(None, None, {}, "ckpt", "/data/test", "/data/test", "test")
    passes.clear()
    same.features_for("test", ["trained"])
    same.features_for("train", ["trained"])
    assert passes == [("test", ["trained"])]


def test_one_file_holds_every_encoders_column_and_each_split_reads_its_own(tmp_path):
    import numpy as np
    import pyarrow as pa

    from pipeline.eval.features import write_feature_columns

    gen = np.random.default_rng(0)

    def table(start, rows):
        columns = {"id": pa.array([f"r{i}" for i in range(start, start + rows)], pa.string())}
        for name, dim in (("a", 3), ("b", 5)):
            values = gen.standard_normal((rows, dim)).astype(np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(values.reshape(-1), dim)
        columns["label"] = pa.array(np.arange(start, start + rows) % 4, pa.int64())
        return pa.table(columns)

    tables = [table(0, 7), table(7, 0), table(7, 6)]
    splits = write_feature_columns(tables, str(tmp_path), ["a", "b"], row_group_rows=4)
    whole = pa.concat_tables(tables)
    for name, dim in (("a", 3), ("b", 5)):
        split = splits[name]
        assert (split.rows, split.dim, split.column) == (13, dim, name)
        assert [len(x) for x, _ in split.batches(5)] == [5, 5, 3]
        assert split.peak_rows <= 8  # a batch and one row group (of 7 rows) at most
        features, labels = split.load()
        expected = whole.column(name).combine_chunks().flatten().to_numpy().reshape(13, dim)
        np.testing.assert_array_equal(features.numpy(), expected)
        assert labels.tolist() == whole.column("label").to_pylist()
    assert splits["a"].files == splits["b"].files == [str(tmp_path / "features.parquet")]
