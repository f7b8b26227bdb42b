"""Running a benchmark script as a user does, at a tiny size, on data a clean clone has.

Each script runs as a subprocess from a scratch working directory whose
``data/shards/fashion-mnist`` links to the session's small Fashion-MNIST shards, so the
scripts' default data paths (the demo preset's, their own ``data/shards/...``) find data and
their outputs (``runs/``, ``data/...``) stay out of the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.runs import write_untrained_run

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench_dir(fmnist_small, tmp_path) -> Path:
    """A working directory with ``data/shards/fashion-mnist/{train,test}`` (2048 and 512
    real images)."""
    shards = tmp_path / "data" / "shards" / "fashion-mnist"
    shards.mkdir(parents=True)
    for split, directory in fmnist_small.items():
        (shards / split).symlink_to(directory, target_is_directory=True)
    return tmp_path


@pytest.fixture
def run_script(bench_dir) -> Callable[..., str]:
    """``run_script(name, *args, ray=False)``: run ``benchmarks/<name>`` in ``bench_dir``
    and return its stdout (the test fails with its output when it exits non-zero). With
    ``ray``, the script joins the session's Ray instance (``pipeline.cluster.init_ray``
    honours ``RAY_ADDRESS``) instead of starting its own."""

    def run(name: str, *args: str, ray: bool = False, timeout: float = 300) -> str:
        env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        if ray:
            import ray as ray_module

            env["RAY_ADDRESS"] = ray_module.get_runtime_context().gcs_address
        command = [sys.executable, str(BENCHMARKS / name), *args]
        done = subprocess.run(
            command, cwd=bench_dir, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
        return done.stdout

    return run


@pytest.fixture(scope="session")
def small_run(fmnist_small, tmp_path_factory) -> Path:
    """A SimCLR small-CNN run with one checkpoint (seeded random weights, written directly:
    the benchmarks measure evaluation, not training); its evaluation splits are the small
    shards."""
    return write_untrained_run(fmnist_small, tmp_path_factory.mktemp("runs") / "tiny")
