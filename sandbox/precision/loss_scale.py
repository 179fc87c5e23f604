"""Loss scaling for fp16 training, and the finite-check helpers around it.

fp16 has 5 exponent bits: its smallest subnormal is 2**-24 (~6e-8) and its
largest value 65504. Typical gradients sit far below 2**-24 and flush to zero.
Multiplying the loss by a scale S shifts every gradient up by log2(S) binades
(the chain rule is linear), so they survive the fp16 backward pass; dividing
the gradients by S afterwards, in fp32, restores their true values. Too large
an S overflows to inf, so S is chosen dynamically (jmp / PyTorch GradScaler):

    state = (scale=init_scale, good_steps=0)
    each step:
        grads = grad(loss * scale) / scale        # unscale in fp32
        if all_finite(grads):
            params, opt_state = optimizer step     # clip AFTER unscaling
            good_steps += 1
            if good_steps == growth_interval:
                scale *= growth_factor; good_steps = 0
        else:                                      # overflow: skip the step
            scale *= backoff_factor; good_steps = 0
        scale = clip(scale, min_scale, max_scale)

Under jit the "if" becomes a select: both the updated and the old state are
computed and `select_tree` keeps one. A skip is never "multiply the update by
0": 0 * inf is NaN, and the NaN would land in the parameters.

The scale and its counter are their own state type, always fp32/int32, so no
"cast every floating leaf" can push them into fp16 (where 2**16 is the last
power of two below overflow). Powers-of-two factors keep scaling and
unscaling exact. `mode='static'` keeps S fixed; `mode='none'` is S = 1.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sandbox.errors import UserError

MODES = ("dynamic", "static", "none")


class LossScaleState(NamedTuple):
    scale: jax.Array  # fp32 [], the current loss scale S
    good_steps: jax.Array  # int32 [], consecutive steps with finite grads


@dataclasses.dataclass(frozen=True)
class LossScaler:
    """Static configuration of loss scaling; the moving parts live in LossScaleState."""

    mode: str = "dynamic"  # 'dynamic' | 'static' | 'none'
    init_scale: float = 2.0**16  # starting S (PyTorch GradScaler default)
    growth_factor: float = 2.0  # S *= this after growth_interval clean steps
    backoff_factor: float = 0.5  # S *= this on a non-finite gradient
    growth_interval: int = 2000  # clean steps needed before S grows
    min_scale: float = 1.0  # floor: S never reaches 0 after many overflows
    max_scale: float = 2.0**24  # ceiling: S never reaches inf after many clean steps

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"loss scale mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.min_scale <= self.init_scale <= self.max_scale:
            raise UserError(
                f"loss scale needs 0 < min_scale <= init_scale <= max_scale, got "
                f"{self.min_scale}, {self.init_scale}, {self.max_scale}"
            )
        if not (self.growth_factor >= 1.0 and 0.0 < self.backoff_factor <= 1.0):
            raise UserError(
                f"loss scale needs growth_factor >= 1 and 0 < backoff_factor <= 1, got "
                f"{self.growth_factor}, {self.backoff_factor}"
            )
        if self.growth_interval < 1:
            raise UserError(f"loss scale growth_interval must be >= 1, got {self.growth_interval}")

    @classmethod
    def from_config(cls, ls_cfg, mode: str) -> "LossScaler":
        """The scaler a validated `config.LossScaleConfig` describes; `mode`: the policy's resolved mode
        (the section's `auto` stands for the policy's default, so the policy resolves it)."""
        fields = {f.name: getattr(ls_cfg, f.name) for f in dataclasses.fields(cls) if f.name != "mode"}
        return cls(mode=mode, **fields)

    def init(self) -> LossScaleState:
        scale = 1.0 if self.mode == "none" else self.init_scale
        return LossScaleState(jnp.asarray(scale, jnp.float32), jnp.asarray(0, jnp.int32))

    def scale_loss(self, loss: jax.Array, state: LossScaleState) -> jax.Array:
        # fp32 first: an fp16 loss times 2**16 would overflow before backward starts.
        return jnp.asarray(loss).astype(jnp.float32) * state.scale

    def unscale(self, grads: Any, state: LossScaleState) -> Any:
        # Cast before dividing: g / 2**16 in fp16 would underflow the very values
        # the scale was there to rescue. Division by a power of two is exact.
        if self.mode == "none":
            return jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.tree.map(lambda g: g.astype(jnp.float32) / state.scale, grads)

    def update(self, state: LossScaleState, grads_finite: jax.Array) -> LossScaleState:
        if self.mode != "dynamic":
            return state
        finite = jnp.asarray(grads_finite, jnp.bool_)
        counted = state.good_steps + 1
        grow = finite & (counted >= self.growth_interval)
        scale = jnp.where(
            finite,
            jnp.where(grow, state.scale * self.growth_factor, state.scale),
            state.scale * self.backoff_factor,
        )
        scale = jnp.clip(scale, self.min_scale, self.max_scale).astype(jnp.float32)
        good_steps = jnp.where(finite & ~grow, counted, 0).astype(jnp.int32)
        return LossScaleState(scale, good_steps)


def all_finite(tree: Any) -> jax.Array:
    """bool []: True iff every element of every leaf is finite (True for an empty tree)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    # One reduction per leaf, then one over leaves: no host sync, fuses under jit.
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def nonfinite_leaf_mask(tree: Any) -> Any:
    """Same structure as `tree`, each leaf a bool []: True where that leaf holds inf/NaN.

    Forensics maps it back to parameter paths (jax.tree_util.tree_flatten_with_path)
    to name which tensors overflowed.
    """
    return jax.tree.map(lambda leaf: ~jnp.all(jnp.isfinite(leaf)), tree)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise select between two pytrees of identical structure and dtypes.

    This is how a step is skipped: `select_tree(finite, new_state, old_state)`.
    lax.select copies bits from the chosen side, so a NaN on the other side
    cannot leak in; it also refuses mismatched dtypes instead of promoting.
    """
    pred = jnp.asarray(pred, jnp.bool_)

    def select(a, b):
        a, b = jnp.asarray(a), jnp.asarray(b)
        return lax.select(jnp.broadcast_to(pred, a.shape), a, b)

    return jax.tree.map(select, on_true, on_false)
