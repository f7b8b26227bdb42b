"""benchmarks/in_memory_probe.py runs at HEAD: a few steps on the small shards print its
JSON summary with a speed and kNN accuracies, and --raw-pixels scores the pixels."""

import json


def test_the_in_memory_probe_prints_its_summary_after_a_few_steps(run_script):
    args = ["--backbone", "small_cnn", "--width", "0.25", "--images", "256"]
    out = run_script("in_memory_probe.py", *args, "--batch-size", "32", "--steps", "3")
    summary = json.loads(out.splitlines()[-1])
    assert summary["steps"] == 3 and summary["method"] == "simclr"
    assert summary["images_per_s"] > 0
    assert 0.0 <= summary["top1"] <= summary["top5"] <= 1.0


def test_the_in_memory_probe_scores_raw_pixels(run_script):
    summary = json.loads(run_script("in_memory_probe.py", "--raw-pixels").splitlines()[-1])
    # 2048 real bank images and 512 queries: raw pixels are far above chance (0.10).
    assert summary["features"] == "raw pixels" and summary["top1"] > 0.5
