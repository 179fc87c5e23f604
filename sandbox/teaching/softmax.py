"""`sandbox softmax`: naive vs stable softmax, side by side, in a chosen dtype.

Naive: exp(x) / sum(exp(x)) computed in the dtype. exp overflows once a logit
passes ln(max): 88.7 in fp32/bf16, only 11.09 in fp16. inf / inf is NaN.
Stable: subtract the max logit first, so every exp is in (0, 1] and the sum is
in [1, n]; mathematically the same softmax. The log-space quantities
(log-sum-exp, log-softmax, cross-entropy, entropy) come from
`sandbox.infotheory`, which is how the trainer forms them: in fp32, via
log-sum-exp, from the logits as stored in the dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from sandbox import infotheory
from sandbox.errors import UserError
from sandbox.teaching import print_table
from sandbox.teaching.formats import get_format

DTYPES = ("fp32", "fp16", "bf16")  # what jax computes in on every backend


@dataclass(frozen=True)
class SoftmaxReport:
    dtype: str  # format name the naive/stable columns are computed in
    logits: np.ndarray  # input logits / temperature, float64
    stored_logits: np.ndarray  # the same, rounded to the dtype
    naive_exp: np.ndarray  # exp(x) in the dtype: where inf appears
    naive: np.ndarray  # exp(x) / sum(exp(x)) in the dtype
    stable: np.ndarray  # exp(x - max) / sum(exp(x - max)) in the dtype
    reference: np.ndarray  # float64 softmax of `logits`
    log_softmax: np.ndarray  # infotheory.log_softmax (fp32)
    logsumexp: float  # infotheory.logsumexp (fp32)
    entropy_nats: float
    entropy_bits: float
    target: int | None
    cross_entropy_nats: float | None  # -log_softmax[target]
    explanation: str  # one line: what happened to the naive form


def _in_dtype(x, dtype):
    return jnp.asarray(np.asarray(x), dtype)


def explore(logits: Sequence[float], dtype: str = "fp32", target: int | None = None, temperature: float = 1.0) -> SoftmaxReport:
    """Compute every column for `logits / temperature` in `dtype`."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if not len(logits):
        raise UserError("give at least one logit")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {temperature}")
    x = np.asarray(logits, np.float64)
    if np.any(np.isnan(x) | np.isposinf(x)) or np.all(np.isneginf(x)):
        raise UserError(f"logits must be finite or -inf, with at least one finite: {list(logits)}")
    if target is not None and not 0 <= target < len(x):
        raise UserError(f"--target {target} is out of range for {len(x)} logits (0..{len(x) - 1})")
    x = x / temperature
    fmt = get_format(dtype)
    xs = _in_dtype(fmt.cast(x), fmt.dtype)
    naive_exp = jnp.exp(xs)
    naive = naive_exp / jnp.sum(naive_exp)
    shifted = jnp.exp(xs - jnp.max(xs))
    stable = shifted / jnp.sum(shifted)
    with np.errstate(under="ignore"):
        ref_exp = np.exp(x - np.max(x))
    logp = infotheory.log_softmax(xs)
    h_nats = float(infotheory.entropy(xs))
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731 - exact widening
    report = dict(
        dtype=dtype,
        logits=x,
        stored_logits=f64(xs),
        naive_exp=f64(naive_exp),
        naive=f64(naive),
        stable=f64(stable),
        reference=ref_exp / ref_exp.sum(),
        log_softmax=f64(logp),
        logsumexp=float(infotheory.logsumexp(xs)),
        entropy_nats=h_nats,
        entropy_bits=float(infotheory.nats_to_bits(h_nats)),
        target=target,
        cross_entropy_nats=None if target is None else -float(logp[target]),
    )
    return SoftmaxReport(**report, explanation=_explain(report, fmt.max))


def _explain(r: dict, dtype_max: float) -> str:
    """One line saying why the naive column is (or is not) broken."""
    x, stored, exps, dtype = r["logits"], r["stored_logits"], r["naive_exp"], r["dtype"]
    if not np.all(np.isfinite(stored) | np.isneginf(x)):
        bad = x[~np.isfinite(stored)][0]
        return f"The logit {bad:g} itself overflows {dtype} (max {dtype_max:g}): no softmax can recover; keep logits in fp32."
    if np.any(np.isposinf(exps)):
        big = stored[np.isposinf(exps)][0]
        return (
            f"Naive: exp({big:g}) > {dtype} max {dtype_max:g}, so it is inf and inf/inf = NaN; "
            f"stable subtracts the max logit ({stored.max():g}) so every exp is <= 1."
        )
    if np.sum(exps) == 0:
        return (
            f"Naive: every exp(x) underflows to 0 in {dtype}, and 0/0 = NaN; "
            f"stable subtracts the max logit ({stored.max():g}) so the largest term is exp(0) = 1."
        )
    gap = float(np.max(np.abs(r["naive"] - r["stable"])))
    return (
        f"No overflow: naive and stable agree to {gap:.1e}; naive breaks once a logit "
        f"passes ln({dtype_max:g}) = {math.log(dtype_max):.2f} in {dtype}."
    )


def render(r: SoftmaxReport) -> None:
    headers = ("i", "logit", f"stored ({r.dtype})", "naive exp", "naive softmax", "stable softmax", "float64 ref", "log-softmax")
    rows = [
        (str(i), f"{r.logits[i]:g}", f"{r.stored_logits[i]:g}", f"{r.naive_exp[i]:.6g}", f"{r.naive[i]:.6g}",
         f"{r.stable[i]:.6g}", f"{r.reference[i]:.6g}", f"{r.log_softmax[i]:.4f}")
        for i in range(len(r.logits))
    ]
    notes = [r.explanation]
    # Rounding visible at 6 significant digits is worth a line (bf16: 1001 -> 1000).
    moved = [i for i, (a, b) in enumerate(zip(r.logits, r.stored_logits)) if np.isfinite(b) and f"{a:g}" != f"{b:g}"]
    if moved:
        i = moved[0]
        notes.append(f"Rounding the logits alone changes the result: {r.dtype} stores {r.logits[i]:g} as {r.stored_logits[i]:g}.")
    notes += [f"log-sum-exp = {r.logsumexp:.4f}; entropy = {r.entropy_nats:.4f} nats = {r.entropy_bits:.4f} bits"]
    if r.target is not None:
        ce = r.cross_entropy_nats
        notes.append(
            f"cross-entropy for target {r.target} = -log-softmax[{r.target}] = {ce:.4f} nats = "
            f"{infotheory.nats_to_bits(ce):.4f} bits (perplexity {float(infotheory.perplexity(ce)):.3f})"
        )
    print_table(f"Softmax in {r.dtype}: naive vs stable", headers, rows, notes)
