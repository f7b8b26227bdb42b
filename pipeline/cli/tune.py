"""``tune``: a hyperparameter sweep with Ray Tune (ASHA on online kNN top-1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.arguments import TRAINING_CONFIG, add_command, add_config_args

SUMMARY = "hyperparameter sweep with Ray Tune (ASHA on online kNN top-1)"
DESCRIPTION = """\
Search hyperparameters: every trial is a full pretraining run on the config with the trial's
values filled in. Each epoch a trial reports kNN top-1 on a labelled validation split taken
from data.eval_train (train.online_knn_bank images as the bank, the next
train.online_knn_queries as queries; never the test set), and ASHA stops the weak ones.

Spaces live in tune_spaces/ (one per method: `--space simclr`, `--space byol`, ...); a
distribution is one of {loguniform: [lo, hi]}, {uniform: [lo, hi]}, {randint: [lo, hi]},
{choice: [a, b]}. Override keys from a YAML file (--space-file) or one by one
(--space-set); `null` drops a key. Bad spaces stop before any trial starts.

Writes RUN.ROOT/sweeps/NAME/: results.csv and .parquet (one row per trial), a PNG of the
metric against each parameter, and best_config.yaml that `pretrain --config` accepts.
An interrupted sweep (Ctrl-C, lost driver) finishes with the same command plus --resume.

Examples:
  python -m pipeline tune --config configs/fmnist_simclr.yaml --space simclr --samples 16
  python -m pipeline tune --space byol --search optuna --set method.name=byol \\
      --space-set 'method.base_momentum={uniform: [0.95, 0.999]}'
  python -m pipeline tune --config configs/fmnist_simclr.yaml --space simclr --resume
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``tune`` and its options."""
    parser = add_command(commands, "tune", SUMMARY, DESCRIPTION)
    add_config_args(parser, TRAINING_CONFIG)
    parser.add_argument("--space", required=True, help="search space name (see tune_spaces/)")
    parser.add_argument("--space-file", type=Path, help="YAML of keys overriding the space")
    parser.add_argument(
        "--space-set",
        action="append",
        default=[],
        metavar="KEY=DISTRIBUTION",
        help="override one key, e.g. 'method.temperature={loguniform: [0.05, 0.3]}'",
    )
    parser.add_argument("--samples", type=int, default=16, help="trials to run (default 16)")
    parser.add_argument(
        "--search", choices=["random", "optuna"], default="random", help="search algorithm"
    )
    parser.add_argument(
        "--grace-epochs", type=int, default=1, help="epochs before ASHA may stop a trial"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="trials at once (default: what the cluster's CPUs/GPUs fit, see README)",
    )
    parser.add_argument("--retries", type=int, default=1, help="re-runs of an errored trial")
    parser.add_argument("--name", help="sweep name (default: RUN.NAME-sweep)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted sweep")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the sweep; exit status 1 when every trial errored (nothing was learned)."""
    from pipeline.config import load_config
    from pipeline.data import locations
    from pipeline.tune.sweep import SweepSettings, sweep, sweep_dir
    from tune_spaces import load_space

    config = load_config(args.config, args.overrides)
    space = load_space(args.space, args.space_file, args.space_set)
    settings = SweepSettings(
        samples=args.samples,
        search=args.search,
        grace_epochs=args.grace_epochs,
        concurrency=args.concurrency,
        retries=args.retries,
        name=args.name,
    )
    rows = sweep(config, space, settings, resume=args.resume)
    if rows and all(row["status"].startswith("ERROR") for row in rows):
        results = locations.join(sweep_dir(config, settings), "results.csv")
        print(
            f"error: all {len(rows)} trials failed; their tracebacks are above, "
            f"their parameters in {results}",
            file=sys.stderr,
        )
        return 1
    return 0
