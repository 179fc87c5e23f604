"""Blocked views: which elements share a scale, with static shapes.

Every granularity is turned into one view `xb` whose last axis holds the
members of a scale group, so the amax of each group is `max(|xb|, axis=-1)`
and the scales have shape `xb.shape[:-1]`:

    tensor  (1, size)                       one group
    row     (..., K)                        K = the contracting axis, moved last
    tile    (..., ceil(K/N), N)             1xN runs along the contracting axis
    block   (ceil(R/N), ceil(K/N), N*N)     NxN squares of the (R, K) matrix,
                                            R = product of the other axes

Padding rule: the contracting axis (and for blocks also R) is zero-padded up
to a multiple of N; zeros never raise an amax, so a partial edge group gets
the scale of its real elements. `unblock` slices the padding off again. A
block's members are the same set of elements whichever axis is contracted
(block (i, j) of W is block (j, i) of W^T), which is what makes 2-D weight
blocks identical in the forward and the dgrad GEMM.
"""

import math

import jax.numpy as jnp


def pad_to(x, axis, multiple):
    extra = (-x.shape[axis]) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def blocked(x, granularity: str, block_size: int, axis: int):
    """(xb, unblock): the grouped view of x and the function that undoes it."""
    shape = x.shape
    if granularity == "tensor":
        return x.reshape(1, -1), lambda y: y.reshape(shape)
    axis = axis % x.ndim
    moved = jnp.moveaxis(x, axis, -1)
    moved_shape = moved.shape
    k = moved_shape[-1]
    if granularity == "row":
        return moved, lambda y: jnp.moveaxis(y, -1, axis)
    n = block_size
    if granularity == "tile":
        padded = pad_to(moved, -1, n)
        kp = padded.shape[-1]
        xb = padded.reshape(*moved_shape[:-1], kp // n, n)

        def unblock_tile(y):
            return jnp.moveaxis(y.reshape(*moved_shape[:-1], kp)[..., :k], -1, axis)

        return xb, unblock_tile
    rows = math.prod(moved_shape[:-1])
    matrix = pad_to(pad_to(moved.reshape(rows, k), 0, n), 1, n)
    rp, kp = matrix.shape
    xb = matrix.reshape(rp // n, n, kp // n, n).transpose(0, 2, 1, 3).reshape(rp // n, kp // n, n * n)

    def unblock_square(y):
        square = y.reshape(rp // n, kp // n, n, n).transpose(0, 2, 1, 3).reshape(rp, kp)
        return jnp.moveaxis(square[:rows, :k].reshape(moved_shape), -1, axis)

    return xb, unblock_square
