"""Deterministic batches: step k's batch is a pure function of (data, seed, k).

Training windows are drawn with `default_rng([seed, k, TRAIN])`; validation
batches with `default_rng([VAL_SEED, i])`, independent of the training seed so
runs with different seeds are scored on the very same validation tokens.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from sandbox.data.synthetic import MarkovSource
from sandbox.data.text import load_hf_dataset, load_text_files
from sandbox.data.tokenizer import Tokenizer, make_tokenizer
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
                       transform: Callable[[Batch], object] = lambda b: b) -> Iterator:
        """Yields transform(train_batch(k)) for k in [start, stop), prepared `depth` ahead on a thread."""
        if depth <= 0:
            for k in range(start, stop):
                yield transform(self.train_batch(k))
            return
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop_flag = threading.Event()

        def work():
            try:
                for k in range(start, stop):
                    item = transform(self.train_batch(k))
                    while not stop_flag.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop_flag.is_set():
                        return
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        thread = threading.Thread(target=work, daemon=True, name="prefetch")
        thread.start()
        try:
            for _ in range(start, stop):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_flag.set()


def _split(tokens: np.ndarray, val_fraction: float, context: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(tokens)
    n_val = int(n * val_fraction)
    train, val = tokens[: n - n_val], tokens[n - n_val:]
    if len(train) < context + 2:
        raise UserError(f"{what}: corpus of {n} tokens is too short for model.context={context} "
                        f"(needs more than {context + 1} training tokens)")
    if n_val and len(val) < context + 2:
        raise UserError(f"data.val_fraction: validation split of {len(val)} tokens is shorter than "
                        f"model.context={context} + 2")
    return train, (val if n_val else train)


def make_pipeline(cfg) -> DataPipeline:
    """The data pipeline a run config describes."""
    d, m = cfg.data, cfg.model
    tok = make_tokenizer(d.tokenizer)
    if tok.vocab_size > m.vocab_size:
        raise UserError(f"model.vocab_size: {m.vocab_size} is smaller than the {tok.name} tokenizer's "
                        f"{tok.vocab_size}")
    common = dict(tokenizer=tok, seed=cfg.seed, batch_size=cfg.training.batch_size, context=m.context)
    if d.source == "synthetic":
        s = d.synthetic
        if m.context < s.order:
            raise UserError(f"model.context: {m.context} is shorter than data.synthetic.order={s.order}")
        src = MarkovSource.create(s.alphabet, s.order, s.concentration, s.seed)
        info = {"entropy_rate": src.entropy_rate, "source_floor": src.window_floor(m.context)}
        return DataPipeline(markov=src, info=info, **common)
    if d.source == "text":
        tokens = load_text_files(d.paths, tok, d.cache_dir)
        what = "data.paths"
    else:
        tokens = load_hf_dataset(d.hf_name, d.hf_config, d.hf_split, d.hf_field, tok, d.cache_dir)
        what = "data.hf_name"
    train, val = _split(tokens, d.val_fraction, m.context, what)
    return DataPipeline(train_tokens=train, val_tokens=val,
                        info={"train_tokens": len(train), "val_tokens": len(val)}, **common)
