"""The rank-0 progress line: rate over the latest interval and the ETA it implies."""

from pipeline.train.monitors import ProgressLog


def test_rate_and_eta_come_from_the_latest_interval(monkeypatch):
    clock = iter([100.0, 110.0, 115.0, 135.0])
    monkeypatch.setattr("pipeline.train.monitors.time.perf_counter", lambda: next(clock))
    progress = ProgressLog(first_step=0, total_steps=100, global_batch=256)
    assert progress.images_per_second(10) == 256.0  # 10 steps x 256 images in 10 s
    progress.mark(10)  # e.g. an epoch boundary: the pause before it does not count
    rate = progress.images_per_second(20)  # 10 steps in the next 20 s
    assert rate == 128.0
    line = progress.line(epoch=0, epochs=2, step=20, loss=1.5, lr=0.1, rate=rate)
    # 80 steps left at 128 images/s of 256-image steps: 160 s.
    assert "step 20/100" in line and "128 img/s" in line and "ETA 2m40s" in line
