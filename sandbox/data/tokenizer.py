"""Tokenizers: the byte-level default (vocab 256) and a trained byte-level BPE.

Both map text to ids over bytes, so every token stands for a fixed byte
string and `byte_lengths[id]` is its length: the number of UTF-8 bytes behind
any token array is `byte_lengths[ids].sum()`, which is how the pipeline turns
cross-entropy per token into bits per byte, the unit that compares across
tokenizers (perplexity per token does not).

`bpe` is HF `tokenizers`' BPE with the GPT-2 byte-level pre-tokenizer and an
initial alphabet of all 256 byte symbols, no normaliser and no special
tokens, so any string round-trips exactly and no id is ever unknown. It is
trained by the data pipeline on the run's training split (sandbox/data/text.py
caches it) and stored only in the `tokenizers` JSON format: loading a
tokenizer never runs code.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sandbox.errors import UserError


class Tokenizer(Protocol):
    name: str  # the data.tokenizer choice
    key: str  # identity for token caches: equal keys encode identically
    vocab_size: int
    needs_text: bool  # False: raw bytes that are not UTF-8 are fine
    token_bytes: list[bytes]  # [vocab_size] the bytes behind each id
    byte_lengths: np.ndarray  # [vocab_size] len(token_bytes[id])

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary to train, any text (or binary) round-trips."""

    name = key = "byte"
    vocab_size = 256
    needs_text = False
    token_bytes = [bytes([i]) for i in range(256)]
    byte_lengths = np.ones(256, np.int64)

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from HF `tokenizers` (see the module doc)."""

    name = "bpe"
    needs_text = True

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.key = "bpe:" + hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:20]
        symbols = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        table = _byte_level_symbols()
        self.token_bytes = [bytes(table[c] for c in s) for s, _ in symbols]
        self.byte_lengths = np.array([len(b) for b in self.token_bytes], np.int64)

    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int) -> "BPETokenizer":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, spec: str) -> "BPETokenizer":
        return cls(tokenizers.Tokenizer.from_str(spec))

    def to_json(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def _byte_level_symbols() -> dict[str, int]:
    """The byte-level alphabet: symbol -> byte (GPT-2's table, as `pre_tokenizers.ByteLevel` uses it).

    Printable bytes stand for themselves; the others are shifted to code points 256 and up, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


TOKENIZERS = ("byte", "bpe")


def make_tokenizer(name: str) -> Tokenizer:
    """A tokenizer that needs no training (`bpe` is built by the data pipeline: `tokenizer_for`)."""
    if name == "byte":
        return ByteTokenizer()
    if name in TOKENIZERS:
        raise UserError(f"data.tokenizer: {name!r} is trained on the corpus; build it with "
                        f"sandbox.data.tokenizer_for(cfg)")
    raise UserError(f"data.tokenizer: unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")
