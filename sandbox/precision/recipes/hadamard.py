"""Random Hadamard transform (RHT) of the weight-gradient GEMM inputs.

wgrad is dW = X^T G, a sum over tokens. For any orthogonal Q acting on the
token axis, (Q X)^T (Q G) = X^T Q^T Q G = X^T G: transforming both operands
leaves the exact product unchanged but spreads each outlier over
`size` tokens, so one huge gradient no longer sets the scale of a 4-bit
block and flushes its neighbours (the NVFP4 training recipe; QuaRot and
"Training LLMs with MXFP4" use the same trick).

Q is block-diagonal with blocks H_n diag(s) / sqrt(n): H_n the Sylvester
Hadamard matrix of order n (a power of two), s a +-1 sign vector drawn once
from a fixed seed (numpy PCG64, platform independent), so Q is a constant of
the recipe. The token axis is zero-padded to a multiple of n and is NOT
sliced back: after the transform the padding rows carry signal, and the
contraction must run over them (the zeros of the other operand are
transformed too, so the product stays exact).
"""

import jax.numpy as jnp
import numpy as np

from sandbox.precision.recipes.layout import pad_to


def hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (entries +-1)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """Orthogonal H_n diag(s) / sqrt(n) with signs s from `seed` (float64)."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return hadamard_matrix(n) * signs[None, :] / np.sqrt(n)


def rht(x, axis: int, size: int, seed: int):
    """Apply the block-diagonal random Hadamard transform along `axis` (padded, not sliced)."""
    q = jnp.asarray(random_hadamard(size, seed), jnp.float32)
    moved = pad_to(jnp.moveaxis(x.astype(jnp.float32), axis, -1), -1, size)
    blocks = moved.reshape(*moved.shape[:-1], -1, size)
    mixed = jnp.einsum("...bj,ij->...bi", blocks, q, precision="highest")
    return jnp.moveaxis(mixed.reshape(moved.shape), -1, axis)
