"""Name the cause of a non-finite value, and of a divergence without one.

`classify` looks at one operation: its primitive, its input arrays and its
output array, and returns `(cause, explanation, remedy)`. It is plain NumPy on
concrete values, so it can be tested without tracing anything.

Cause classes (stable strings, used in bundles and JSON reports):

  overflow          finite inputs, a result beyond the dtype's largest value
  exp_overflow      exp of an input above log(dtype max) (11.09 in fp16)
  log_of_zero       log of 0 (-inf) or of a negative number (NaN)
  zero_div_zero     0/0
  div_by_zero       x/0 with x != 0
  sqrt_negative     sqrt or rsqrt of a negative number
  rsqrt_zero        rsqrt of 0
  invalid_operation NaN from finite inputs in any other op
  inf_minus_inf     inf - inf (or inf + -inf): NaN from infinite inputs
  inf_times_zero    inf * 0: NaN from infinite inputs
  nonfinite_propagated  an op fed with non-finite inputs, nothing newer
  nonfinite_input   the function's own inputs (parameters, batch) already bad
  nonfinite_constant    a constant captured by the function is non-finite
  exploding_update  (from `classify_divergence`) the gradient norm or the
                    loss grew before anything became non-finite

`logit_growth` reads the same recorded history for the two instabilities of
Wortsman et al. 2023 (the step's telemetry logs them, see train/step.py):

  attention_logit_growth   the largest attention score (over blocks) grew
                           LOGIT_GROWTH_FACTOR-fold to at least ATTN_LOGIT_LARGE
                           within the recorded window (a bundle keeps the last
                           forensics.history rows: a healthy run's logits are
                           steady over that many steps)
  output_logit_divergence  the largest |log Z| of the output logits drifted
                           LOG_Z_DRIFT nats from where the history starts
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_dtypes
import numpy as np

# `classify_divergence` thresholds.
GRAD_NORM_JUMP = 10.0  # last grad norm / median of the earlier ones that counts as exploding
MIN_HISTORY = 3  # fewer points than this say nothing
RISING_WINDOW = 5  # this many strictly rising losses in a row ...
RISING_FACTOR = 1.5  # ... ending at least this many times the first of them
LOGIT_GROWTH_FACTOR = 3.0  # attention logits this many times their first recorded max ...
ATTN_LOGIT_LARGE = 5.0  # ... and at least this large: e^5 ~ 150:1 odds already (exp overflows fp16 past 11.1)
LOG_Z_DRIFT = 5.0  # nats of drift of max |log Z| that count as output-logit divergence



def _range_remedy(dtype: np.dtype) -> str:
    """What to do about an overflow in `dtype`."""
    if "float8" in dtype.name:
        return ("Scale before the fp8 cast (delayed scaling from a recent amax, with a margin) "
                "so values stay under the format's max, or keep this op in bf16/fp32.")
    if dtype.itemsize >= 4:
        return ("fp32 overflow means values diverged upstream: lower the learning rate, clip gradients "
                "and check the normalisation feeding this op.")
    return ("Keep this op in fp32 (or bf16, which has fp32's range), and for gradients "
            "use dynamic loss scaling so the scale backs off on overflow.")


def dtype_max(dtype) -> float:
    """Largest finite value of a floating dtype (fp16 65504, e4m3fn 448, e5m2 57344); inf otherwise."""
    try:
        return float(ml_dtypes.finfo(dtype).max)
    except (TypeError, ValueError):
        return math.inf


def _as_f64(x) -> np.ndarray:
    a = np.asarray(x)
    if np.iscomplexobj(a):
        a = np.abs(a)
    return a.astype(np.float64)


def _max_abs_finite(arrays: Sequence[np.ndarray]) -> float:
    vals = [np.abs(a[np.isfinite(a)]) for a in arrays]
    vals = [v for v in vals if v.size]
    return float(max(v.max() for v in vals)) if vals else 0.0


def classify(primitive: str, inputs: Sequence, output, name_stack: str = "",
             after_softmax: bool = False) -> tuple[str, str, str]:
    """(cause, explanation, remedy) for `primitive` turning `inputs` into `output`.

    `name_stack` is the op's module path (a 'softmax' in it sharpens the
    explanation); `after_softmax` says the op's input came out of a softmax.
    """
    dtype = np.asarray(output).dtype
    ins = [_as_f64(x) for x in inputs if _is_numeric(np.asarray(x).dtype)]
    out = _as_f64(output)
    has_nan = bool(np.isnan(out).any())
    inputs_finite = all(np.isfinite(a).all() for a in ins)
    big = _max_abs_finite(ins)
    top = dtype_max(dtype)
    where = f" in {name_stack}" if name_stack else ""

    if not inputs_finite:
        return _from_nonfinite(primitive, ins, where)

    if primitive in ("exp", "exp2", "expm1"):
        limit = math.log2(top) if primitive == "exp2" else math.log(top)
        base = "log2" if primitive == "exp2" else "log"
        why = (f"{primitive}{where}: inputs reach {big:.4g}, above {base}({top:.6g}) = {limit:.4g}, "
               f"so the result overflows {dtype.name}.")
        if "softmax" in name_stack:
            why += " This is an unstable (naive) softmax: exp of raw scores without subtracting the row max."
        return ("exp_overflow", why,
                "Subtract the row max before exp (log-sum-exp / jax.nn.log_softmax) "
                "and form probabilities in fp32.")

    if primitive in ("log", "log1p"):
        edge = -1.0 if primitive == "log1p" else 0.0
        zeros = int((ins[0] == edge).sum())
        negs = int((ins[0] < edge).sum())
        what = "log of a softmax that underflowed to 0" if after_softmax else f"{primitive} of {edge:g}"
        return ("log_of_zero",
                f"{what}{where}: {zeros} inputs equal {edge:g} (-> -inf) and {negs} are below it (-> NaN).",
                "Compute log-probabilities with jax.nn.log_softmax / log-sum-exp instead of log(softmax), "
                "or clamp the argument away from 0.")

    if primitive == "div":
        num, den = np.broadcast_arrays(ins[0], ins[1])
        both = int(((num == 0) & (den == 0)).sum())
        by_zero = int(((num != 0) & (den == 0)).sum())
        if both:
            return ("zero_div_zero", f"0/0{where} at {both} positions gives NaN.",
                    "Add an epsilon to the denominator or select with jnp.where before dividing "
                    "(and guard the inputs too, so the gradient stays finite).")
        if by_zero:
            return ("div_by_zero", f"Division by zero{where} at {by_zero} positions gives inf.",
                    "Add an epsilon to the denominator, or guard it with jnp.where on both the value "
                    "and the op's input so the gradient stays finite.")

    if primitive in ("sqrt", "rsqrt") and (ins[0] < 0).any():
        return ("sqrt_negative",
                f"{primitive}{where} of {int((ins[0] < 0).sum())} negative values "
                f"(min {ins[0].min():.4g}) gives NaN.",
                "Clamp the argument at 0 (or add an epsilon) before the square root.")
    if primitive == "rsqrt" and (ins[0] == 0).any():
        return ("rsqrt_zero", f"rsqrt{where} of {int((ins[0] == 0).sum())} zeros gives inf.",
                "Add an epsilon inside the rsqrt (as layer norms do).")

    if not has_nan or not _has_inf(dtype):
        made = "inf" if _has_inf(dtype) else f"NaN ({dtype.name} has no inf)"
        return ("overflow",
                f"{primitive}{where} produced {made} from finite inputs: the result exceeds {dtype.name}'s "
                f"largest value {top:.6g}; the largest input magnitude was {big:.4g}.",
                _range_remedy(dtype))
    return ("invalid_operation",
            f"{primitive}{where} produced NaN from finite inputs (largest input magnitude {big:.4g}).",
            f"Check the domain of {primitive}'s arguments and clamp or guard them before the op.")


def _has_inf(dtype) -> bool:
    """False for formats like float8_e4m3fn, where overflow gives NaN."""
    with np.errstate(all="ignore"):
        return bool(np.isinf(np.array(np.inf, np.float32).astype(dtype)))


def _is_numeric(dtype: np.dtype) -> bool:
    """Integers and floats, ml_dtypes' bf16/fp8 included (their NumPy kind is 'V')."""
    return dtype.kind in "iufc" or (dtype.kind == "V" and "float" in dtype.name)


def _from_nonfinite(primitive: str, ins: list[np.ndarray], where: str) -> tuple[str, str, str]:
    """NaN made out of inputs that were already infinite."""
    infs = [np.isinf(a) for a in ins]
    if primitive in ("sub", "add", "add_any") and len(ins) == 2:
        a, b = np.broadcast_arrays(*ins)
        same = np.sign(a) == np.sign(b)
        clash = np.isinf(a) & np.isinf(b) & (same if primitive == "sub" else ~same)
        if clash.any():
            return ("inf_minus_inf", f"inf - inf{where} at {int(clash.sum())} positions gives NaN.",
                    "Mask with a large finite value (jnp.finfo(dtype).min) instead of -inf, "
                    "or make sure no row is fully masked.")
    has_zero = any((a == 0).any() for a in ins)
    if primitive in ("mul", "dot_general") and any(i.any() for i in infs) and has_zero:
        return ("inf_times_zero", f"inf * 0{where} gives NaN.",
                "Find where the inf came from; mask with a large finite value rather than inf.")
    return ("nonfinite_propagated", f"{primitive}{where} received non-finite inputs.",
            "Trace the non-finite input back to where it was made.")


def classify_divergence(grad_norm_history: Sequence[float],
                        loss_history: Sequence[float]) -> tuple[str, str, str] | None:
    """('exploding_update', explanation, remedy) when training was blowing up, else None.

    Flags a last (finite) gradient norm more than GRAD_NORM_JUMP times the
    median of the earlier ones, or RISING_WINDOW strictly rising losses that
    end at least RISING_FACTOR times where they started. Non-finite entries
    are ignored: this explains what happened before things went non-finite.
    """
    remedy = ("Lower the learning rate or lengthen warmup, and clip the global gradient norm "
              "(optax.clip_by_global_norm) after unscaling.")
    norms = [float(g) for g in grad_norm_history if math.isfinite(g)]
    if len(norms) >= MIN_HISTORY:
        median = float(np.median(norms[:-1]))
        if median > 0 and norms[-1] > GRAD_NORM_JUMP * median:
            return ("exploding_update",
                    f"The gradient norm reached {norms[-1]:.4g}, {norms[-1] / median:.0f}x the median "
                    f"{median:.4g} of the previous {len(norms) - 1} steps: the update exploded.",
                    remedy)
    losses = [float(x) for x in loss_history if math.isfinite(x)][-RISING_WINDOW:]
    if len(losses) == RISING_WINDOW and all(b > a for a, b in zip(losses, losses[1:])) \
            and losses[-1] >= RISING_FACTOR * abs(losses[0]):
        return ("exploding_update",
                f"The loss rose for {RISING_WINDOW} steps in a row, from {losses[0]:.4g} to "
                f"{losses[-1]:.4g}: training was diverging.",
                remedy)
    return None


def _series(history: Sequence[dict], prefix: str, suffix: str) -> list[float]:
    """Per recorded row, the max over keys prefix*suffix (finite values only); rows without one are skipped."""
    out = []
    for r in history:
        vals = [float(v) for k, v in r.items() if k.startswith(prefix) and k.endswith(suffix)
                and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if vals:
            out.append(max(vals))
    return out


def logit_growth(history: Sequence[dict]) -> list[tuple[str, str]]:
    """[(kind, explanation)] for attention-logit growth and output log Z drift seen in the rows.

    `history`: metric rows as logged (flat keys like 'attention/block_0/logit_max',
    'output/log_z_absmax'); empty when the run logged no such telemetry.
    """
    out = []
    attn = _series(history, "attention/", "/logit_max")
    if len(attn) >= MIN_HISTORY:
        # noisy step to step: the lowest of the first few against the highest of the last few
        early, late = min(attn[:MIN_HISTORY]), max(attn[-RISING_WINDOW:])
        if late >= ATTN_LOGIT_LARGE and late >= LOGIT_GROWTH_FACTOR * max(abs(early), 1e-6):
            out.append(("attention_logit_growth",
                        f"The largest attention logit grew from {early:.4g} to {late:.4g} over the last "
                        f"{len(attn)} recorded steps: attention-logit growth (the softmax saturates to "
                        f"one-hot, then overflows in a narrow format)."))
    log_z = _series(history, "output/", "log_z_absmax")
    if len(log_z) >= MIN_HISTORY and log_z[-1] - log_z[0] >= LOG_Z_DRIFT:
        out.append(("output_logit_divergence",
                    f"The largest |log Z| of the output logits drifted from {log_z[0]:.4g} to {log_z[-1]:.4g} "
                    f"nats over the last {len(log_z)} recorded steps: output-logit divergence."))
    return out
