"""Command line: ``python -m pipeline {prepare,pretrain,evaluate,embed,retrieval,preview,report,
tune,demo}`` (also ``ray-ssl``).

One module per command: each registers its sub-parser with ``add_parser`` and binds its
``run(args) -> int`` to it; :func:`main` parses and calls it. The commands import the
pipeline lazily, inside ``run``, so that ``--help`` stays fast.

Exit status: 0 done; 1 a sweep whose every trial failed; 2 bad input (a ``ValueError`` or
``FileNotFoundError``: one line on stderr, no traceback); 143 stopped by SIGTERM, which
stops a command the way Ctrl-C does (pipeline.cli.sigterm).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import (
    demo,
    embed,
    evaluate,
    export,
    prepare,
    pretrain,
    preview,
    report,
    retrieval,
    sigterm,
    tune,
)

# In the order ``--help`` lists them.
COMMANDS = (prepare, pretrain, evaluate, embed, export, retrieval, preview, report, tune, demo)

DESCRIPTION = """\
Self-supervised pretraining of image encoders on Ray.

Typical session:
  python -m pipeline prepare fashion-mnist            # IDX files -> Parquet shards (once)
  python -m pipeline pretrain --config configs/fmnist_simclr.yaml
  python -m pipeline evaluate --checkpoint runs/fmnist-simclr --protocol knn linear
  python -m pipeline export --checkpoint runs/fmnist-simclr --out exported/fmnist-simclr
  python -m pipeline retrieval --checkpoint runs/fmnist-simclr --out retrieval.png
  python -m pipeline report runs/fmnist-simclr runs/fmnist-byol --out runs/report
  python -m pipeline tune --config configs/fmnist_simclr.yaml --space simclr --samples 16
  python -m pipeline demo                              # all of the above, small and quick

Run `python -m pipeline COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command's sub-parser."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: the process's arguments); return its exit
    status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    with sigterm.SigtermAsInterrupt() as termination:
        try:
            status = args.run(args)
        # Bad input (ConfigError, ShardError, SourceError, SpaceError, ... are ValueErrors)
        # gets one clear line, not a traceback.
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
        # SIGTERM ends as Ctrl-C's handler of the moment ends it: KeyboardInterrupt, or
        # SystemExit from Ray Train's; a real Ctrl-C keeps its usual ending.
        except (KeyboardInterrupt, SystemExit):
            if not termination.received:
                raise
    if termination.received:
        print("stopped by SIGTERM", file=sys.stderr)
        return sigterm.TERMINATED_EXIT_CODE
    return status
