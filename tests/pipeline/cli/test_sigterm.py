"""SIGTERM stops a command as Ctrl-C does, unwinds its clean-up and exits 143: the handler
in process, then a real ``python -m pipeline pretrain`` stopped mid-training."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

import pipeline
from pipeline.cli import main
from pipeline.cli.sigterm import TERMINATED_EXIT_CODE, SigtermAsInterrupt


def _sigterm_self() -> None:
    """Send this process SIGTERM and give the handler the bytecode boundary it runs at."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # interrupted at once; the time is only an upper bound
    raise AssertionError("SIGTERM did not interrupt")


@pytest.fixture(autouse=True)
def sigint_handler():
    """Python's own SIGINT handler during each test, the session's afterwards: an earlier
    test's TorchTrainer.fit() or sweep may have left Ray's handler installed."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_sigterm_raises_keyboard_interrupt_inside_and_the_old_handler_returns_after():
    before = signal.getsignal(signal.SIGTERM)
    with SigtermAsInterrupt() as termination:
        assert signal.getsignal(signal.SIGTERM) != before
        with pytest.raises(KeyboardInterrupt):
            _sigterm_self()
    assert termination.received
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_runs_the_current_sigint_handler():
    """As during TorchTrainer.fit(), whose SIGINT handler aborts the run gracefully."""
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    with SigtermAsInterrupt() as termination:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
    assert calls == [signal.SIGINT] and termination.received


def test_sigterm_stops_even_where_sigint_is_ignored():
    """A background job's SIGINT is ignored; SIGTERM must still stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with SigtermAsInterrupt(), pytest.raises(KeyboardInterrupt):
        _sigterm_self()


def test_without_sigterm_nothing_is_received():
    with SigtermAsInterrupt() as termination:
        pass
    assert not termination.received


def test_main_unwinds_the_command_and_exits_143(monkeypatch, capsys):
    cleaned_up = []

    def interrupted_report(runs, out):
        try:
            _sigterm_self()
        finally:
            cleaned_up.append(True)

    monkeypatch.setattr("pipeline.eval.report.build_report", interrupted_report)
    assert main(["report", "runs/a"]) == TERMINATED_EXIT_CODE == 143
    assert cleaned_up == [True]
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_main_exits_143_when_ray_trains_handler_ends_the_command(monkeypatch, capsys):
    """Ray Train's SIGINT handler aborts the controller, then raises SystemExit(0)."""

    def train_aborting_on_sigint(runs, out):
        signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(0))
        _sigterm_self()

    monkeypatch.setattr("pipeline.eval.report.build_report", train_aborting_on_sigint)
    assert main(["report", "runs/a"]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err


def test_ctrl_c_keeps_its_usual_ending(monkeypatch):
    def interrupted(runs, out):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.eval.report.build_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["report", "runs/a"])


def _noise_shards(root: Path) -> dict[str, Path]:
    """Tiny labelled shards of random 16 px grey images (train 512, test 128)."""
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import ImageRecord

    rng = np.random.default_rng(0)

    def records(count: int):
        for index in range(count):
            pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, "L").save(buffer, format="PNG")
            yield ImageRecord(f"noise-{index}", buffer.getvalue(), index % 4, "noise")

    for split, count in (("train", 512), ("test", 128)):
        write_shards(records(count), root / split, rows_per_shard=256, source=f"noise:{split}")
    return {split: root / split for split in ("train", "test")}


def _collect(stream, output: list[str]) -> None:
    for line in stream:
        output.append(line)


def _wait_for(output: list[str], pattern: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(re.search(pattern, line) for line in output):
            return True
        time.sleep(0.5)
    return False


def _session_processes(session: int) -> list[psutil.Process]:
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                left.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return left


def _endless_pretrain(tmp_path: Path) -> list[str]:
    """``pretrain`` on tiny noise shards, one worker, logging every step, for 500 epochs
    (far more than the test waits for); the run goes to tmp_path/runs/stopped."""
    shards = _noise_shards(tmp_path / "shards")
    settings = {
        "run.root": tmp_path / "runs",
        "run.name": "stopped",
        "data.train": shards["train"],
        "data.eval_train": shards["train"],
        "data.eval_test": shards["test"],
        "model.backbone": "small_cnn",
        "train.batch_size": 64,
        "train.num_workers": 1,
        "train.epochs": 500,
        "train.log_every_steps": 1,
        "train.online_knn_bank": 100,
        "train.online_knn_queries": 28,
    }
    command = [sys.executable, "-m", "pipeline", "pretrain"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    return command


@pytest.mark.slow
def test_sigterm_stops_pretraining_writes_the_data_report_and_exits_143(tmp_path):
    driver = subprocess.Popen(
        _endless_pretrain(tmp_path),
        cwd=Path(pipeline.__file__).parents[1],
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its Ray cluster's processes join its session
    )
    output: list[str] = []
    reader = threading.Thread(target=_collect, args=(driver.stdout, output), daemon=True)
    reader.start()
    try:
        assert _wait_for(output, r"step \d+/\d+", 300), "".join(output[-30:])
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    reader.join(timeout=10)
    assert code == 143, "".join(output[-30:])
    assert "stopped by SIGTERM" in "".join(output)
    # The driver's finally block wrote the data report: each epoch writes its own before
    # its checkpoint, so the final one is newer than every checkpoint (and is there even
    # when the signal came in the first epoch).
    run = tmp_path / "runs" / "stopped"
    report = (run / "ingest_report.json").stat().st_mtime
    assert all(report >= c.stat().st_mtime for c in run.glob("checkpoint_*/checkpoint.pt"))
    time.sleep(3)  # the local cluster's processes exit with the driver
    assert not _session_processes(driver.pid)
