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

from pipeline.cli import DEMO_CONFIG
from pipeline.config import from_dict, load_config
from pipeline.evaluate import evaluate_checkpoint
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
    report = evaluate_checkpoint(result.checkpoint.path, floors=True)
    rows = {row.name.split()[0]: row for row in report.rows}
    return {"method": method, "seconds": seconds, **rows}


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
        ssl, floor = r["SSL"], r["random-init"]
        collapsed = ssl.spread < COLLAPSE_SPREAD
        top1 = "COLLAPSED" if collapsed else f"{ssl.top1:.4f}"
        beats = "" if collapsed or ssl.top1 > floor.top1 else " (below random init)"
        print(
            f"| {method} | {top1}{beats} | {floor.top1:.4f} | {r['raw'].top1:.4f} "
            f"| {ssl.spread:.3f} | {r['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
