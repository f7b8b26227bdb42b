"""Checkpoints, TensorBoard logs and the data report in S3, and resuming from there.

Against a real S3-compatible server on loopback (moto in server mode): pretraining runs as
the command a user types, with the run root an s3:// URI.
"""

import io
import os
import subprocess
import sys

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

BUCKET = "ssl-runs"


@pytest.fixture
def s3_env(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # boto3 and pyarrow both read it
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


@pytest.mark.slow
def test_a_run_lives_in_s3_and_resumes_from_it(s3_env, fmnist_small):
    env = os.environ | s3_env | {"RAY_AUTH_MODE": "disabled"}

    def pretrain(epochs: int) -> str:
        command = [sys.executable, "-m", "pipeline", "pretrain"]
        for override in (
            f"run.root=s3://{BUCKET}/runs",
            "run.name=cloud",
            f"data.train={fmnist_small['train']}",
            f"data.eval_train={fmnist_small['train']}",
            f"data.eval_test={fmnist_small['test']}",
            "model.backbone=small_cnn",
            "data.limit=1024",
            "train.batch_size=128",
            f"train.epochs={epochs}",
            "train.online_knn_bank=256",
            "train.online_knn_queries=128",
        ):
            command += ["--set", override]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    pretrain(1)
    s3 = boto3.client("s3")

    def keys() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]

    assert any(k.endswith("/checkpoint.pt") for k in keys())
    assert "runs/cloud/ingest_report.json" in keys()
    assert any(k.startswith("runs/cloud/tensorboard/events.out.tfevents") for k in keys())

    assert "resuming cloud from epoch 2" in pretrain(2)
    latest = max(k for k in keys() if k.endswith("/checkpoint.pt"))
    body = s3.get_object(Bucket=BUCKET, Key=latest)["Body"].read()
    state = torch.load(io.BytesIO(body), weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * (1024 // 2) // 64
