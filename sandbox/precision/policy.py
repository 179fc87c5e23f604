"""The precision policy: every cast in the sandbox is decided here.

A `Policy` is a frozen, hashable value (so it can be a Flax module field and
a static jit argument) that answers four questions:

* storage: in which dtype are parameters (and so optimizer updates) kept?
  fp32 "master weights" for every policy but the bf16-weight ones (`bf16_pure`,
  and its remedies `bf16_sr`, `bf16_kahan`, which say how an update is rounded
  onto the bf16 weights: `update_rounding`, built by `lowp_optim.rounding_stage`);
* compute: in which dtype do matmuls and activations run? Parameters are
  cast to it once per step (`cast_to_compute`), selecting the "params"
  collection by type, never "every floating leaf" (fp8 amax histories and
  loss scales must stay fp32);
* which numerically fragile ops stay wide: the attention scores (QK^T is
  produced in `softmax_dtype` by the dot itself, `preferred_element_type`),
  the attention softmax, the logits (the head dot outputs `output_dtype`, fp8
  head included), log-softmax and the loss are fp32 in every shipped policy
  (the deliberately failing naive-softmax ablation is a model option,
  `GPT.naive_softmax`, not a precision);
* how matmuls run: the `lax.Precision` (fp32 = HIGHEST; GPUs otherwise use
  TF32 silently, so `tf32` is its own policy) and, for the low-precision
  recipes, which dot_general the dense layers (and optionally the head) use:
  `fp8` is delayed per-tensor scaling (`fp8.py`, the `fp8_delayed` recipe);
  `fp8_current`, `fp8_rowwise`, `fp8_block`, `mxfp8`, `mxfp6`, `mxfp4` and
  `nvfp4` are the stateless recipes of `recipes/` (`RecipeDotGeneral`), each
  with bf16 compute around the quantized GEMMs. `keep_bf16` names dense
  layers left unquantized ("first", "last", "block_<i>": the NVFP4 recipe
  keeps a few blocks in bf16), and the head is quantized only on request.

The gradient side (loss scaling) lives in `loss_scale.py`; the policy only
says which scaler it wants. What a step measures (telemetry) is the step's
business (`train.step.StepContext.telemetry`), not the policy's. The fp8
settings are the validated `config.Fp8Config` section itself (one schema). Presets can be written field by field or as a
jmp-style string, e.g. `params=float32,compute=bfloat16,output=float32`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from sandbox.config import Fp8Config
from sandbox.errors import UserError
from sandbox.precision import exact
from sandbox.precision.fp8 import Fp8DotGeneral
from sandbox.precision.recipes import recipe as recipes
from sandbox.precision.recipes.module import RecipeDotGeneral

DTYPES = {
    "float32": jnp.float32, "f32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "f16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
}
FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
_KEY_ALIASES = {"p": "params", "param": "params", "c": "compute", "o": "output", "s": "softmax"}


@dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: jnp.dtype = jnp.float32  # storage of parameters and updates
    compute_dtype: jnp.dtype = jnp.float32  # matmuls and activations
    output_dtype: jnp.dtype = jnp.float32  # logits, log-softmax, loss
    softmax_dtype: jnp.dtype = jnp.float32  # attention scores -> probabilities
    matmul_precision: str = "highest"  # 'highest' (true fp32) or 'default' (TF32 on GPUs)
    loss_scaling: str = "none"  # the scaler this policy wants: none | dynamic | static
    fp8: Fp8Config | None = None  # delayed per-tensor fp8 (the `fp8` preset)
    recipe: recipes.Recipe | None = None  # a stateless low-precision recipe (fp8_current, mxfp8, nvfp4, ...)
    keep_bf16: tuple[str, ...] = ()  # dense layers a recipe leaves unquantized: first | last | block_<i>
    quantize_head: bool = False  # a recipe also quantizes the output head
    # How an update lands on the stored weights: nearest (optax.apply_updates) | stochastic | kahan.
    # The last optimizer stage (lowp_optim.rounding_stage): it matters only for bf16 storage.
    update_rounding: str = "nearest"

    # -- casts -----------------------------------------------------------
    def cast_to_compute(self, params):
        return _cast_floating(params, self.compute_dtype)

    def cast_to_param(self, tree):
        return _cast_floating(tree, self.param_dtype)

    def cast_to_output(self, x):
        return x.astype(self.output_dtype)

    # -- matmuls ---------------------------------------------------------
    @property
    def precision(self) -> lax.Precision:
        return lax.Precision.HIGHEST if self.matmul_precision == "highest" else lax.Precision.DEFAULT

    def dot_general_cls(self, head: bool = False, block: int | None = None, n_layer: int | None = None):
        """The dot_general module class for nn.Dense (`block` of `n_layer`) or the head, or None for lax's."""
        if self.fp8 is not None:
            if head and not self.fp8.head:
                return None
            return functools.partial(Fp8DotGeneral, fwd_dtype=FP8_DTYPES[self.fp8.fwd_dtype],
                                     bwd_dtype=FP8_DTYPES[self.fp8.bwd_dtype],
                                     history_len=self.fp8.history_len, margin=self.fp8.margin)
        if self.recipe is None or (head and not self.quantize_head) or self.keeps(block, n_layer):
            return None
        return functools.partial(RecipeDotGeneral, recipe=self.recipe)

    def wide_dot(self, dot, x: jax.Array, y: jax.Array, out_dtype) -> jax.Array:
        """`dot(x, y, out_dtype)`, a dot whose result is wider than its 16-bit operands (scores, logits).

        Forward: the result leaves the dot in `out_dtype` (fp32 accumulation, one rounding). Backward:
        the cotangent is rounded to the operands' dtype first, so both backward GEMMs take 16-bit
        operands, as under PyTorch autocast (where the fp32 cast's backward rounds the gradient to
        bf16/fp16 before the matmul's) and TransformerEngine. Plain autodiff would hand the fp32
        cotangent to the transposed dots, which promote their 16-bit operand and run as fp32 GEMMs:
        on a GPU, two of a layer's three GEMMs off the tensor cores' 16-bit path. `dot(a, b, dtype)`
        is the forward with a given result dtype; the backward differentiates it with the operands'.
        Operands already as wide as the result (fp32, tf32 policies) are left to plain autodiff.
        """
        if x.dtype != y.dtype or jnp.dtype(x.dtype).itemsize >= jnp.dtype(out_dtype).itemsize:
            return dot(x, y, out_dtype)

        @jax.custom_vjp
        def wide(a, b):
            return dot(a, b, out_dtype)

        def wide_fwd(a, b):
            return dot(a, b, out_dtype), (a, b)

        def wide_bwd(res, g):
            a, b = res
            _, pullback = jax.vjp(lambda a_, b_: dot(a_, b_, a_.dtype), a, b)
            return pullback(g.astype(a.dtype))

        wide.defvjp(wide_fwd, wide_bwd)
        return wide(x, y)

    def dense_output(self, y: jax.Array) -> jax.Array:
        """A dense layer's output `y`, unchanged; on CPU, under fp16 compute or a quantization recipe,
        its cotangent is computed once and stored.

        XLA:CPU would otherwise recompute that cotangent's chain (GELU's derivative in the MLP, and
        under a recipe the quantization of the gradient) inside each of its three readers;
        `exact.stored_cotangent` says why. Measured on the `small` benchmark's step (session 13,
        Intel Xeon): fp16 170 -> 141 ms, nvfp4 1153 -> 1060 ms; fp8_current and mxfp8 unchanged.
        Not for fp32, bf16 or delayed-scaling fp8: no faster there (fp32 within 1%), and fp8
        1.5% slower. Values are the same either way (tests/test_stored_cotangent.py).
        """
        stores = jnp.dtype(self.compute_dtype) == jnp.float16 or self.recipe is not None
        return exact.stored_cotangent(y) if stores else y

    # -- gradient sums over tokens ------------------------------------------
    # A bias, the learned positions and the embedding table each receive a gradient that sums the
    # cotangent over tokens (768 terms for a batch of 12 x 64). Plain autodiff sums in the operand's
    # 16-bit type, add by add (XLA:CPU rounds every partial sum to bf16; bf16's 8-bit significand
    # loses the small terms of a long same-signed sum, and fp16's partial sums of loss-scaled
    # gradients can overflow where the total would not). PyTorch autocast and TransformerEngine sum
    # in fp32 and round once; so do these rules. 16-bit operands only: fp32 keeps plain autodiff.

    def add_broadcast(self, x: jax.Array, b: jax.Array) -> jax.Array:
        """`x + b`, `b` broadcast over x's leading axes; b's gradient summed over them in fp32."""
        if jnp.dtype(b.dtype).itemsize >= 4:
            return x + b
        lead = tuple(range(x.ndim - b.ndim))

        @jax.custom_vjp
        def add(x_, b_):
            return x_ + b_

        def add_fwd(x_, b_):
            return x_ + b_, None

        def add_bwd(_, g):
            return g, jnp.sum(g.astype(jnp.float32), axis=lead).astype(b.dtype)

        add.defvjp(add_fwd, add_bwd)
        return add(x, b)

    def lookup(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        """Rows `table[ids]`; the table's gradient (a scatter-add over tokens) summed in fp32."""
        if jnp.dtype(table.dtype).itemsize >= 4:
            return jnp.take(table, ids, axis=0)

        @jax.custom_vjp
        def take(t, i):
            return jnp.take(t, i, axis=0)

        def take_fwd(t, i):
            return jnp.take(t, i, axis=0), i

        def take_bwd(i, g):
            rows = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
            summed = jnp.zeros(table.shape, jnp.float32).at[i.reshape(-1)].add(rows)
            return summed.astype(table.dtype), None  # ids are integers: no cotangent

        take.defvjp(take_fwd, take_bwd)
        return take(table, ids)

    def keeps(self, block: int | None, n_layer: int | None) -> bool:
        """Whether dense layers of `block` stay in the compute dtype (precision.recipe.keep_bf16)."""
        if block is None:
            return False
        names = {f"block_{block}"} | ({"first"} if block == 0 else set()) | \
            ({"last"} if n_layer is not None and block == n_layer - 1 else set())
        return bool(names & set(self.keep_bf16))

    # -- attention softmax -------------------------------------------------
    def attention_softmax(self, scores, mask, naive: bool = False):
        """Probabilities over the last axis, returned in the compute dtype.

        Stable: exp(log_softmax(x)) in `softmax_dtype` (probabilities only ever
        come from log-space), with the max subtracted *before* the log-sum-exp:
        exp(x - logsumexp(x)) would round logsumexp(x) at the scores' magnitude
        first (5e-4 relative error at scores ~1e4 in fp32). `naive` (the ablation):
        exp(x) / sum(exp(x)) in the compute dtype, which overflows for scores
        past log(dtype max).
        """
        with jax.named_scope("softmax"):
            if naive:
                e = jnp.where(mask, jnp.exp(scores.astype(self.compute_dtype)), 0)
                return (e / jnp.sum(e, axis=-1, keepdims=True)).astype(self.compute_dtype)
            s = jnp.where(mask, scores.astype(self.softmax_dtype), -jnp.inf)
            return jnp.exp(jax.nn.log_softmax(s, axis=-1)).astype(self.compute_dtype)

    def describe(self) -> str:
        n = lambda d: jnp.dtype(d).name  # noqa: E731
        parts = [f"params={n(self.param_dtype)}", f"compute={n(self.compute_dtype)}",
                 f"output={n(self.output_dtype)}", f"softmax={n(self.softmax_dtype)}",
                 f"matmul={self.matmul_precision}", f"loss_scaling={self.loss_scaling}"]
        if self.update_rounding != "nearest":
            parts.append(f"update_rounding={self.update_rounding}")
        if self.fp8:
            parts.append(f"fp8={self.fp8.fwd_dtype}/{self.fp8.bwd_dtype} hist={self.fp8.history_len} "
                         f"margin={self.fp8.margin}")
        if self.recipe:
            parts.append(f"recipe={recipes.describe(self.recipe)}")
            if self.keep_bf16:
                parts.append(f"kept in bf16: {', '.join(self.keep_bf16)}")
            if self.quantize_head:
                parts.append("head quantized")
        return ", ".join(parts)


def _cast_floating(tree, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


PRESETS = {
    "fp32": Policy("fp32"),
    "tf32": Policy("tf32", matmul_precision="default"),
    # Low-precision inputs need no HIGHEST (and on Hopper it would block the fp8 GEMM rewrite).
    "bf16": Policy("bf16", compute_dtype=jnp.bfloat16, matmul_precision="default"),
    "fp16": Policy("fp16", compute_dtype=jnp.float16, loss_scaling="dynamic", matmul_precision="default"),
    "fp8": Policy("fp8", compute_dtype=jnp.bfloat16, fp8=Fp8Config(), matmul_precision="default"),
    "bf16_pure": Policy("bf16_pure", param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                        matmul_precision="default"),
    "fp16_noscale": Policy("fp16_noscale", compute_dtype=jnp.float16, matmul_precision="default"),
    # bf16 weights with no master copy that still learn (docs/precision.md, "bf16 weights that still learn").
    "bf16_sr": Policy("bf16_sr", param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                      matmul_precision="default", update_rounding="stochastic"),
    "bf16_kahan": Policy("bf16_kahan", param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16,
                         matmul_precision="default", update_rounding="kahan"),
}
# The stateless recipes (precision/recipes/recipe.py), each around bf16 compute; the names are
# the recipes' own, relied on by users and scripts.
RECIPE_POLICIES = ("fp8_current", "fp8_rowwise", "fp8_block", "mxfp8", "mxfp6", "mxfp4", "nvfp4")
for _name in RECIPE_POLICIES:
    PRESETS[_name] = Policy(_name, compute_dtype=jnp.bfloat16, matmul_precision="default",
                            recipe=recipes.preset(_name))


def parse_policy_string(text: str) -> Policy:
    """A preset name ('bf16'), or 'params=float32,compute=bfloat16,output=float32' (jmp style; p=/c=/o=/s= too)."""
    if text in PRESETS:
        return PRESETS[text]
    fields = {"params": "float32", "compute": "float32", "output": None, "softmax": "float32"}
    for part in text.split(","):
        if "=" not in part:
            raise UserError(f"precision.policy: {text!r} is neither a preset ({', '.join(PRESETS)}) "
                            f"nor 'params=..,compute=..,output=..'")
        key, value = (s.strip() for s in part.split("=", 1))
        key = _KEY_ALIASES.get(key, key)
        if key not in fields:
            raise UserError(f"precision.policy: unknown field {key!r} in {text!r} "
                            f"(expected params, compute, output, softmax)")
        if value not in DTYPES:
            raise UserError(f"precision.policy: unknown dtype {value!r} for {key} "
                            f"(expected float32, bfloat16 or float16)")
        fields[key] = value
    output = fields["output"] or fields["compute"]
    compute = DTYPES[fields["compute"]]
    return Policy(text, param_dtype=DTYPES[fields["params"]], compute_dtype=compute,
                  output_dtype=DTYPES[output], softmax_dtype=DTYPES[fields["softmax"]],
                  loss_scaling="dynamic" if compute == jnp.float16 else "none",
                  matmul_precision="highest" if compute == jnp.float32 else "default")


def make_policy(precision_cfg) -> Policy:
    """The Policy a `precision:` config section describes (its fp8 and recipe sections applied), or the
    policy a string names (a preset or a jmp-style string), as `make_policy('fp16')` in user code."""
    if isinstance(precision_cfg, str):
        return parse_policy_string(precision_cfg)
    policy = parse_policy_string(precision_cfg.policy)
    ls_mode = precision_cfg.loss_scale.mode
    changes = dict(loss_scaling=policy.loss_scaling if ls_mode == "auto" else ls_mode)
    if policy.fp8 is not None:
        changes["fp8"] = precision_cfg.fp8
    if policy.recipe is not None:
        r = precision_cfg.recipe
        changes.update(recipe=recipes.customized(policy.recipe, r.wgrad_hadamard, r.stochastic_rounding,
                                                 r.weight_blocks),
                       keep_bf16=tuple(r.keep_bf16), quantize_head=r.head)
    return dataclasses.replace(policy, **changes)
