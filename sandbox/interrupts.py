"""Stop requests: what SIGINT (Ctrl-C) and SIGTERM do to a `sandbox` command.

Both signals mean the same thing, "stop", and are counted per command:

* The first request during training is graceful: the trainer's handler
  (`Trainer._install_signal_handlers`) only sets a flag; the loop finishes
  the step, saves a checkpoint, writes summary.json, joins its prefetch
  thread and returns. `sandbox train` then exits 0.
* Before that section (imports, building the model, restoring) `sandbox
  train` only notes the request, and the trainer stops before its first
  step: exit 0, nothing trained, nothing half-made (`--resume` starts it).
  It never raises KeyboardInterrupt: raised at a random moment, that lands
  inside library callbacks too (JAX's `_xla_gc_callback`), which print
  "Exception ignored ... Traceback" and swallow it. Other commands get
  KeyboardInterrupt as usual; `sandbox.cli` prints one line, exit 130.
* A second request aborts at once: one line on stderr and `os._exit(130)`,
  no traceback, no cleanup. That is as safe as a SIGKILL, which the
  checkpoint format already survives (the last complete checkpoint stays
  valid). It is the escape hatch when a graceful stop waits on a long
  compile or save.

The count is module state because the CLI's handler and the trainer's handler
share it: a request noted before training stops the run at its first step.
`reset()` starts a fresh count (each CLI command; each trainer
once its stop has been honoured), so in-process callers are not affected by an
earlier run's signals.
"""

from __future__ import annotations

import os
import signal
import sys

ABORT_EXIT = 130  # 128 + SIGINT, the shell's convention for "killed by Ctrl-C"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACEFUL_STOP_COMMANDS = frozenset({"train"})  # commands that stop themselves at a safe point

_requests = 0


def reset() -> None:
    global _requests
    _requests = 0


def requested() -> bool:
    """Whether a stop was requested and not yet honoured."""
    return _requests > 0


def note(signum: int) -> None:
    """Counts one stop request; the second aborts the process (see the module docstring)."""
    global _requests
    _requests += 1
    if _requests > 1:
        abort(signum)


def abort(signum: int) -> None:
    _say(f"\n{signal.Signals(signum).name} again: aborting now without saving "
         f"(the last checkpoint is intact; resume with --resume)\n")
    os._exit(ABORT_EXIT)


def note_request(signum: int, frame) -> None:
    """The handler of commands that stop themselves at their next safe point (`sandbox train`)."""
    note(signum)
    _say(f"{signal.Signals(signum).name}: stopping at the next safe point (again to abort now)\n")


def _say(text: str) -> None:
    """One line on stderr from a signal handler: a raw write, no locks that the interrupted code may hold."""
    try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError):  # stderr closed: the exit code still says it
        pass


def raise_keyboard_interrupt(signum: int, frame) -> None:
    """The handler of other commands: SIGTERM behaves exactly like Ctrl-C."""
    note(signum)
    raise KeyboardInterrupt


def install_cli_handlers(graceful: bool, keep_requests: bool = False) -> dict:
    """Installs note_request (graceful) or raise_keyboard_interrupt for SIGINT and SIGTERM.

    Returns the previous handlers, for restore(). `keep_requests`: the entry point installed the same
    handlers before the CLI's imports (sandbox/entry.py); a request noted then still counts.
    """
    if not keep_requests:
        reset()
    handler = note_request if graceful else raise_keyboard_interrupt
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        if handler is not None:  # None: installed outside Python, cannot be put back from here
            signal.signal(sig, handler)
