"""Checkpoints, TensorBoard logs and the data report in S3, and a killed run resuming from
them, against a real S3-compatible server on loopback (moto in server mode, shared by the
test session). Pretraining runs as the command a user types, with the run root an s3://
URI.
"""

import io
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest
import torch


@pytest.mark.slow
def test_a_killed_run_in_s3_resumes_from_its_checkpoint_there(s3_bucket, fmnist_small):
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}  # with the session's S3 endpoint
    bucket = s3_bucket.removeprefix("s3://")
    command = [sys.executable, "-m", "pipeline", "pretrain"]
    for override in (
        f"run.root={s3_bucket}/runs",
        "run.name=cloud",
        f"data.train={fmnist_small['train']}",
        f"data.eval_train={fmnist_small['train']}",
        f"data.eval_test={fmnist_small['test']}",
        "model.backbone=resnet18",  # slow enough to be killed mid-run
        "data.limit=1024",
        "train.batch_size=128",
        "train.epochs=2",
        "train.online_knn_bank=256",
        "train.online_knn_queries=128",
    ):
        command += ["--set", override]
    s3 = boto3.client("s3")

    def keys() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    # The driver and the local cluster it started share a session: kill them all at once,
    # as if the machine running the driver went away after epoch 1 was saved.
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while "runs/cloud/checkpoint_manager_snapshot.json" not in keys():
        assert first.poll() is None and time.monotonic() < deadline, "epoch 1 never saved"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert any(k.endswith("/checkpoint.pt") for k in keys())
    assert "runs/cloud/ingest_report.json" in keys()
    assert any(k.startswith("runs/cloud/tensorboard/events.out.tfevents") for k in keys())

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming cloud from epoch 2" in again.stdout
    latest = max(k for k in keys() if k.endswith("/checkpoint.pt"))
    body = s3.get_object(Bucket=bucket, Key=latest)["Body"].read()
    state = torch.load(io.BytesIO(body), weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * (1024 // 2) // 64
