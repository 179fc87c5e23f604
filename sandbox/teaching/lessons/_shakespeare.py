"""Shared by the sampling and tokenizer lessons: a briefly trained byte model and its log-probs on held-out text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sandbox.config import load_config
from sandbox.data import builtin
from sandbox.infotheory import log_softmax
from sandbox.precision import exact
from sandbox.teaching.lessons import train_lesson_run
from sandbox.train.setup import parts


def trained_model(out_dir: Path, quick: bool):
    """(RunResult, config, model) of experiments/lessons/shakespeare_small.yaml (the model from the one builder)."""
    result = train_lesson_run("shakespeare_small", out_dir, ["training.steps=40"] if quick else [])
    cfg = load_config(Path(result.run_dir) / "config.yaml")  # the resolved config the run wrote
    return result, cfg, parts(cfg).model


def corpus_bytes(cfg) -> bytes:
    """The run's corpus file (a `builtin:NAME` resolved to the shipped copy)."""
    return builtin.resolve(cfg.data.paths[0]).read_bytes()


def heldout_text(cfg, n_bytes: int) -> bytes:
    """The first n_bytes of the validation tail of the corpus (text the model never trained on)."""
    data = corpus_bytes(cfg)
    start = int(len(data) * (1 - cfg.data.val_fraction))
    return data[start:start + n_bytes + 1]


def logprobs(model, params, cfg, text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Next-byte log-probs [N, 256] (fp32) and the targets [N] over non-overlapping context windows."""
    T = cfg.model.context
    ids = np.frombuffer(text, np.uint8).astype(np.int32)
    n = (len(ids) - 1) // T
    inputs = ids[: n * T].reshape(n, T)
    targets = ids[1: n * T + 1].reshape(n, T)
    logits = exact.jit(lambda p, x: model.apply({"params": p}, x))(params, inputs)
    return np.asarray(log_softmax(logits)).reshape(n * T, -1), targets.reshape(-1)
