"""One exception type for bad user input.

Anything the user can fix (a config key, a file, a value) raises `UserError`
with a one-line message naming the key, file or value; the CLI prints it and
exits with status 2, never with a traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""

    exit_code = 2
