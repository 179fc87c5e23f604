"""Tokenizers: an interface and the default byte-level one (vocab 256)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sandbox.errors import UserError


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary to train, any text (or binary) round-trips."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


TOKENIZERS = {"byte": ByteTokenizer}


def make_tokenizer(name: str) -> Tokenizer:
    try:
        return TOKENIZERS[name]()
    except KeyError:
        raise UserError(f"data.tokenizer: unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})") from None
