"""``embed``: a checkpoint's embeddings of a shard directory as Parquet (Ray Data batch
inference)."""

from __future__ import annotations

import argparse

from pipeline.cli.arguments import add_command

SUMMARY = "write a checkpoint's embeddings of a shard directory as Parquet (Ray Data)"
DESCRIPTION = """\
Batch inference with Ray Data: the shards are read and decoded by Ray Data tasks and embedded
by a pool of actors that each hold the frozen encoder (on a GPU each when the cluster has
them), so a million images use the cluster like training does. Writes Parquet shards with
id, embedding (L2-normalised backbone features) and label (-1 when unknown); undecodable
images are logged and counted, not written.

Examples:
  python -m pipeline embed --checkpoint runs/fmnist-simclr \\
      --data data/shards/fashion-mnist/test --out runs/fmnist-simclr/embeddings/test
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``embed`` and its options."""
    parser = add_command(commands, "embed", SUMMARY, DESCRIPTION)
    parser.add_argument(
        "--checkpoint", type=str, required=True, help="run or checkpoint directory (path or URI)"
    )
    parser.add_argument("--data", type=str, required=True, help="shard directory to embed (or URI)")
    parser.add_argument(
        "--out", type=str, required=True, help="output directory or URI (must be empty)"
    )
    parser.add_argument("--actors", type=int, default=1, help="encoder actors (default 1)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per inference batch")
    parser.add_argument("--overwrite", action="store_true", help="replace Parquet files in --out")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the embeddings and print what was written and what was rejected (the first 10)."""
    from pipeline.cluster import init_ray
    from pipeline.eval.embed import export_embeddings
    from pipeline.train.checkpoint import find_checkpoint

    init_ray()
    checkpoint = find_checkpoint(args.checkpoint)
    summary = export_embeddings(
        checkpoint,
        args.data,
        args.out,
        batch_size=args.batch_size,
        actors=args.actors,
        overwrite=args.overwrite,
    )
    rejected = "".join(f"\n  rejected {id_}: {reason}" for id_, reason in summary.rejects[:10])
    print(
        f"{args.out}: {summary.rows_written} embeddings of dimension {summary.dim} "
        f"({summary.rows_read} rows read, {summary.rejected} rejected){rejected}"
    )
    return 0
