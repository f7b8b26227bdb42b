"""Peak RSS of the evaluation driver: streamed evaluation against the in-memory kNN.

Each measurement runs in its own process (``ru_maxrss`` is a per-process high-water mark),
reported two ways: ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end, and the peak of a psutil
sampler thread (every 50 ms). Only the driver is measured: Ray's workers and object store
are other processes.

  # (a) `evaluate --protocol knn` on Fashion-MNIST (60k bank + 10k queries = 70k rows)
  python benchmarks/eval_memory.py evaluate --checkpoint runs/eval-bench
  # (b) chunked kNN over a synthetic bank of unit vectors written as embedding Parquet,
  #     next to the in-memory kNN on the same bank where it fits
  python benchmarks/eval_memory.py bank --rows 1000000 --dim 128 --queries 10000
  python benchmarks/eval_memory.py bank --rows 5000 --queries 500     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 2**20


class PeakSampler(threading.Thread):
    """Samples this process's RSS until stopped; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss)


def _measure(name: str, work) -> dict:
    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    sampled = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "measurement": name,
        "ru_maxrss_mib": round(maxrss / MIB, 1),
        "sampled_peak_mib": round(sampled / MIB, 1),
        "seconds": round(seconds, 1),
        "result": result,
    }


def write_bank(out: str, rows: int, dim: int, classes: int, seed: int) -> None:
    """Random unit vectors with random labels, as embedding Parquet, written in chunks."""
    import numpy as np
    import pyarrow as pa

    from pipeline.eval.features import write_features

    rng = np.random.default_rng(seed)

    def tables():
        for start in range(0, rows, 65536):
            count = min(65536, rows - start)
            x = rng.standard_normal((count, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield pa.table(
                {
                    "id": [f"r{i}" for i in range(start, start + count)],
                    "embedding": pa.FixedSizeListArray.from_arrays(x.reshape(-1), dim),
                    "label": pa.array(rng.integers(0, classes, count), pa.int64()),
                }
            )

    write_features(tables(), out)


def _split(directory: str):
    from pipeline.data.shards import open_parquet
    from pipeline.eval.features import FEATURE_FILE, FeatureSplit

    location = str(Path(directory) / FEATURE_FILE)
    parquet = open_parquet(location)
    dim = parquet.schema_arrow.field("embedding").type.list_size
    return FeatureSplit([location], parquet.metadata.num_rows, dim)


def child(args: argparse.Namespace) -> dict:
    """One measurement, in this process."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.child == "evaluate":
        from pipeline.cli import main

        return _measure(
            "evaluate --protocol knn",
            lambda: main(["evaluate", "--checkpoint", args.checkpoint, "--protocol", "knn"]),
        )
    bank, queries = _split(args.bank), _split(args.query_bank)
    if args.child == "streamed":
        from ssl_models.knn import streamed_knn_accuracy

        def streamed():
            q, labels = queries.load()
            return streamed_knn_accuracy(bank.batches(4096), q, labels, 200, 0.1)

        return _measure(f"chunked kNN, bank {bank.rows} x {bank.dim}", streamed)
    from ssl_models.knn import knn_accuracy

    def in_memory():
        q, labels = queries.load()
        features, bank_labels = bank.load()
        return knn_accuracy(features, bank_labels, q, labels, 200, 0.1)

    return _measure(f"in-memory kNN, bank {bank.rows} x {bank.dim}", in_memory)


def _run_child(*extra: str) -> dict:
    command = [sys.executable, __file__, "--child", *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["evaluate", "bank"])
    parser.add_argument("--checkpoint", help="run or checkpoint directory (evaluate)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="bank rows (bank)")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension (bank)")
    parser.add_argument("--queries", type=int, default=10_000, help="query rows (bank)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--in-memory-limit-gib",
        type=float,
        default=8.0,
        help="run the in-memory kNN only when the bank's float32 features fit this",
    )
    parser.add_argument("--child", choices=["evaluate", "streamed", "in-memory"])
    parser.add_argument("--bank")
    parser.add_argument("--query-bank")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.mode == "evaluate":
        if not args.checkpoint:
            parser.error("evaluate needs --checkpoint")
        print(json.dumps(_run_child("evaluate", "--checkpoint", args.checkpoint)))
        return
    if args.mode != "bank":
        parser.error("choose a mode: evaluate or bank")
    with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
        bank, queries = f"{tmp}/bank", f"{tmp}/queries"
        write_bank(bank, args.rows, args.dim, args.classes, seed=0)
        write_bank(queries, args.queries, args.dim, args.classes, seed=1)
        size_gib = args.rows * args.dim * 4 / 2**30
        print(f"bank: {args.rows} x {args.dim} float32 = {size_gib:.2f} GiB", flush=True)
        paths = ("--bank", bank, "--query-bank", queries)
        print(json.dumps(_run_child("streamed", *paths)), flush=True)
        if size_gib <= args.in_memory_limit_gib:
            print(json.dumps(_run_child("in-memory", *paths)), flush=True)
        else:
            print(f"in-memory kNN skipped: the bank exceeds {args.in_memory_limit_gib} GiB")


if __name__ == "__main__":
    main()
