"""One exception type for bad user input.

Anything the user can fix (a config key, a file, a value) raises `UserError`
with a one-line message naming the key, file or value; the CLI prints it and
exits with status 2, never with a traceback. A value echoed in a message goes
through `shown`, so a huge input (a YAML alias bomb, a megabyte string) is
never printed whole: the line stays short whatever the user sent.
"""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def shown(value, limit: int = 120) -> str:
    """A bounded repr of `value` for an error line: nested and long values are elided with '...'."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""

    exit_code = 2
