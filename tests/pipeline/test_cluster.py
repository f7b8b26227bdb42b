"""A real two-node Ray cluster on loopback: `ray job submit` runs pretraining on it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import latest_checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(1)


@pytest.mark.slow
def test_ray_job_submit_pretrains_on_a_two_node_cluster(fmnist_small, tmp_path):
    # Its own temp dir: the cluster is invisible to this session's ray.init() and to others.
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}"
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = os.environ | {
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=3", "--disable-usage-stats"]
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}"]
        + [f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", *common],
        env=env,
    )
    nodes = [head]
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_for(
            lambda: (
                subprocess.run(
                    [BIN / "ray", "job", "list", "--address", address], env=env, capture_output=True
                ).returncode
                == 0
            ),
            90,
            "the head's job API did not answer",
        )
        nodes.append(
            subprocess.Popen(
                [BIN / "ray", "start", f"--address=127.0.0.1:{gcs_port}", *common], env=env
            )
        )
        runs = tmp_path / "runs"
        submitted = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", address, "--working-dir", ROOT]
            + ["--", "python", "-m", "pipeline", "pretrain", "--set", f"run.root={runs}"]
            + ["--set", "run.name=job", "--set", f"data.train={fmnist_small['train']}"]
            + ["--set", f"data.eval_train={fmnist_small['train']}"]
            + ["--set", f"data.eval_test={fmnist_small['test']}"]
            + ["--set", "model.backbone=small_cnn", "--set", "train.epochs=1"]
            + ["--set", "train.batch_size=128", "--set", "data.limit=1024"]
            + ["--set", "train.online_knn_bank=256", "--set", "train.online_knn_queries=128"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "first step done" in submitted.stdout and "epoch 1 done" in submitted.stdout

        state = load_checkpoint(latest_checkpoint(runs / "job"))
        assert state["epoch"] == 1 and state["step"] == (1024 // 2) // 64
        assert 0.0 <= state["metrics"]["knn_top1"] <= 1.0
        report = json.loads((runs / "job" / "ingest_report.json").read_text())
        assert report["1"]["delivered"] == 1024 and report["1"]["rejected"] == 0
    finally:
        for node in reversed(nodes):
            node.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        for node in nodes:
            node.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
