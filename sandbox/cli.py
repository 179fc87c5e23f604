"""The `sandbox` command line.

Each feature package exposes `register(subparsers)`, which adds its
subcommands with `set_defaults(func=...)`; `func(args)` returns an exit code.
`UserError` anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

from sandbox.errors import UserError

# Modules whose `register(subparsers)` adds subcommands, in help order.
COMMAND_MODULES = (
    "sandbox.train_cli",
    "sandbox.config_cli",
    "sandbox.forensics.cli",
    "sandbox.ablate.cli",
    "sandbox.teaching.cli",
    "sandbox.teaching.lessons_cli",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox", description="A JAX mixed-precision training lab.")
    parser.add_argument("--version", action="version", version=f"sandbox {metadata.version('sandbox')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # feature not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    except BrokenPipeError:  # `sandbox config keys | head`: the reader left early, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
