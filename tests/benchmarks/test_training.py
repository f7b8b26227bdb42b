"""benchmarks/training.py runs at HEAD: at a tiny size it prints a throughput row against
the ceiling with the memory peaks (views drawn by Ray Data only: the train-device row
differs by one config override). The time-to-first-step table, --epochs-compare and
--storage-compare are not smoke-run: each is the demo command run afresh (its first step
is timed by the runner itself, which tests/pipeline/train/test_driver.py checks), and
`make test` must stay under 25 minutes on the 2-core box."""

import pytest

from tests.benchmarks.tables import number, table_rows

TINY = ["--limit", "128", "--set", "train.batch_size=32"]


@pytest.mark.slow
def test_the_training_benchmark_prints_its_tables_at_a_tiny_size(ray_session, run_script):
    args = ["--backbones", "small_cnn:0.25", "--workers", "1", "--views", "cpu", "--epochs", "2"]
    out = run_script("training.py", *args, "--first-step-runs", "0", *TINY, ray=True)
    assert "| demo command |" not in out
    (row,) = table_rows(out, "| backbone | workers | views drawn by |")
    assert row[:3] == ["small_cnn w0.25", "1", "Ray Data (CPU)"]
    ceiling, rate, ratio, total, largest, _store = (number(cell) for cell in row[3:])
    assert ceiling > 0 and rate > 0 and ratio == pytest.approx(rate / ceiling, rel=0.05)
    assert total >= largest > 0
