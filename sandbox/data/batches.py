"""Deterministic batches: step k's batch is a pure function of (data, seed, k).

Training windows are drawn with `default_rng([seed, k, TRAIN])`; validation
batches with `default_rng([VAL_SEED, i])`, independent of the training seed so
runs with different seeds are scored on the very same validation tokens.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sandbox.data.synthetic import MarkovSource
from sandbox.data.text import Corpus, corpus_tokenizer, corpus_tokens, text_corpus, train_length
from sandbox.data.tokenizer import ByteTokenizer, Tokenizer
from sandbox.errors import UserError

TRAIN_STREAM = 0
VAL_SEED = 0x5EED_7A1


@dataclass
class Batch:
    inputs: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32: inputs shifted by one

    @classmethod
    def from_windows(cls, windows: np.ndarray) -> "Batch":
        windows = np.asarray(windows, np.int32)
        return cls(windows[:, :-1], windows[:, 1:])

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "targets": self.targets}


@dataclass
class DataPipeline:
    """Draws train/validation windows of `context + 1` tokens."""

    tokenizer: Tokenizer
    seed: int
    batch_size: int
    context: int
    train_tokens: np.ndarray | None = None  # token corpora (text sources)
    val_tokens: np.ndarray | None = None
    markov: MarkovSource | None = None  # the synthetic source
    info: dict = field(default_factory=dict)  # e.g. entropy_rate, source_floor

    def _windows(self, rng: np.random.Generator, tokens: np.ndarray | None) -> np.ndarray:
        if self.markov is not None:
            return self.markov.sample(rng, self.batch_size, self.context + 1)
        starts = rng.integers(0, len(tokens) - self.context - 1, size=self.batch_size)
        return np.stack([tokens[s:s + self.context + 1] for s in starts])

    def train_batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, int(step), TRAIN_STREAM])
        return Batch.from_windows(self._windows(rng, self.train_tokens))

    def val_batch(self, index: int) -> Batch:
        rng = np.random.default_rng([VAL_SEED, int(index)])
        return Batch.from_windows(self._windows(rng, self.val_tokens))

    def prefetch_train(self, start: int, stop: int, depth: int,
                       transform: Callable[[Batch], object] = lambda b: b) -> "Prefetcher":
        """transform(train_batch(k)) for k in [start, stop), prepared `depth` ahead on a thread.

        Use it as a context manager (or call close()): the worker is stopped and joined on the way out.
        """
        return Prefetcher(lambda k: transform(self.train_batch(k)), start, stop, depth)


class Prefetcher:
    """Iterator over make(k) for k in [start, stop), made `depth` items ahead on a worker thread.

    Shutdown is deterministic: close() (also on leaving a `with` block) sets a stop event, drains
    the queue and joins the worker, so no worker outlives the loop that used it. Why it matters:
    the worker spends its time inside JAX (`make` puts the batch on the device). A daemon thread
    still running when the interpreter finalises is ended by pthread_exit the moment it reacquires
    the GIL; that forced unwind cannot cross JAX's noexcept C++ frames, and the process aborts
    after its work is done ("terminate called after throwing an instance of ''", "FATAL: exception
    not rethrown", exit 134). Relying on garbage collection to stop the worker left that window open.

    depth <= 0 makes each item on demand, on the caller's thread.
    """

    def __init__(self, make: Callable[[int], object], start: int, stop: int, depth: int):
        self._make, self._steps = make, iter(range(start, stop))
        self._remaining = max(0, stop - start)
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            # daemon: a caller that never closes us must not hang interpreter exit (close() is the contract)
            self._thread = threading.Thread(target=self._work, daemon=True, name="prefetch")
            self._thread.start()

    def _work(self) -> None:
        try:
            for k in self._steps:
                if self._stop.is_set() or not self._offer(self._make(k)):
                    return
        except BaseException as e:  # surfaced in the consumer
            self._offer(e)

    def _offer(self, item) -> bool:
        """Puts item on the queue unless stopped first; polls so close() never waits on a full queue."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._remaining <= 0 or self._stop.is_set():
            raise StopIteration
        self._remaining -= 1
        if self._thread is None:
            return self._make(next(self._steps))
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stops the worker and waits for it (at most the one item it is making); idempotent."""
        self._stop.set()
        if self._thread is None:
            return
        while self._thread.is_alive():
            self._drain()
            self._thread.join(timeout=0.05)
        self._drain()  # device buffers of unused batches are freed now, not at exit

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _split(tokens: np.ndarray, tokenizer: Tokenizer, val_fraction: float, context: int,
           what: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(tokens)
    n_train = train_length(tokens, tokenizer, val_fraction)
    train, val = tokens[:n_train], tokens[n_train:]
    if len(train) < context + 2:
        raise UserError(f"{what}: corpus of {n} tokens is too short for model.context={context} "
                        f"(needs more than {context + 1} training tokens)")
    if len(val) and len(val) < context + 2:
        raise UserError(f"data.val_fraction: validation split of {len(val)} tokens is shorter than "
                        f"model.context={context} + 2")
    return train, (val if len(val) else train)


def _corpus(d) -> Corpus:
    if d.source == "text":
        return text_corpus(d.paths)
    from sandbox.data.hf import hf_corpus  # imports `datasets` (most of a second): only for source=hf

    return hf_corpus(d)


def _check_vocab(d, model_vocab: int) -> None:
    """model.vocab_size is never derived from the data: a checkpoint's shapes must not depend on a corpus."""
    needed = {"byte": 256, "bpe": d.bpe_vocab_size}[d.tokenizer]
    if model_vocab < needed:
        what = "the byte tokenizer's 256" if d.tokenizer == "byte" else f"data.bpe_vocab_size={needed}"
        raise UserError(f"model.vocab_size: {model_vocab} is smaller than {what}; set model.vocab_size={needed}")


def tokenizer_for(cfg) -> Tokenizer:
    """The run's tokenizer: the byte one, or its BPE (from the cache, else retrained on the same split)."""
    d = cfg.data
    if d.tokenizer == "byte":
        return ByteTokenizer()
    return corpus_tokenizer(_corpus(d), d.tokenizer, d.bpe_vocab_size, d.val_fraction, d.cache_dir)


def text_info(tokenizer: Tokenizer, train: np.ndarray, val: np.ndarray) -> dict:
    """Token and UTF-8 byte counts of the splits; bytes_per_token (of the validation split) turns
    nats per token into bits per byte: bits/byte = ce / (ln 2 * bytes_per_token)."""
    val_bytes = int(tokenizer.byte_lengths[val].sum())
    return {"train_tokens": len(train), "val_tokens": len(val), "val_bytes": val_bytes,
            "bytes_per_token": val_bytes / len(val)}


def make_pipeline(cfg) -> DataPipeline:
    """The data pipeline a run config describes."""
    d, m = cfg.data, cfg.model
    common = dict(seed=cfg.seed, batch_size=cfg.training.batch_size, context=m.context)
    _check_vocab(d, m.vocab_size)
    if d.source == "synthetic":
        if d.tokenizer != "byte":
            raise UserError(f"data.tokenizer: {d.tokenizer} is trained on a corpus; data.source=synthetic "
                            f"has none (use byte)")
        s = d.synthetic
        if m.context < s.order:
            raise UserError(f"model.context: {m.context} is shorter than data.synthetic.order={s.order}")
        src = MarkovSource.create(s.alphabet, s.order, s.concentration, s.seed)
        info = {"entropy_rate": src.entropy_rate, "source_floor": src.window_floor(m.context)}
        return DataPipeline(tokenizer=ByteTokenizer(), markov=src, info=info, **common)
    corpus = _corpus(d)
    tok = corpus_tokenizer(corpus, d.tokenizer, d.bpe_vocab_size, d.val_fraction, d.cache_dir)
    tokens = corpus_tokens(corpus, tok, d.val_fraction, d.cache_dir)
    train, val = _split(tokens, tok, d.val_fraction, m.context, corpus.what)
    return DataPipeline(tokenizer=tok, train_tokens=train, val_tokens=val, info=text_info(tok, train, val),
                        **common)
