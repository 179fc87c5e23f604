"""Training objectives on fp32 logits: cross-entropy, optionally + beta * KL.

Probabilities are only ever formed in log space (see `infotheory`). The
objective returns the scalar loss and its named parts, so the CE and KL
terms are logged separately.
"""

from __future__ import annotations

import jax.numpy as jnp

from sandbox import infotheory


def lm_objective(logits_BTV, targets_BT, *, label_smoothing: float = 0.0):
    """Mean next-token cross-entropy in nats (fp32), and its parts."""
    ce_BT = infotheory.cross_entropy(logits_BTV, targets_BT, label_smoothing=label_smoothing)
    loss = jnp.mean(ce_BT)
    return loss, {"ce": loss}
