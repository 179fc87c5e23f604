"""Options several commands share, spelled once so their syntax cannot drift apart."""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser, what: str) -> None:
    """`--set KEY=VALUE` (repeatable): a config override, as `config.apply_overrides` reads it."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=f"{what} (repeatable)")
