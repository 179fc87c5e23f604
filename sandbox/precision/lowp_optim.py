"""Training with bf16 weights that still learns: the optimizer-side pieces.

The problem. bf16 keeps 8 significant bits (7 stored + 1 implicit), so the
spacing of representable numbers near a weight w is ulp(w) ~ |w| * 2**-7 and
round-to-nearest-even maps w + u back to w whenever |u| < ulp(w)/2, i.e. an
update smaller than ~0.2-0.4% of the weight is lost whole. Adam's steps are
~lr per element, so at lr 2e-4 on weights of order 0.1-1 most updates vanish
(`bf16_pure`: 74% of them). Rounding is not noise here: it is a systematic
zero, step after step, and training stalls.

Three cures, and what each costs per parameter (Adam, fp32 moments = 8 B):

* fp32 master weights (the usual mixed precision, our `bf16` policy): keep the
  weights in fp32 (4 B), cast to bf16 for compute. Exact, +2 B over bf16.
* Kahan-compensated updates (`kahan_compensation`, as in optimi): bf16 weights
  plus a bf16 buffer c that carries what the last rounding lost:
      y = u + c;  w' = bf16(w + y);  c' = bf16(y - (w' - w))
  (in fp32 registers; w' - w is exact in fp32). 2 + 2 B: a deterministic,
  ~16-bit-accurate weight stored in two bf16 halves. The buffer's own bf16
  rounding loses up to 2**-9 of c per step: 4000 updates of 2e-4 onto 1.0
  end 0.003 below the exact 1.8 (plain bf16: stuck at 1.0); an fp32 buffer
  (`buffer_dtype`, 4 B) makes it exact.
* Stochastic rounding (`stochastic_rounding`, torchao's
  `bf16_stochastic_round`, "Revisiting BFloat16 Training"): round w + u up or
  down with probabilities that make the result exact in expectation. 2 B, no
  buffer; the price is noise of up to one ulp per step, which averages out
  over steps and over the many weights a gradient touches.

The other half of the state is Adam's moments (8 B in fp32), which a low
precision weight alone does not touch. `scale_by_adam_lowp` stores them in
bf16 (4 B) or fp8 (2 B + one fp32 scale per tensor, MS-AMP's O2 idea), each
step dequantize -> fp32 update -> requantize (round to nearest). Two traps,
both measured in the tests: fp8's range (v ~ g**2 spans twice g's binades; an
E4M3 v underflows 13% of its entries for gradients spread over 1e-3..1 and the
steps blow up ~80x, hence E5M2 for v and the `nu_underflow_frac` meter), and
bf16's resolution for v: its per-step change (1 - b2)(g**2 - v) rounds away
once 1 - b2 is below half an ulp (~2**-9..2**-8), so with b2 = 0.999 a bf16 v
cannot decay after the gradients shrink (the sandbox's default b2 = 0.99 is
clear of it). So, per parameter: fp32 master
+ fp32 moments 12 B; bf16 + SR + bf16 moments 6 B; bf16 + Kahan + bf16 moments
8 B; bf16 + Kahan + fp8 moments ~6 B. `state_bytes` measures this on a real
state.

Stochastic rounding, the bit trick. An fp32 number's upper 16 bits are a bf16
number (same sign and exponent layout); the lower 16 bits L are the fraction
of an ulp beyond it, toward larger magnitude. Adding a uniform 16-bit r to the
bit pattern and truncating the low 16 bits carries into the bf16 part iff
r >= 2**16 - L, i.e. with probability L / 2**16: the magnitude rounds away from
zero with exactly the fractional distance. Sign-magnitude makes it symmetric
for negatives; a carry out of the mantissa increments the exponent, which is
the correct next number (up to inf past bf16's max). NaN is kept as NaN.

Randomness: deterministic and mesh-independent. The bits for leaf i at step s
come from `sr_key(seed, s, i)` = fold_in(fold_in(fold_in(key(seed), STREAM),
s), i), with STREAM a constant that keeps them apart from the step's dropout
key fold_in(key(seed), s). `jax.random.bits(key, leaf.shape)` is a pure
function of (key, shape): jit's semantics do not depend on sharding, so the
values are the same on any mesh; with `jax_threefry_partitionable` (the
default) XLA computes each shard's bits locally from the element's global
index, so a sharded leaf needs no all-gather to round. tests/test_lowp_optim.py
checks bit equality across 1x4, 4x1 and 2x2 meshes on 4 CPU devices. `s` is the
transform's own update count, which the train step's skip-select holds still
on a skipped step, so a resumed run draws the same bits as an uninterrupted one.

How the pieces compose. `stochastic_rounding` and `kahan_compensation` are
optax GradientTransformations meant to be the LAST stage of a chain, e.g.

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     adamw_lowp(lr, moments="bf16"),
                     stochastic_rounding(seed))        # or kahan_compensation()
    updates, opt_state = tx.update(grads, opt_state, params)   # params: bf16
    params = optax.apply_updates(params, updates)

They need `params` and return fp32 updates equal to w' - w, so the plain
`optax.apply_updates` (which adds in fp32, then casts to the params' dtype)
lands exactly on the rounded w'. (Exact whenever w' - w fits fp32, i.e. unless
an update cancels a weight to below 2**-16 of its size; the error is then
< 2**-24 |w|.) Leaves that are not bf16 pass through SR unchanged.

Telemetry needs the update before this last stage: `lost_update_frac` (the
train step's definition) and `recovered_update_frac` compare old weights, the
raw update u and new weights; a caller that wants them runs the final stage
as its own `tx.update` after the rest of the chain. The fp8 second moment's
underflow is kept in the optimizer state (`nu_underflow_frac`), found with
`optax.tree.get(opt_state, "nu_underflow_frac")`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sandbox.errors import UserError, shown
from sandbox.precision.fp8 import compute_scale, dequantize, fp8_max, quantize

SR_STREAM = 0x53520000  # "SR": fold-in constant separating SR bits from the dropout keys
# numpy scalars, not jnp: a jnp constant at import would start JAX's backend (docs/api.md)
_LOW16 = np.uint32(0xFFFF)
_HIGH16 = np.uint32(0xFFFF0000)


# -- stochastic rounding -----------------------------------------------------

def sr_key(seed: int, step, leaf_index: int) -> jax.Array:
    """The key whose bits round leaf `leaf_index` (params flatten order) at update `step`."""
    stream = jax.random.fold_in(jax.random.key(seed), SR_STREAM)
    return jax.random.fold_in(jax.random.fold_in(stream, step), leaf_index)


def round_bf16_with_noise(x, noise):
    """bf16(x) rounded away from zero iff (noise & 0xFFFF) + low16(x) carries (see the module doc).

    x: fp32 (cast if not); noise: uint32 of x's shape, uniform for stochastic rounding.
    """
    x32 = jnp.asarray(x, jnp.float32)
    bits = lax.bitcast_convert_type(x32, jnp.uint32)
    rounded = lax.bitcast_convert_type((bits + (noise & _LOW16)) & _HIGH16, jnp.float32)
    # Exact: the low 16 bits are zero. NaN's payload could sit in the dropped bits.
    return jnp.where(jnp.isnan(x32), x32, rounded).astype(jnp.bfloat16)


def stochastic_round_bf16(x, key):
    """Unbiased rounding of fp32 `x` to bf16: E[result] = x (for |x| below bf16's max)."""
    return round_bf16_with_noise(x, jax.random.bits(key, jnp.shape(x), jnp.uint32))


def _sum32(p, u):
    return p.astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)


def sr_apply_updates(params, updates, seed: int, step):
    """`optax.apply_updates` with stochastic rounding: bf16 leaves become SR_bf16(fp32(w) + u).

    Other leaves are added as optax does. The functional core of `stochastic_rounding`.
    """
    leaves, treedef = jax.tree.flatten(params)
    ups = treedef.flatten_up_to(updates)
    new = [stochastic_round_bf16(_sum32(p, u), sr_key(seed, step, i)) if p.dtype == jnp.bfloat16
           else (p + u).astype(p.dtype) for i, (p, u) in enumerate(zip(leaves, ups))]
    return treedef.unflatten(new)


def _delta(new_params, params):
    """fp32 updates that `optax.apply_updates(params, .)` turns into exactly `new_params`."""
    return jax.tree.map(lambda n, p: n.astype(jnp.float32) - p.astype(jnp.float32), new_params, params)


class StochasticRoundingState(NamedTuple):
    count: jax.Array  # int32 []: updates made so far, the `step` of sr_key


def _need_params(name, params):
    if params is None:
        raise ValueError(f"{name} rounds against the parameters: call update(updates, state, params)")


def stochastic_rounding(seed: int) -> optax.GradientTransformation:
    """Last chain stage: updates that make apply_updates round bf16 params stochastically."""

    def init_fn(params):
        del params
        return StochasticRoundingState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        _need_params("stochastic_rounding", params)
        new_params = sr_apply_updates(params, updates, seed, state.count)
        return _delta(new_params, params), StochasticRoundingState(optax.safe_int32_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


# -- Kahan-compensated updates -------------------------------------------------

def kahan_apply_updates(params, updates, compensation):
    """(new params, new compensation): y = u + c; w' = round(w + y); c' = y - (w' - w).

    All arithmetic in fp32; w' takes the params' dtype, c' the buffer's.
    """
    def leaf(p, u, c):
        y = jnp.asarray(u).astype(jnp.float32) + c.astype(jnp.float32)
        p32 = p.astype(jnp.float32)
        new = (p32 + y).astype(p.dtype)
        return new, (y - (new.astype(jnp.float32) - p32)).astype(c.dtype)

    leaves, treedef = jax.tree.flatten(params)
    pairs = [leaf(p, u, c) for p, u, c in zip(leaves, treedef.flatten_up_to(updates),
                                               treedef.flatten_up_to(compensation))]
    return treedef.unflatten([n for n, _ in pairs]), treedef.unflatten([c for _, c in pairs])


class KahanState(NamedTuple):
    compensation: Any  # tree like params, in the buffer dtype: what rounding lost, added to the next update


def kahan_compensation(buffer_dtype=jnp.bfloat16) -> optax.GradientTransformation:
    """Last chain stage: Kahan-compensated updates with a `buffer_dtype` compensation buffer."""

    def init_fn(params):
        return KahanState(jax.tree.map(lambda p: jnp.zeros(p.shape, buffer_dtype), params))

    def update_fn(updates, state, params=None):
        _need_params("kahan_compensation", params)
        new_params, compensation = kahan_apply_updates(params, updates, state.compensation)
        return _delta(new_params, params), KahanState(compensation)

    return optax.GradientTransformation(init_fn, update_fn)


# -- Adam with low-precision moments -------------------------------------------

STORAGE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16,
                  "e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
FP8_STORAGE = ("e4m3", "e5m2")
# moments= presets: (first moment, second moment). fp8 follows MS-AMP: E4M3 for m (signed, wants
# mantissa); E5M2 for v, because v ~ g**2 spans twice the binades of g and E4M3's 17 binades
# (2**-9..448) underflow the small entries of a tensor whose gradients span more than ~500x.
MOMENT_PRESETS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "fp8": ("e4m3", "e5m2")}


class QuantizedMoment(NamedTuple):
    values: jax.Array  # fp8: the moment times `scale`, rounded to nearest
    scale: jax.Array  # fp32 []: per-tensor, fp8_max / amax of the fp32 moment at requantization


class ScaleByLowpAdamState(NamedTuple):
    count: jax.Array  # int32 []
    mu: Any  # tree like params: arrays (fp32/bf16 storage) or QuantizedMoment (fp8)
    nu: Any
    nu_underflow_frac: jax.Array  # fp32 []: of the last update, nonzero fp32 nu stored as 0


def _check_storage(storage: str) -> str:
    if storage not in STORAGE_DTYPES:
        raise UserError(f"moment storage {shown(storage)} is not one of {', '.join(STORAGE_DTYPES)}")
    return storage


def store_moment(x32, storage: str, prev_scale=None):
    """The fp32 moment `x32` in its storage format (fp8: just-in-time per-tensor scale)."""
    dtype = STORAGE_DTYPES[storage]
    if storage not in FP8_STORAGE:
        return x32.astype(dtype)
    prev = jnp.float32(1.0) if prev_scale is None else prev_scale
    scale = compute_scale(jnp.max(jnp.abs(x32)), prev, fp8_max(dtype))
    return QuantizedMoment(quantize(x32, dtype, scale, jnp.float32), scale)


def load_moment(stored):
    """A stored moment back in fp32."""
    if isinstance(stored, QuantizedMoment):
        return dequantize(stored.values, stored.scale, jnp.float32)
    return stored.astype(jnp.float32)


def _stored_values(stored):
    return stored.values if isinstance(stored, QuantizedMoment) else stored


def underflow_frac(exact_tree, stored_tree):
    """Fraction of the nonzero elements of `exact_tree` (fp32) that are 0 in `stored_tree`."""
    is_q = lambda x: isinstance(x, QuantizedMoment)  # noqa: E731
    exact = jax.tree.leaves(exact_tree)
    stored = [_stored_values(s) for s in jax.tree.leaves(stored_tree, is_leaf=is_q)]
    lost = sum(jnp.sum((e != 0) & (s == 0)) for e, s in zip(exact, stored))
    nonzero = sum(jnp.sum(e != 0) for e in exact)
    return (lost / jnp.maximum(nonzero, 1)).astype(jnp.float32)


def scale_by_adam_lowp(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                       mu_storage: str = "fp32", nu_storage: str = "fp32") -> optax.GradientTransformation:
    """optax.scale_by_adam with moments stored in fp32, bf16, e4m3 or e5m2.

    Each step: dequantize to fp32, update the moments and compute the step in fp32 from the
    unquantized values (as optax does with mu_dtype), requantize for storage.
    """
    mu_storage, nu_storage = _check_storage(mu_storage), _check_storage(nu_storage)
    is_q = lambda x: isinstance(x, QuantizedMoment)  # noqa: E731

    def init_fn(params):
        zeros = lambda storage: jax.tree.map(  # noqa: E731
            lambda p: store_moment(jnp.zeros(p.shape, jnp.float32), storage), params)
        return ScaleByLowpAdamState(jnp.zeros([], jnp.int32), zeros(mu_storage), zeros(nu_storage),
                                    jnp.float32(0.0))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        grads, treedef = jax.tree.flatten(updates)
        old_mu = treedef.flatten_up_to(state.mu)
        old_nu = treedef.flatten_up_to(state.nu)
        steps, mus, nus, new_nu32 = [], [], [], []
        for g, m_old, v_old in zip(grads, old_mu, old_nu):
            g32 = g.astype(jnp.float32)
            m = b1 * load_moment(m_old) + (1 - b1) * g32
            v = b2 * load_moment(v_old) + (1 - b2) * g32 * g32
            m_hat = m / (1 - b1 ** count.astype(jnp.float32))
            v_hat = v / (1 - b2 ** count.astype(jnp.float32))
            steps.append(m_hat / (jnp.sqrt(v_hat + eps_root) + eps))  # fp32: the rounding stage wants it
            mus.append(store_moment(m, mu_storage, m_old.scale if is_q(m_old) else None))
            nus.append(store_moment(v, nu_storage, v_old.scale if is_q(v_old) else None))
            new_nu32.append(v)
        new_state = ScaleByLowpAdamState(count, treedef.unflatten(mus), treedef.unflatten(nus),
                                         underflow_frac(new_nu32, nus))
        return treedef.unflatten(steps), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_lowp(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 1e-4, mask=None, moments: str = "fp32",
               mu_storage: str | None = None, nu_storage: str | None = None) -> optax.GradientTransformation:
    """optax.adamw's chain with `scale_by_adam_lowp`: `moments` is a MOMENT_PRESETS name,
    overridden per moment by `mu_storage` / `nu_storage` (e.g. MS-AMP's m=e4m3 with v=bf16)."""
    if moments not in MOMENT_PRESETS:
        raise UserError(f"moments {shown(moments)} is not one of {', '.join(MOMENT_PRESETS)}")
    mu_default, nu_default = MOMENT_PRESETS[moments]
    return optax.chain(
        scale_by_adam_lowp(b1, b2, eps, mu_storage=mu_storage or mu_default,
                           nu_storage=nu_storage or nu_default),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


# -- wiring: what a policy and `precision.moments` select -------------------------------

ROUNDINGS = ("nearest", "stochastic", "kahan")


def rounding_stage(rounding: str, seed: int) -> optax.GradientTransformation | None:
    """The last optimizer stage a policy's `update_rounding` names; None for plain rounding to
    nearest (`optax.apply_updates`, every policy with fp32 storage, and `bf16_pure`)."""
    if rounding not in ROUNDINGS:
        raise UserError(f"update rounding {shown(rounding)} is not one of {', '.join(ROUNDINGS)}")
    if rounding == "stochastic":
        return stochastic_rounding(seed)
    return kahan_compensation() if rounding == "kahan" else None


def with_rounding(tx: optax.GradientTransformation, rounding) -> optax.GradientTransformation:
    """The optimizer whose state a train state holds: optax.chain(tx, rounding), its state the pair
    (tx's state, the stage's state); `tx` itself without a stage. The train step runs the two
    halves apart (train/step.py `optimizer_update`) so telemetry sees the update before rounding."""
    return tx if rounding is None else optax.chain(tx, rounding)


def resolve_moments(moments: str, param_dtype, rounding: str) -> str:
    """The MOMENT_PRESETS name `precision.moments` selects, or "auto" for optax's own adamw.

    "auto" keeps the policies that round to nearest on optax.adamw (moments in the parameters'
    dtype, computed in it: the golden curves, and bf16_pure's all-bf16 optimizer, stay as they
    were). With a rounding stage, "auto" means moments stored like the parameters (bf16) but
    updated in fp32 (`scale_by_adam_lowp`): the remedies fix the weights, not Adam's arithmetic.
    """
    if moments != "auto" or rounding == "nearest":
        return moments
    return "bf16" if jnp.dtype(param_dtype) == jnp.bfloat16 else "fp32"


# -- telemetry -------------------------------------------------------------------

def lost_update_frac(old_params, updates, new_params):
    """Of the elements with a nonzero update, the fraction whose weight did not change.

    The train step's `lost_update_frac` (sandbox/train/step.py), as a function; `updates`
    is the update before any rounding stage.
    """
    changed = jax.tree.map(lambda u: u != 0, updates)
    lost = jax.tree.map(lambda n, o, c: jnp.sum((n == o) & c), new_params, old_params, changed)
    n_changed = sum(jnp.sum(c) for c in jax.tree.leaves(changed))
    return sum(jax.tree.leaves(lost)) / jnp.maximum(n_changed, 1)


def nu_underflow_of(opt_state):
    """`nu_underflow_frac` of the `scale_by_adam_lowp` state inside an optimizer state, else None."""
    is_adam = lambda x: isinstance(x, ScaleByLowpAdamState)  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return found[0].nu_underflow_frac if found else None


def recovered_update_frac(old_params, updates, new_params):
    """Of the elements with a nonzero update, the fraction whose weight changed although plain
    rounding (`optax.apply_updates`, what bf16_pure does) would have left it unchanged.

    With Kahan: updates recovered by the compensation buffer; with SR: carried by the dice.
    """
    plain = optax.apply_updates(old_params, updates)
    changed = jax.tree.map(lambda u: u != 0, updates)
    rescued = jax.tree.map(lambda n, o, p, c: jnp.sum((n != o) & (p == o) & c),
                           new_params, old_params, plain, changed)
    n_changed = sum(jnp.sum(c) for c in jax.tree.leaves(changed))
    return sum(jax.tree.leaves(rescued)) / jnp.maximum(n_changed, 1)


# -- memory accounting -------------------------------------------------------------

CATEGORIES = ("params", "master", "compensation", "moments", "fp8_meta", "other")
# Field names (NamedTuple attributes, never dict keys, which are parameter names) that mark a leaf's kind.
_FIELD_CATEGORY = {"master": "master", "master_params": "master", "compensation": "compensation",
                   "mu": "moments", "nu": "moments"}


def _nbytes(leaf) -> int:
    return int(np.prod(jnp.shape(leaf), dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


def _field(state, name):
    return state[name] if isinstance(state, dict) else getattr(state, name)


def _category(path, params_are_master: bool) -> str:
    top = path[0]
    top = getattr(top, "name", getattr(top, "key", None))
    if top == "params":
        return "master" if params_are_master else "params"
    if top == "fp8_meta":
        return "fp8_meta"
    fields = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
    kinds = [_FIELD_CATEGORY[f] for f in fields if f in _FIELD_CATEGORY]
    if not kinds:
        return "other"
    if kinds[-1] == "moments" and fields[-1] == "scale":  # QuantizedMoment.scale
        return "fp8_meta"
    return kinds[-1]


def state_byte_counts(state, compute_dtype=None) -> dict[str, int]:
    """Bytes of a train-state-like pytree (a TrainState, or any NamedTuple/dict with `params`)
    by category, from its leaves' shapes and dtypes (arrays or jax.ShapeDtypeStruct).

    Categories: params; master (a field named `master`, or the params themselves when
    `compute_dtype` is given and they are stored wider: the compute copy is cast per step,
    never kept); compensation (Kahan buffers); moments (Adam's mu/nu values); fp8_meta (the
    model's fp8 amax histories and scales, and fp8 moments' scales); other (counters, loss
    scale, guard state).
    """
    params_are_master = compute_dtype is not None and any(
        jnp.dtype(p.dtype).itemsize > jnp.dtype(compute_dtype).itemsize
        for p in jax.tree.leaves(_field(state, "params")))
    counts = dict.fromkeys(CATEGORIES, 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        counts[_category(path, params_are_master)] += _nbytes(leaf)
    return counts


def state_bytes(state, compute_dtype=None) -> dict[str, float]:
    """Bytes per parameter by category (see `state_byte_counts`), plus `total`."""
    n_params = sum(int(np.prod(jnp.shape(p), dtype=np.int64)) for p in jax.tree.leaves(_field(state, "params")))
    counts = state_byte_counts(state, compute_dtype)
    per_param = {k: v / max(n_params, 1) for k, v in counts.items()}
    per_param["total"] = sum(counts.values()) / max(n_params, 1)
    return per_param
