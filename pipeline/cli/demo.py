"""``demo``: the quick start (prepare Fashion-MNIST, pretrain SimCLR briefly, kNN table)."""

from __future__ import annotations

import argparse

from pipeline.cli.arguments import CONFIGS, add_command, add_config_args

DEMO_CONFIG = CONFIGS / "fmnist_simclr_demo.yaml"

SUMMARY = "prepare Fashion-MNIST, pretrain SimCLR briefly, print the kNN table"
DESCRIPTION = """\
The quick start: prepares Fashion-MNIST shards (once), starts a local Ray cluster,
pretrains SimCLR with 2 Ray Train workers (about 10 minutes on a 2-core laptop), then
prints kNN top-1 on the 10k test images next to the raw-pixel and random-init floors.
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``demo`` and its options."""
    parser = add_command(commands, "demo", SUMMARY, DESCRIPTION)
    add_config_args(parser, DEMO_CONFIG)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the shards (once), pretrain, and print kNN next to its floors."""
    from pipeline.cli.pretrain import pretrain_and_evaluate
    from pipeline.data.prepare import prepare

    prepare("fashion-mnist")
    pretrain_and_evaluate(args.config, args.overrides, floors=True, evaluate=True)
    return 0
