"""benchmarks/prepare.py runs at HEAD: a few tiny JPEGs through one process and a one-worker
Ray cluster on loopback print the table with both rows and every image written."""

import pytest

from tests.benchmarks.tables import number


@pytest.mark.slow
def test_the_prepare_benchmark_prints_its_table_at_a_tiny_size(run_script, bench_dir):
    args = ["--images", "40", "--size", "32", "--workers", "1", "--work", str(bench_dir / "b")]
    out = run_script("prepare.py", *args)
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("setup ")))
    rows = [line.rsplit(maxsplit=6) for line in lines[header + 1 :]]
    assert [(row[0], row[1]) for row in rows] == [("single process", "1"), ("ray data", "1")]
    for _setup, _workers, images, seconds, rate, per_worker, efficiency in rows:
        assert images == "40" and number(seconds) > 0 and number(rate) > 0
        assert number(per_worker) == number(rate) and number(efficiency) > 0
