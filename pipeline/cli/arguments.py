"""Arguments shared by several commands: the config preset and its ``--set`` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINING_CONFIG = CONFIGS / "fmnist_simclr.yaml"


def add_config_args(parser: argparse.ArgumentParser, default: Path | None) -> None:
    """``--config`` (a YAML preset, ``default`` when not given) and repeatable ``--set``."""
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        help=f"YAML preset (sections run, data, augment, model, method, train, eval); "
        f"default: {default.relative_to(CONFIGS.parent) if default else 'built-in defaults'}",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 --set method.temperature=0.2 "
        "(repeatable; values are parsed as YAML)",
    )


def add_command(
    commands: argparse._SubParsersAction, name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    """Register command ``name`` with its one-line ``summary`` and its ``description`` page
    (printed as written: its line breaks and examples are kept)."""
    return commands.add_parser(
        name,
        help=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
    )
