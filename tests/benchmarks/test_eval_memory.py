"""benchmarks/eval_memory.py runs at HEAD: each mode prints one JSON line per measurement,
with both peaks of its own process and the kNN accuracy it measured."""

import json

import pytest


def _measurements(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _check(measurement: dict) -> None:
    assert measurement["ru_maxrss_mib"] > 0 and measurement["sampled_peak_mib"] > 0
    assert 0.0 <= measurement["result"]["top1"] <= measurement["result"]["top5"] <= 1.0


def test_a_tiny_bank_is_measured_chunked_and_in_memory(run_script):
    out = run_script("eval_memory.py", "bank", "--rows", "3000", "--dim", "16", "--queries", "300")
    assert "bank: 3000 x 16 float32" in out
    streamed, in_memory = _measurements(out)
    assert streamed["measurement"] == "chunked kNN, bank 3000 x 16"
    assert in_memory["measurement"] == "in-memory kNN, bank 3000 x 16"
    for measurement in (streamed, in_memory):
        _check(measurement)
    # The same bank and queries: both kNNs agree.
    assert streamed["result"] == pytest.approx(in_memory["result"])


@pytest.mark.slow
def test_evaluate_on_a_small_run_is_measured(ray_session, run_script, small_run):
    out = run_script("eval_memory.py", "evaluate", "--checkpoint", str(small_run), ray=True)
    (measurement,) = _measurements(out)
    assert measurement["measurement"] == "evaluate --protocol knn"
    assert measurement["ru_maxrss_mib"] > 0 and measurement["sampled_peak_mib"] > 0
