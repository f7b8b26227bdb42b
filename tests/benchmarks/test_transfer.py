"""benchmarks/transfer.py runs at HEAD: a small labelled image folder (written by the test,
so scikit-learn's digits are not needed) is prepared into shards and a run is
scored on it with kNN and the linear probe, the scores saved under the folder's keys."""

import json

import numpy as np
import pytest
from PIL import Image


def _digit_like_folders(root, per_class: int = 12) -> None:
    """``root/{train,test}/<class>/<n>.png``: 8x8 grey squares, one bright row per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(4):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for n in range(per_class):
                pixels = rng.integers(0, 64, (8, 8), dtype=np.uint8)
                pixels[2 * label] = 255
                Image.fromarray(pixels, mode="L").save(folder / f"{n:02d}.png")


@pytest.mark.slow
def test_the_transfer_benchmark_scores_a_run_on_another_folder(
    ray_session, run_script, bench_dir, small_run
):
    _digit_like_folders(bench_dir / "data" / "digits")
    out = run_script("transfer.py", str(small_run), ray=True)
    assert "digits train: 48 images, 0 skipped" in out
    assert "digits test: 48 images, 0 skipped" in out
    protocols = json.loads((small_run / "eval.json").read_text())["protocols"]
    for key in ("knn@digits", "linear@digits"):
        assert key in out
        # 4 classes that one bright row tells apart: far above chance (0.25).
        assert 0.5 < protocols[key]["top1"] <= 1.0
