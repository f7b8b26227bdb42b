"""Every registered method on the same budget: Fashion-MNIST, same backbone, seed and steps.

Each method pretrains through the real pipeline (Ray Data -> Ray Train, 2 workers) with the
demo preset's data, backbone and optimiser and its own default options, then is scored by
kNN on the 10k test images. A method whose test features have collapsed (all embeddings
nearly equal) is reported as COLLAPSED, not as a number. Prints a Markdown table.

    .venv/bin/python benchmarks/methods.py                       # all methods
    .venv/bin/python benchmarks/methods.py --methods simclr byol --epochs 2 --limit 10000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.checkpoint import method_from_checkpoint
from pipeline.cli import DEMO_CONFIG
from pipeline.config import from_dict, load_config
from pipeline.evaluate import evaluate_checkpoint, extract_features, feature_spread
from pipeline.ingest import ImageSpec, read_decoded
from pipeline.train import pretrain
from ssl_models import METHODS

COLLAPSE_SPREAD = 0.05  # feature_spread below this: all embeddings are nearly the same


def run(method: str, epochs: int, limit: int, root: Path) -> dict[str, object]:
    values = load_config(DEMO_CONFIG).to_dict()
    values["method"] = {"name": method}
    values["run"].update(name=f"bench-{method}", root=str(root))
    values["data"]["limit"] = limit
    values["train"].update(epochs=epochs, online_knn_bank=0)
    started = time.perf_counter()
    result = pretrain(from_dict(values))
    seconds = time.perf_counter() - started
    checkpoint = result.checkpoint.path
    model, config, state = method_from_checkpoint(checkpoint)
    spec = ImageSpec(state["image_size"], state["channels"])
    test = read_decoded(config.data.eval_test, spec)
    mean, std = torch.tensor(state["mean"]), torch.tensor(state["std"])
    spread = feature_spread(extract_features(model.features, test.pixels, mean, std))
    rows = {row.name.split()[0]: row.top1 for row in evaluate_checkpoint(checkpoint, floors=True)}
    return {"method": method, "seconds": seconds, "spread": spread, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20000, help="training images per epoch")
    parser.add_argument("--root", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args()

    print("| method | kNN top-1 | random init | raw pixels | feature spread | pretrain s |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        r = run(method, args.epochs, args.limit, args.root)
        collapsed = r["spread"] < COLLAPSE_SPREAD
        top1 = "COLLAPSED" if collapsed else f"{r['SSL']:.4f}"
        beats = "" if collapsed or r["SSL"] > r["random-init"] else " (below random init)"
        print(
            f"| {method} | {top1}{beats} | {r['random-init']:.4f} | {r['raw']:.4f} "
            f"| {r['spread']:.3f} | {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
