"""The `sandbox` command line: one module per command group, imported statically.

Each command module (train, config, forensics, ablate, teaching, lessons)
has `register(subparsers)`, which adds its subcommands with
`set_defaults(func=...)`; `func(args)` returns an exit code. The modules are
plain imports: a command module that fails to import fails `sandbox` itself,
loudly, rather than a subcommand quietly vanishing from `--help`.

`UserError` anywhere becomes one line on stderr and exit status 2.
SIGINT and SIGTERM are stop requests (rules in sandbox/interrupts.py):
`sandbox train` stops itself at its next safe point and exits 0 (a stopped
run is resumable); other commands print one line and exit 130.
A reader that leaves early (`sandbox config keys | head`) is not an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from sandbox import interrupts
from sandbox.cli import ablate, config, forensics, lessons, teaching, train
from sandbox.errors import UserError

# Command groups, in help order.
COMMAND_GROUPS = (train, config, forensics, ablate, teaching, lessons)
# Commands that honour a stop request themselves, at a safe point, and exit 0: never a KeyboardInterrupt.
GRACEFUL_STOP_COMMANDS = interrupts.GRACEFUL_STOP_COMMANDS


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def _version() -> str:
    try:
        return metadata.version("sandbox")
    except metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH: pip never installed it
        return "(not installed: no package metadata)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox", description="A JAX mixed-precision training lab.")
    parser.add_argument("--version", action="version", version=f"sandbox {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv, known before parsing (which can be interrupted)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None, *, keep_requests: bool = False) -> int:
    """`keep_requests`: called by sandbox/entry.py, which installed the handlers before importing us."""
    command = _command_in(sys.argv[1:] if argv is None else argv)
    previous_handlers = interrupts.install_cli_handlers(graceful=command in GRACEFUL_STOP_COMMANDS,
                                                        keep_requests=keep_requests)
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
        print(f"sandbox{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 0 if command in GRACEFUL_STOP_COMMANDS else interrupts.ABORT_EXIT
    finally:
        interrupts.restore(previous_handlers)
