"""benchmarks/methods.py runs at HEAD: one method for one short epoch on the demo preset's
data paths prints the table row with its kNN score next to both floors."""

import pytest

from tests.benchmarks.tables import number, table_rows


@pytest.mark.slow
def test_the_methods_benchmark_prints_a_scored_row(ray_session, run_script):
    args = ["--methods", "simclr", "--epochs", "1", "--limit", "256"]
    args += ["--set", "train.num_workers=1", "--set", "train.batch_size=64"]
    out = run_script("methods.py", *args, ray=True)
    (row,) = table_rows(out, "| method | epochs | recipe | kNN top-1")
    method, epochs, recipe, top1, random_init, raw, spread, seconds = row
    assert (method, epochs, recipe) == ("simclr", "1", "demo preset")
    # 2048-image bank, 512 queries, 10 classes: every encoder is well above chance (0.10).
    for score in (top1.split()[0], random_init, raw):
        assert 0.2 < number(score) <= 1.0
    assert number(spread) > 0 and number(seconds) > 0
