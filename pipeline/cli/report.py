"""``report``: compare runs by every protocol (a Markdown table and a PNG bar chart)."""

from __future__ import annotations

import argparse

from pipeline.cli.arguments import add_command

SUMMARY = "compare runs by every protocol: Markdown table + PNG bar chart"
DESCRIPTION = """\
Reads RUN_DIR/eval.json of each run (written by `evaluate` and at the end of `pretrain`)
and writes OUT/report.md (one row per run, one column per protocol, best in bold) and
OUT/report.png (top-1 by protocol, one bar per run).

Examples:
  python -m pipeline report runs/fmnist-simclr runs/fmnist-byol --out runs/report
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``report`` and its options."""
    parser = add_command(commands, "report", SUMMARY, DESCRIPTION)
    parser.add_argument("runs", nargs="+", type=str, help="run directories (paths or URIs)")
    parser.add_argument("--out", type=str, default="runs/report", help="output directory or URI")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print its table."""
    from pipeline.data import locations
    from pipeline.eval.report import build_report

    table, chart = build_report(args.runs, args.out)
    print(f"{table}\n\nwrote {locations.join(args.out, 'report.md')} and {chart}")
    return 0
