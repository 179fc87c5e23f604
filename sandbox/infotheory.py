"""Information theory in log space: the one place probabilities are formed.

Units. Natural logs give *nats*; base-2 logs give *bits*; 1 bit = ln 2 nats
(`NATS_PER_BIT`). Training losses are in nats because `exp`/`log` are the
natural pair; bits are what people compare with compression (a character-level
model at 1.5 bits/char). Perplexity is `exp(cross-entropy in nats)`: the
number of equally likely choices that would be as surprising.

Why log space. `exp(1000)` overflows every float format, and `exp(-200)` is 0
in fp32, so a probability can round to 0 while its log-probability (-200) is
perfectly representable. Everything here therefore works on logits or
log-probabilities over the last axis:

- `log_softmax(x) = (x - m) - log(sum(exp(x - m)))` with `m = max(x)`: no
  `exp` ever sees a positive argument, and the shift comes *first*. The
  textbook `x - logsumexp(x)` is mathematically the same but rounds
  `logsumexp(x)`, a number as large as the largest logit, before the
  subtraction: with near-tie logits around 1e4 that costs ~5e-4 nats per
  log-probability in fp32 (half an ulp of 1e4), where the shifted form stays
  below 1e-6. `x - m` is exact for logits within a factor 2 of the max, and
  the log of a sum in [1, n] is small, so the result is rounded only at its
  own magnitude.
- Divergences use `sum p * (log p - log q)` with `p = exp(log p)`. A term whose
  `log p` is -inf contributes exactly 0 (the limit of p log p), instead of the
  NaN that `0 * -inf` would give; a term where `p > 0` but `log q` is tiny
  stays finite because `log q` itself never rounded to -inf.

All maths runs in fp32 whatever the input dtype (bf16/fp16 logits are cast
up): losses and their reductions are where low precision hurts most.

Functions taking `logp`/`logq` accept log-probabilities or raw logits: they
are normalised with `log_softmax`, which leaves log-probabilities unchanged.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp as _logsumexp

NATS_PER_BIT = math.log(2.0)  # ln 2: one bit is 0.693... nats


def _f32(x) -> jnp.ndarray:
    """Cast up to fp32: the precision all loss maths runs in."""
    return jnp.asarray(x).astype(jnp.float32)


def logsumexp(logits) -> jnp.ndarray:
    """log(sum(exp(logits))) over the last axis, max-shifted, in fp32."""
    return _logsumexp(_f32(logits), axis=-1)


def log_softmax(logits) -> jnp.ndarray:
    """Log-probabilities over the last axis: (x - max) - log(sum(exp(x - max))), in fp32."""
    x = _f32(logits)
    # The shift is a constant for differentiation (log-softmax does not depend on it),
    # as in jax.nn.log_softmax; a -inf logit stays -inf and its exp is exactly 0.
    shifted = x - lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _p_times(logp: jnp.ndarray, value: jnp.ndarray) -> jnp.ndarray:
    """p * value with p = exp(logp), exactly 0 where logp is -inf.

    Where p > 0 but exp(logp) underflows to 0 and value is infinite, the
    product is that infinity (p is tiny, not zero), never 0 * inf = NaN.
    The double `where` keeps gradients finite too: the masked branch never
    sees -inf, so it cannot produce NaN cotangents.
    """
    absent = jnp.isneginf(logp)
    safe_logp = jnp.where(absent, 0.0, logp)
    safe_value = jnp.where(absent, 0.0, value)
    product = jnp.where(jnp.isinf(safe_value), safe_value, jnp.exp(safe_logp) * safe_value)
    return jnp.where(absent, 0.0, product)


def entropy(logits) -> jnp.ndarray:
    """H(p) = -sum p log p in nats, p = softmax(logits), over the last axis."""
    logp = log_softmax(logits)
    return -jnp.sum(_p_times(logp, logp), axis=-1)


def cross_entropy(logits, targets, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Per-position cross-entropy in nats of integer `targets` under `logits`.

    With label smoothing e the target distribution is (1-e) one-hot + e
    uniform, so the loss is (1-e) * NLL + e * mean(-log p) over the classes.
    """
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logp = log_softmax(logits)
    targets = jnp.asarray(targets, jnp.int32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if isinstance(label_smoothing, (int, float)) and label_smoothing == 0.0:
        return nll
    uniform = -jnp.mean(logp, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def cross_entropy_dist(logp, logq) -> jnp.ndarray:
    """H(p, q) = -sum p log q in nats: the cost of coding p with q's code."""
    logp, logq = log_softmax(logp), log_softmax(logq)
    return -jnp.sum(_p_times(logp, logq), axis=-1)


def kl_divergence(logp, logq) -> jnp.ndarray:
    """KL(p || q) = sum p (log p - log q) in nats; >= 0, 0 iff p == q.

    Infinite only where q has log-probability -inf and p does not.
    """
    logp, logq = log_softmax(logp), log_softmax(logq)
    return jnp.sum(_p_times(logp, logp - logq), axis=-1)


def js_divergence(logp, logq) -> jnp.ndarray:
    """Jensen-Shannon divergence in nats: symmetric, bounded by ln 2.

    The mixture m = (p + q) / 2 is formed in log space with logaddexp.
    """
    logp, logq = log_softmax(logp), log_softmax(logq)
    logm = jnp.logaddexp(logp, logq) - NATS_PER_BIT
    return 0.5 * (kl_divergence(logp, logm) + kl_divergence(logq, logm))


def perplexity(ce_nats) -> jnp.ndarray:
    """exp(cross-entropy in nats); overflows to inf in fp32 past ~88.7 nats."""
    return jnp.exp(_f32(ce_nats))


def nats_to_bits(x):
    """Nats to bits (works on floats, numpy and jax arrays)."""
    return x / NATS_PER_BIT


def bits_to_nats(x):
    """Bits to nats (works on floats, numpy and jax arrays)."""
    return x * NATS_PER_BIT
