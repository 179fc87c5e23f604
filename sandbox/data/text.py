"""Text corpora, tokenized once and cached as memory-mapped token arrays.

Local files go through HF `datasets`' `text` builder (one document per file,
so newlines survive); a large corpus is then tokenized once into a `.npy`
under `data.cache_dir`, keyed by the files' names, sizes and mtimes and the
tokenizer, and memory-mapped from then on, so it is never held in RAM twice.
Files that are not UTF-8 are read as raw bytes when the tokenizer is `byte`
(binary data is fine for it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from sandbox.data import builtin
from sandbox.data.tokenizer import Tokenizer
from sandbox.errors import UserError


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"data.paths: {path}: file not found")
    if path.is_dir():
        raise UserError(f"data.paths: {path}: is a directory, expected a text file")
    if not os.access(path, os.R_OK):
        raise UserError(f"data.paths: {path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise UserError(f"data.paths: {path}: file is empty")


def _cache_path(cache_dir: Path, key_parts: list[str]) -> Path:
    digest = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:20]
    return cache_dir / f"tokens-{digest}.npy"


def _save_atomic(path: Path, tokens: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, tokens, allow_pickle=False)
    os.replace(tmp, path)


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32


def _read_with_datasets(paths: list[Path], cache_dir: Path) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=[str(p) for p in paths], sample_by="document",
                               split="train", cache_dir=str(cache_dir / "hf"))
    return list(ds["text"])


def load_text_files(paths: tuple[str, ...], tokenizer: Tokenizer, cache_dir: str) -> np.ndarray:
    """All files' tokens concatenated, as a read-only memory map."""
    files = [builtin.resolve(p) for p in paths]
    for f in files:
        _check_file(f)
    key = [tokenizer.name] + [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    cached = _cache_path(Path(cache_dir), key)
    if not cached.exists():
        try:
            texts = _read_with_datasets(files, Path(cache_dir))
            parts = [tokenizer.encode(t) for t in texts]
        except UnicodeDecodeError:
            if tokenizer.name != "byte":
                raise UserError(f"data.paths: {paths}: not UTF-8 text, and tokenizer "
                                f"{tokenizer.name!r} needs text") from None
            parts = [np.frombuffer(f.read_bytes(), np.uint8) for f in files]
        except Exception as e:  # datasets wraps decode errors in its own types
            if "codec can't decode" not in str(e) and "UnicodeDecodeError" not in repr(e.__cause__):
                raise
            if tokenizer.name != "byte":
                raise UserError(f"data.paths: not UTF-8 text, and tokenizer {tokenizer.name!r} needs text") from None
            parts = [np.frombuffer(f.read_bytes(), np.uint8) for f in files]
        tokens = np.concatenate(parts).astype(_token_dtype(tokenizer.vocab_size))
        _save_atomic(cached, tokens)
    return np.load(cached, mmap_mode="r", allow_pickle=False)


def load_hf_dataset(name: str, config: str, split: str, field: str, tokenizer: Tokenizer,
                    cache_dir: str) -> np.ndarray:
    """Any HF dataset's text field, tokenized once and memory-mapped (needs network the first time)."""
    import datasets

    key = [tokenizer.name, "hf", name, config, split, field]
    cached = _cache_path(Path(cache_dir), key)
    if not cached.exists():
        try:
            ds = datasets.load_dataset(name, config or None, split=split, cache_dir=str(Path(cache_dir) / "hf"))
        except Exception as e:
            raise UserError(f"data.hf_name: cannot load HF dataset {name!r} ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if field not in ds.column_names:
            raise UserError(f"data.hf_field: {field!r} is not a column of {name} (columns: {ds.column_names})")
        sep = tokenizer.encode("\n\n")
        parts = []
        for text in ds[field]:
            parts += [tokenizer.encode(text), sep]
        _save_atomic(cached, np.concatenate(parts).astype(_token_dtype(tokenizer.vocab_size)))
    return np.load(cached, mmap_mode="r", allow_pickle=False)
