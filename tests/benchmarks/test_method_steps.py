"""benchmarks/method_steps.py runs at HEAD: a few CPU steps of a two-view method and of one
that needs colour (its images tinted) print the table, one row each with finite losses."""

from tests.benchmarks.tables import number, table_rows


def test_the_method_steps_benchmark_prints_a_row_per_method(run_script):
    args = ["--methods", "simclr", "colorization", "--device", "cpu"]
    args += ["--steps", "7", "--warmup", "1", "--batch", "16", "--batches", "2"]
    out = run_script("method_steps.py", *args)
    rows = table_rows(out, "| method | views per image")
    assert [row[0] for row in rows] == ["simclr", "colorization (tinted RGB)"]
    for row in rows:
        first, last, finite, ms, rate = row[2], row[3], row[4], row[5], row[6]
        assert finite == "yes" and number(first) > 0 and number(last) >= 0
        assert number(ms) > 0 and number(rate) > 0
