"""benchmarks/ingest.py runs at HEAD (it once failed for a month unnoticed): a tiny run
prints its table, both rows with a positive rate."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_ingest_benchmark_prints_its_table_at_a_tiny_size():
    command = [sys.executable, str(ROOT / "benchmarks" / "ingest.py")]
    command += ["--images", "64", "--large-images", "4", "--batch", "32", "--repeats", "1"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 2, out
    for row in rows:
        ours, peer = (float(cell.replace(",", "")) for cell in row.split("|")[2:4])
        assert ours > 0 and peer > 0
