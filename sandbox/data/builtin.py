"""Corpora shipped inside the package, named in configs as `builtin:NAME`.

A config that points at a file beside the repository breaks in every fresh
clone, so the corpora the shipped configs, experiments and lessons train on
travel with the package (package data, found through `importlib.resources`,
so an installed wheel works as well as a checkout). Only names listed here
resolve; anything else after `builtin:` is an error naming the choices.

tinyshakespeare: Karpathy's char-rnn collection of Shakespeare's plays
(public domain text), 1,115,394 bytes.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sandbox.errors import UserError

PREFIX = "builtin:"
CORPORA = {"tinyshakespeare": "tinyshakespeare.txt"}


def is_builtin(path: str) -> bool:
    return str(path).startswith(PREFIX)


def corpus_path(name: str) -> Path:
    """The file of a shipped corpus."""
    if name not in CORPORA:
        raise UserError(f"data.paths: {PREFIX}{name}: unknown built-in corpus "
                        f"(choose from: {', '.join(PREFIX + c for c in CORPORA)})")
    return Path(str(resources.files("sandbox.data") / "corpora" / CORPORA[name]))


def resolve(path: str) -> Path:
    """`builtin:NAME` as the shipped file; any other string as the path it names."""
    return corpus_path(str(path)[len(PREFIX):]) if is_builtin(path) else Path(path)
