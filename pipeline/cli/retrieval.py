"""``retrieval``: a PNG of test images and their nearest train images in feature space."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.cli.arguments import add_command

if TYPE_CHECKING:  # imported lazily at run time, so that --help stays fast
    import numpy as np
    import torch

    from pipeline.eval.evaluate import EvalContext

SUMMARY = "PNG of test images and their nearest neighbours in feature space"
DESCRIPTION = """\
The classic "what did it learn" picture: for the first --queries test images, their --k
nearest train images by cosine similarity of frozen features; green frames share the
query's label, red ones do not. --projector N also writes TensorBoard's embedding projector
(features, labels and image sprites of the first N test images) under RUN_DIR/tensorboard.

Examples:
  python -m pipeline retrieval --checkpoint runs/fmnist-simclr --out retrieval.png
  python -m pipeline retrieval --checkpoint runs/fmnist-simclr --out r.png --projector 1000
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``retrieval`` and its options."""
    parser = add_command(commands, "retrieval", SUMMARY, DESCRIPTION)
    parser.add_argument(
        "--checkpoint", type=str, required=True, help="run or checkpoint directory (path or URI)"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--queries", type=int, default=8, help="query images (rows)")
    parser.add_argument("--k", type=int, default=8, help="neighbours per query (columns)")
    parser.add_argument("--projector", type=int, default=0, metavar="N", help="projector sample")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the retrieval grid (and the projector), then print the PNG's path.

    Only the shown images are decoded here: the queries (and the projector's sample) from
    the head of the test split, the neighbours fetched by id after a streamed kNN search of
    the train split's features.
    """
    import numpy as np

    from pipeline.data.image_features import extract_features
    from pipeline.data.ingest import read_decoded
    from pipeline.eval.evaluate import images_by_id, load_eval_context
    from pipeline.eval.pictures import retrieval_grid
    from pipeline.train.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(args.checkpoint)
    with load_eval_context(checkpoint) as context:
        mean, std = context.mean_std
        sample = read_decoded(context.test_dir, context.spec, max(args.queries, args.projector))
        test = extract_features(context.method.features, sample.pixels, mean, std)
        neighbour_ids = _nearest_train_ids(context, test[: args.queries], args.k)
        images = images_by_id(
            context.train_dir, sorted({i for row in neighbour_ids for i in row}), context.spec
        )
        queries = slice(0, args.queries)
        path = retrieval_grid(
            sample.pixels[queries],
            np.stack([np.stack([images[i][0] for i in row]) for row in neighbour_ids]),
            args.out,
            query_labels=sample.labels[queries],
            neighbour_labels=np.array([[images[i][1] for i in row] for row in neighbour_ids]),
        )
        if args.projector:
            projected = slice(0, args.projector)
            _write_projector(
                checkpoint,
                context,
                test[projected],
                sample.labels[projected],
                sample.pixels[projected],
            )
    print(f"wrote {path}")
    return 0


def _nearest_train_ids(context: EvalContext, queries: torch.Tensor, k: int) -> list[list[str]]:
    """The ids of each query's ``k`` nearest train images, nearest first, by a streamed
    search of the train split's features."""
    import torch

    from pipeline.eval.evaluate import BANK_CHUNK
    from ssl_models.knn import RunningTopK

    bank = context.features("trained", "train")
    top = RunningTopK(queries, k)
    offset = 0
    for features, _ in bank.batches(BANK_CHUNK):
        top.update(features, torch.arange(offset, offset + len(features)))
        offset += len(features)
    if top.seen < k:
        raise ValueError(f"--k {k} is more than the {top.seen} train images")
    ids_of = bank.ids_at(top.values.flatten().tolist())
    return [[ids_of[p] for p in row] for row in top.values.tolist()]


def _write_projector(
    checkpoint: str,
    context: EvalContext,
    features: torch.Tensor,
    labels: np.ndarray,
    pixels: np.ndarray,
) -> None:
    """TensorBoard's embedding projector of these test images, under RUN_DIR/tensorboard."""
    from tensorboardX import SummaryWriter

    from pipeline.data import locations
    from pipeline.eval.pictures import add_projector

    logdir = locations.join(locations.parent(checkpoint), "tensorboard")
    with SummaryWriter(logdir) as writer:
        add_projector(
            writer,
            features,
            labels.tolist(),
            pixels,
            tag="test",
            step=int(context.state.epoch),
        )
