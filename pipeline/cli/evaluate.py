"""``evaluate``: the field's protocols (kNN, linear probe, few-label fine-tuning, transfer)
on a checkpoint, merged into its run's eval.json."""

from __future__ import annotations

import argparse
import json

from pipeline.cli.arguments import add_command

SUMMARY = "judge a checkpoint: kNN, linear probe, few-label fine-tuning, transfer"
DESCRIPTION = """\
The field's protocols on a checkpoint's frozen (or fine-tuned) backbone, each next to the
same architecture with random weights:
  knn       weighted kNN: the train split is the memory bank, the test split the queries;
            cosine similarity, votes weighted by exp(sim / T) (k=200, T=0.1 by default);
            also scores raw pixels
  linear    a linear classifier on the frozen features of the train split, scored on the
            test split (features standardised, SGD Nesterov 0.9, cosine, 100 epochs)
  finetune  SimCLR v2's semi-supervised protocol: the backbone, through the first layer
            of the method's projection head where it has one (--finetune-from), plus a new
            linear head, trained end to end on class-balanced label subsets of the train
            split (1% and 10% by default, seeded by run.seed), crop + flip; given several
            --finetune-lr / --finetune-weight-decay values, every pair is tried and the one
            with the best top-1 on a validation split (--validation-fraction of the train
            images outside the subsets) is reported: the test split never chooses
The splits are the run's data.eval_train and data.eval_test; --train-data/--test-data
score another labelled dataset instead (transfer), decoded to the checkpoint's image size
and channels (prepare it first, e.g. `prepare mnist --root DIR`).
Results are merged into RUN_DIR/eval.json, which `report` compares across runs.

Examples:
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol knn linear finetune
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol finetune \
      --finetune-lr 0.01 0.05 0.2 --finetune-weight-decay 0 1e-4
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol linear \\
      --train-data data/shards/mnist/train --test-data data/shards/mnist/test
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate`` and its options."""
    parser = add_command(commands, "evaluate", SUMMARY, DESCRIPTION)
    parser.add_argument(
        "--checkpoint",
        type=str,
        required=True,
        help="a run directory (its latest checkpoint is used) or one checkpoint directory; "
        "a local path or an object-storage URI (s3://...)",
    )
    parser.add_argument(
        "--protocol",
        nargs="+",
        default=["knn"],
        choices=["knn", "linear", "finetune"],
        help="protocols to run (default: knn)",
    )
    parser.add_argument("--k", type=int, help="kNN neighbours (default: the run's eval.knn_k)")
    parser.add_argument(
        "--temperature", type=float, help="kNN vote temperature (default eval.knn_temperature)"
    )
    parser.add_argument(
        "--train-data", type=str, help="labelled shards to train/bank on (transfer; path or URI)"
    )
    parser.add_argument(
        "--test-data", type=str, help="labelled shards to score on (transfer; path or URI)"
    )
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear probe epochs")
    parser.add_argument(
        "--fractions",
        nargs="+",
        type=float,
        default=[0.01, 0.1],
        help="label fractions for finetune (default: 0.01 0.1)",
    )
    parser.add_argument("--finetune-epochs", type=int, default=30, help="fine-tuning epochs")
    for flag, default, what in (
        ("--finetune-lr", 0.05, "learning rate(s) at batch 256 (SGD, Nesterov, cosine)"),
        ("--finetune-weight-decay", 0.0, "weight decay(s) (0 as in SimCLR v2)"),
    ):
        parser.add_argument(
            flag, nargs="+", type=float, default=[default], help=f"fine-tuning {what}; "
            f"several values are each tried (default {default:g})",
        )  # fmt: skip
    parser.add_argument(
        "--finetune-from",
        choices=["head", "backbone"],
        default="head",
        help="head: the projection head's first layer where the method has one (SimCLR v2; "
        "default); backbone: the backbone alone",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="share of the train split (outside the label subsets) that chooses among several "
        "fine-tuning settings (default 0.1)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen protocols, record them in eval.json and print their table."""
    if (args.train_data is None) != (args.test_data is None):
        raise ValueError("transfer needs both --train-data and --test-data (one dataset's splits)")
    print(_evaluate_protocols(args))
    return 0


def _evaluate_protocols(args: argparse.Namespace) -> str:
    from pipeline.cli.runs import save_results
    from pipeline.data import locations
    from pipeline.eval.evaluate import load_eval_context
    from pipeline.eval.protocols import (
        ProtocolSettings,
        finetune_splits,
        results_table,
        run_protocols,
    )
    from pipeline.train.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(args.checkpoint)
    settings = ProtocolSettings(
        k=args.k,
        temperature=args.temperature,
        probe_epochs=args.probe_epochs,
        fractions=tuple(args.fractions),
        finetune_epochs=args.finetune_epochs,
        finetune_lrs=tuple(args.finetune_lr),
        finetune_weight_decays=tuple(args.finetune_weight_decay),
        finetune_from=args.finetune_from,
        validation_fraction=args.validation_fraction,
    )
    suffix = _transfer_suffix(args.test_data)
    with load_eval_context(checkpoint, args.train_data, args.test_data) as context:
        results = run_protocols(context, args.protocol, settings, suffix)
        save_results(checkpoint, context, results)
        if "finetune" in args.protocol:  # the label subsets, by image id, for reproduction
            subsets = finetune_splits(context, settings)
            locations.write_text(
                locations.join(locations.parent(checkpoint), f"finetune_subsets{suffix}.json"),
                json.dumps(subsets) + "\n",
            )
        accounts = "\n".join(context.accounts.values())
        test_name = context.test_name
    return (
        f"checkpoint: {checkpoint}\ntest split: {test_name}\n{accounts}\n{results_table(results)}"
    )


def _transfer_suffix(test_data: str | None) -> str:
    """``@DATASET`` for a transfer evaluation (its results sit next to the run's own), else
    nothing."""
    from pipeline.data import locations

    if not test_data:
        return ""
    # prepare writes a dataset's splits to DATASET/<split>, so the parent names the dataset.
    return f"@{locations.name(locations.parent(locations.absolute(test_data)))}"
