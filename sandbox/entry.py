"""The `sandbox` command's entry point: stop requests are handled from its first instruction.

Importing the CLI loads JAX, Flax and optax, a second or two. A Ctrl-C or SIGTERM in that window
used to meet Python's defaults (a KeyboardInterrupt traceback from inside an import, or death by
SIGTERM). So the stop-request handlers of sandbox/interrupts.py go in first, from modules that import
nothing heavy, and the CLI is imported after them: the one deliberate function-local import.
"""

from __future__ import annotations

import sys

from sandbox import interrupts


def main() -> int:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    interrupts.install_cli_handlers(graceful=command in interrupts.GRACEFUL_STOP_COMMANDS)
    try:
        from sandbox import cli  # after the handlers, on purpose (module docstring)
    except KeyboardInterrupt:  # a non-graceful command interrupted while importing
        print(f"sandbox{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return interrupts.ABORT_EXIT
    return cli.main(keep_requests=True)


if __name__ == "__main__":
    sys.exit(main())
