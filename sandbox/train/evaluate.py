"""Validation: means of the eval step's metrics over validation batches, plus what follows from the CE."""

from __future__ import annotations

import jax
import numpy as np

from sandbox.train.metrics import derived
from sandbox.train.setup import Run, place_batch
from sandbox.train.state import TrainState


def evaluate(run: Run, state: TrainState, batches: int) -> dict:
    """Means over `batches` val batches: ce (+ derived), entropy, precision_drift, kl_to_reference_*."""
    p = run.pipeline
    rows = jax.device_get([run.eval_fn(state.params, state.fp8_meta, place_batch(run, p.val_batch(i)), *run.frozen)
                           for i in range(batches)])
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {**derived(means["ce"], p.info), **means}
