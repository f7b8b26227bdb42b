"""``pretrain``: self-supervised pretraining with Ray Train, then the kNN table."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.arguments import TRAINING_CONFIG, add_command, add_config_args

SUMMARY = "self-supervised pretraining with Ray Train"
DESCRIPTION = """\
Pretrain an encoder without labels. Ray Data decodes and augments the training shards into
two random views per image on CPU workers; Ray Train runs train.num_workers DDP workers.
A checkpoint is written every epoch under RUN.ROOT/RUN.NAME/; starting the same run name
again resumes from its latest checkpoint (raise train.epochs to train further).
TensorBoard: tensorboard --logdir runs/

Examples:
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml \\
      --set run.name=longer --set train.epochs=20 --set train.batch_size=512
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``pretrain`` and its options."""
    parser = add_command(commands, "pretrain", SUMMARY, DESCRIPTION)
    add_config_args(parser, TRAINING_CONFIG)
    parser.add_argument("--no-eval", action="store_true", help="skip the final kNN evaluation")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Pretrain, then (unless --no-eval) print and record the kNN table."""
    pretrain_and_evaluate(args.config, args.overrides, floors=False, evaluate=not args.no_eval)
    return 0


def pretrain_and_evaluate(
    config_path: Path | None, overrides: list[str], floors: bool, evaluate: bool
) -> None:
    """Pretrain the config; with ``evaluate``, print the kNN table of its last checkpoint
    (with the raw-pixel and random-init rows when ``floors``) and record it in the run's
    eval.json and knn.txt."""
    from pipeline.config import load_config
    from pipeline.data import locations
    from pipeline.train.checkpoint import find_checkpoint
    from pipeline.train.driver import pretrain, run_dir

    config = load_config(config_path, overrides)
    result = pretrain(config)
    run = run_dir(config)
    print(f"run directory: {run}")
    if evaluate and result.checkpoint is not None:
        # The run may live in object storage: the checkpoint is read from there, and
        # eval.json and knn.txt are written there too.
        try:
            checkpoint = find_checkpoint(run)
        except FileNotFoundError:
            checkpoint = result.checkpoint.path
        table = knn_table(checkpoint, floors, run)
        print(table)
        locations.write_text(locations.join(run, "knn.txt"), table + "\n")


def knn_table(checkpoint: str, floors: bool, run: str) -> str:
    """The kNN table that ends ``pretrain`` and ``demo``, also recorded in ``run``'s
    eval.json."""
    from pipeline.cli.runs import save_results
    from pipeline.eval.evaluate import evaluate_checkpoint, load_eval_context
    from pipeline.eval.protocols import knn_results
    from pipeline.train.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(checkpoint)
    with load_eval_context(checkpoint) as context:
        report = evaluate_checkpoint(context, floors=floors)
        accounts = "\n".join(context.accounts.values())
        save_results(checkpoint, context, knn_results(report), run)
    return f"checkpoint: {checkpoint}\n{accounts}\n{report.table()}"
