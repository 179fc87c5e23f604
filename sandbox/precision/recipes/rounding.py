"""Rounding a scaled value into an element format: nearest-even or stochastic.

Both saturate: a value beyond the format's max becomes +-max (E4M3 has no
infinity and would turn it into NaN; the fp6/fp4 formats have neither).

Nearest is the hardware cast (XLA's convert, round to nearest even), after
the clip. For formats XLA cannot convert to (fp6, see formats.py) the same
rounding is done in the value domain: ulp of the binade, `round` half to
even of |y| / ulp, times ulp; exact in fp32, then stored in `fmt.storage`. Stochastic rounding picks one of the two representable neighbours
`lo <= |y| < hi = lo + ulp` with P(hi) = (|y| - lo) / ulp, so E[result] = y:
small gradient contributions survive on average instead of being rounded
away every time. The ulp is that of y's binade in the element format
(2**(max(e, emin) - mantissa_bits)), so subnormals are covered; every step is
a power-of-two multiply or a floor, hence exact in fp32, and the final cast
is exact because the result is representable. A draw is a pure function of
the key: same key, same bits.
"""

import jax
import jax.numpy as jnp

from sandbox.precision.recipes.formats import Format


def _ulp(magnitude, fmt: Format):
    """Spacing of `fmt` in the binade of each magnitude (subnormal spacing below emin)."""
    _, exponent = jnp.frexp(magnitude)  # magnitude = m * 2**exponent, m in [0.5, 1)
    binade = jnp.maximum(exponent - 1, fmt.emin)
    return jnp.ldexp(jnp.float32(1.0), binade - fmt.mantissa_bits)


def round_nearest(y, fmt: Format):
    """clip to +-max, then round to nearest even in `fmt`; held in `fmt.storage`."""
    clipped = jnp.clip(y, -fmt.max, fmt.max)
    if fmt.storage == fmt.dtype:
        return clipped.astype(fmt.dtype)
    magnitude = jnp.abs(clipped).astype(jnp.float32)
    ulp = _ulp(magnitude, fmt)
    rounded = jnp.minimum(jnp.round(magnitude / ulp) * ulp, fmt.max)
    return (jnp.sign(clipped) * rounded).astype(fmt.storage)


def round_stochastic(y, fmt: Format, key):
    """Unbiased stochastic rounding of fp32 `y` into `fmt`, saturating."""
    y = y.astype(jnp.float32)
    magnitude = jnp.minimum(jnp.abs(y), fmt.max)
    ulp = _ulp(magnitude, fmt)
    lower = jnp.floor(magnitude / ulp) * ulp
    round_up = jax.random.uniform(key, y.shape, jnp.float32) < (magnitude - lower) / ulp
    rounded = jnp.minimum(jnp.where(round_up, lower + ulp, lower), fmt.max)
    return (jnp.sign(y) * rounded).astype(fmt.storage)


def round_to(y, fmt: Format, rounding: str, key=None):
    if rounding == "stochastic":
        if key is None:
            raise ValueError("stochastic rounding needs a key (see recipes.rounding_key)")
        return round_stochastic(y, fmt, key)
    return round_nearest(y, fmt)
