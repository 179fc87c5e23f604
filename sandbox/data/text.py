"""Corpora, tokenized once and cached as memory-mapped token arrays.

A path in a config is a path: each file is opened and read exactly as named
(not through HF `datasets`, whose loader treats `[1]` as a glob and `a::b`
as a chained URL, so `corpus[1].txt` silently read `corpus1.txt`). A corpus
is tokenized once into a `.npy` under `data.cache_dir`, keyed by the files'
names, sizes and mtimes and the tokenizer, and memory-mapped from then on, so
it is never held in RAM twice. Files that are not UTF-8 are read as raw bytes
when the tokenizer is `byte` (binary data is fine for it).

The cache is input too: beside each `.npy` a `.sha256` holds its checksum,
written after the array and renamed into place. A cache that is missing its
checksum, does not match it, does not load (truncated, a pickle: `np.load`
never unpickles), is not a 1-d integer array, or holds a token id outside the
tokenizer's vocabulary is reported in one warning line and rebuilt from the
source, rather than surfacing later as a non-finite loss. Checking costs one
read of the cache per run.

A `Corpus` is any source as one byte string (text files here, HF datasets in
sandbox/data/hf.py) plus a key naming its identity for the caches. Its tail
`val_fraction` of bytes is the validation split. A tokenizer that is trained
(`bpe`) is trained on the training split only, cached as
`bpe-<key>.json` (the `tokenizers` JSON, keyed by the corpus, the split and
the vocabulary size), and encodes the two splits separately, so the cached
token array is train tokens then validation tokens; where one ends is derived
from the tokens' byte lengths (`train_length`), so the cache stays one array.
For such tokenizers the split moves forward to the next character start (at
most 3 bytes), since a split inside a character is not text.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sandbox.data import builtin
from sandbox.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer
from sandbox.errors import UserError
from sandbox.rundir import file_sha256


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"data.paths: {path}: file not found")
    if path.is_dir():
        raise UserError(f"data.paths: {path}: is a directory, expected a text file")
    if not os.access(path, os.R_OK):
        raise UserError(f"data.paths: {path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise UserError(f"data.paths: {path}: file is empty")


def _cache_path(cache_dir: Path, key_parts: list[str], prefix: str = "tokens", suffix: str = ".npy") -> Path:
    # surrogateescape: file names that are not UTF-8 are keyed by their raw bytes
    digest = hashlib.sha256("\0".join(key_parts).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return cache_dir / f"{prefix}-{digest}{suffix}"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _save_atomic(path: Path, tokens: np.ndarray) -> None:
    """The array, then its checksum, each written to a temp file and renamed (see the module doc)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens, allow_pickle=False)
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    tmp_sum = _checksum_path(tmp)
    tmp_sum.write_text(digest, encoding="utf-8")
    os.replace(tmp_sum, _checksum_path(path))


def _cache_damage(path: Path, vocab_size: int) -> tuple[np.ndarray | None, str | None]:
    """(tokens, None) for an intact cache, else (None, why it cannot be used)."""
    try:
        expected = _checksum_path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, "no checksum"
    if file_sha256(path) != expected:
        return None, "checksum mismatch"
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e.__class__.__name__})"
    if tokens.ndim != 1 or tokens.dtype.kind != "u" or not len(tokens):
        return None, f"not a token array ({tokens.dtype}, shape {tokens.shape})"
    if int(tokens.max()) >= vocab_size:
        return None, f"token id {int(tokens.max())} outside the vocabulary of {vocab_size}"
    return tokens, None


def _cached_tokens(path: Path, vocab_size: int, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The memory-mapped cache at `path`, (re)built with `build()` when missing or damaged."""
    if path.exists():
        tokens, damage = _cache_damage(path, vocab_size)
        if damage is None:
            return tokens
        print(f"warning: token cache {path}: {damage}; rebuilt from the source", file=sys.stderr)
    _save_atomic(path, build().astype(_token_dtype(vocab_size)))
    tokens, damage = _cache_damage(path, vocab_size)
    if damage is not None:
        raise UserError(f"data.cache_dir: token cache {path} is damaged right after writing it ({damage})")
    return tokens


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


@dataclass(frozen=True)
class Corpus:
    what: str  # the config key that names the source, for error lines
    key: tuple[str, ...]  # identity of the source (names, sizes, mtimes): equal keys, equal bytes
    read: Callable[[], bytes]  # the whole corpus as bytes (documents joined)


def text_corpus(paths: tuple[str, ...]) -> Corpus:
    """Text files read exactly as named (`builtin:NAME` for a shipped corpus), concatenated."""
    files = [builtin.resolve(p) for p in paths]
    for f in files:
        _check_file(f)
    return Corpus("data.paths", file_key(files), lambda: b"".join(f.read_bytes() for f in files))


def file_key(files: list[Path]) -> tuple[str, ...]:
    return tuple(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def split_offset(data: bytes, val_fraction: float, at_character: bool) -> int:
    """Where the validation tail of `data` starts (at a character start when `at_character`)."""
    b = len(data) - int(len(data) * val_fraction)
    return _next_character(data, b) if at_character else b


def _next_character(data: bytes, offset: int) -> int:
    while offset < len(data) and data[offset] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        offset += 1
    return offset


def train_length(tokens: np.ndarray, tokenizer: Tokenizer, val_fraction: float) -> int:
    """How many of a cached array's tokens are the training split's (see the module doc)."""
    if not tokenizer.needs_text:  # a token per byte, split exactly
        return len(tokens) - int(len(tokens) * val_fraction)
    ends = np.cumsum(tokenizer.byte_lengths[tokens])
    b = int(ends[-1]) - int(int(ends[-1]) * val_fraction)
    i = int(np.searchsorted(ends, b, side="right"))  # the token holding byte b
    first = int(ends[i - 1]) if i else 0
    if i < len(tokens) and b > first:  # b is inside token i: find the character start from the bytes
        near = b"".join(tokenizer.token_bytes[int(t)] for t in tokens[i:i + 4])
        b = first + _next_character(near, b - first)
    return int(np.searchsorted(ends, b, side="right"))


def _text(data: bytes, corpus: Corpus, tokenizer_name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{corpus.what}: not UTF-8 text (byte {e.start}), and tokenizer "
                        f"{tokenizer_name!r} needs text") from None


def corpus_tokenizer(corpus: Corpus, name: str, vocab_size: int, val_fraction: float,
                     cache_dir: str) -> Tokenizer:
    """The byte tokenizer, or the BPE trained on (and cached for) this corpus's training split."""
    if name == "byte":
        return ByteTokenizer()
    key = ("bpe", str(vocab_size), f"split:{val_fraction!r}", *corpus.key)
    path = _cache_path(Path(cache_dir), list(key), prefix="bpe", suffix=".json")
    if path.exists():
        try:
            tok = BPETokenizer.from_json(path.read_text(encoding="utf-8"))
            damage = f"{tok.vocab_size} tokens, expected at most {vocab_size}" if tok.vocab_size > vocab_size else None
        except Exception as e:  # the library's own errors for a damaged file  # noqa: BLE001
            damage = f"unreadable ({e.__class__.__name__})"
        if damage is None:
            return tok
        print(f"warning: tokenizer cache {path}: {damage}; retrained", file=sys.stderr)
    data = corpus.read()
    tok = BPETokenizer.train(_text(data[:split_offset(data, val_fraction, True)], corpus, name), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(tok.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return tok


def corpus_tokens(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, cache_dir: str) -> np.ndarray:
    """The corpus's tokens (training split, then validation split), as a read-only memory map."""
    key = [tokenizer.key, *corpus.key]
    if tokenizer.needs_text:  # the splits are encoded apart: where they meet is part of the key
        key.append(f"split:{val_fraction!r}")

    def build() -> np.ndarray:
        data = corpus.read()
        if not tokenizer.needs_text:
            return np.frombuffer(data, np.uint8)
        b = split_offset(data, val_fraction, True)
        return np.concatenate([tokenizer.encode(_text(part, corpus, tokenizer.name))
                               for part in (data[:b], data[b:])])

    return _cached_tokens(_cache_path(Path(cache_dir), key), tokenizer.vocab_size, build)
