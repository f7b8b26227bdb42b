"""A real multi-node Ray cluster on loopback: a job submitted with `ray job submit` pretrains
on it and survives the loss of the node its Train workers run on."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint

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


def _kill_tree(root: int) -> None:
    """SIGKILL a process and all its descendants (a node: raylet, agents, workers)."""
    node = psutil.Process(root)
    for proc in [node, *node.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


class LoopbackCluster:
    """A Ray cluster of `ray start --block` processes on 127.0.0.1, in its own temp dir so
    this session's ray.init() and other tests never see it."""

    def __init__(self, head_cpus: int) -> None:
        self.temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}"
        self.gcs_port, dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.env = os.environ | {
            "RAY_AUTH_MODE": "disabled",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            # Declare a silent node dead after about 3 s, not Ray's default 15 s and more.
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.nodes = [
            self._start(
                "--head",
                f"--port={self.gcs_port}",
                f"--temp-dir={self.temp_dir}",
                f"--dashboard-port={dashboard_port}",
                "--dashboard-host=127.0.0.1",
                f"--num-cpus={head_cpus}",
            )
        ]
        _wait_for(
            lambda: self.ray("job", "list", "--address", self.address).returncode == 0,
            90,
            "the head's job API did not answer",
        )

    def _start(self, *args: str) -> subprocess.Popen:
        common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        # Free ports for each node's agents: the defaults clash with any other Ray instance
        # on the machine (the test session's own), and the job API then has no agent.
        common += [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]
        return subprocess.Popen([BIN / "ray", "start", *args, *common], env=self.env)

    def add_node(self, cpus: int) -> subprocess.Popen:
        node = self._start(f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={cpus}")
        self.nodes.append(node)
        return node

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "ray", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def close(self) -> None:
        # Killed, not stopped: a graceful `ray start --block` shutdown takes about 30 s here,
        # and nothing of a throwaway cluster needs saving (its temp dir goes too).
        for node in self.nodes:
            if node.poll() is None:
                _kill_tree(node.pid)
            node.wait(timeout=60)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pretrain_command(fmnist_small, runs: Path, *overrides: str) -> list[str]:
    command = ["python", "-m", "pipeline", "pretrain"]
    for override in (
        f"run.root={runs}",
        "run.name=job",
        f"data.train={fmnist_small['train']}",
        f"data.eval_train={fmnist_small['train']}",
        f"data.eval_test={fmnist_small['test']}",
        "model.backbone=small_cnn",
        "train.batch_size=128",
        "data.limit=1024",
        "train.online_knn_bank=256",
        "train.online_knn_queries=128",
        *overrides,
    ):
        command += ["--set", override]
    return command


@pytest.mark.slow
def test_a_submitted_job_survives_losing_its_training_node(fmnist_small, tmp_path):
    """`ray job submit` runs pretraining on a two-node cluster. The head has 1 CPU, so both
    Train workers (1 CPU each) land on the second node. That node is killed after epoch 1's
    checkpoint; a replacement node joins (as an autoscaler would add one), and the run
    resumes there from the checkpoint and finishes with the right epoch count."""
    cluster = LoopbackCluster(head_cpus=1)
    try:
        doomed = cluster.add_node(cpus=4)
        runs = tmp_path / "runs"
        submit = [
            "job",
            "submit",
            "--no-wait",
            "--submission-id=node-loss",
            "--address",
            cluster.address,
            "--working-dir",
            str(ROOT),
            "--",
            *_pretrain_command(
                fmnist_small,
                runs,
                "train.epochs=2",
                "model.backbone=resnet18",
                "train.max_failures=2",
            ),
        ]
        submitted = cluster.ray(*submit)
        # The job API answers before its agent is up; Ray says to try again later.
        for _ in range(30):
            if submitted.returncode == 0 or "try again later" not in submitted.stderr:
                break
            time.sleep(2)
            submitted = cluster.ray(*submit)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        _wait_for(
            lambda: (runs / "job" / "checkpoint_manager_snapshot.json").exists(),
            300,
            "epoch 1 never finished",
        )
        _kill_tree(doomed.pid)  # the node and every process on it die with no goodbye
        cluster.add_node(cpus=4)

        def finished() -> bool:
            status = cluster.ray("job", "status", "--address", cluster.address, "node-loss")
            said = (status.stdout + status.stderr).lower()  # the CLI logs to stderr
            return any(end in said for end in ("succeeded", "failed", "stopped"))

        _wait_for(finished, 600, "the job did not end")
        status = cluster.ray("job", "status", "--address", cluster.address, "node-loss")
        logs = cluster.ray("job", "logs", "--address", cluster.address, "node-loss").stdout
        assert "succeeded" in (status.stdout + status.stderr).lower(), logs[-3000:]
        assert "first step done" in logs and "resuming job from epoch 2" in logs, logs[-3000:]
        state = load_checkpoint(latest_checkpoint(runs / "job"))
        assert state.epoch == 2 and state.step == 2 * (1024 // 2) // 64
        assert state.metrics["resumed_from_epoch"] == 1
        assert 0.0 <= state.metrics["knn_top1"] <= 1.0
        report = json.loads((runs / "job" / "ingest_report.json").read_text())
        assert [report[e]["delivered"] for e in ("1", "2")] == [1024] * 2
    finally:
        cluster.close()


class _Operator:
    def __init__(self, backpressured: bool) -> None:
        self._in_task_output_backpressure = backpressured


class _Executor:
    def __init__(self, *backpressured: bool) -> None:
        self._topology = {_Operator(b): None for b in backpressured}


def test_the_scheduling_loop_rests_only_while_output_waits_behind_backpressure(monkeypatch):
    import ray.data

    from pipeline import cluster

    rests: list[float] = []
    monkeypatch.setattr(cluster.time, "sleep", rests.append)
    callback = cluster.IdleWhileBackpressured()
    callback.on_execution_step(_Executor(False, False))
    assert rests == []  # the loop is blocking in ray.wait or dispatching: no rest
    callback.on_execution_step(_Executor(False, True))
    assert rests == [cluster.BACKPRESSURE_REST_S]

    cluster.configure_data_context()
    cluster.configure_data_context()
    registered = ray.data.DataContext.get_current().custom_execution_callback_classes
    assert registered.count(cluster.IdleWhileBackpressured) == 1
