"""A small GPT-style decoder in Flax linen.

token embedding (+ learned positions or rotary) -> n_layer pre-norm blocks
(causal multi-head attention, MLP) -> final LayerNorm -> tied output head.

The model knows nothing of loss scaling or logging: dtypes, matmul precision,
the dot_general (fp8 or not) and the attention softmax all come from the
`Policy`. The one non-precision numerics switch is `naive_softmax`, a
teaching ablation (exp/sum in the compute dtype, no max subtraction, scores
kept narrow) that fails on purpose. It receives parameters already cast to the compute dtype by the
trainer. Shapes use suffixes: B batch, T time, D model width, H heads,
K head width, F MLP width, V vocabulary.

Logit-growth options (Wortsman et al. 2023, Gemma 2), all off by default so
the default forward is unchanged: `qk_norm` normalises q and k per head over
K (LayerNorm or RMSNorm, statistics in fp32) before rotary and the 1/sqrt(K)
scale, so a score is bounded by sqrt(K) times the norms' learned scales and
cannot grow with the weights; `attn_softcap` / `logit_softcap` map scores /
output logits through cap*tanh(x/cap) in fp32. With the `attn` collection
mutable (the step's telemetry steps) each block sows its attention
statistics: the largest raw (pre-cap) score over causal positions and the
entropy of each head's attention rows, from log-probabilities.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sandbox.config import ModelConfig
from sandbox.precision.policy import Policy

STATS = "stats"  # collection of per-block activation statistics (forensics)
ATTN = "attn"  # collection of per-block attention statistics (logit-growth telemetry)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap) in fp32, back in x's dtype: |result| < cap, ~x for |x| << cap (0 = off)."""
    if not cap:
        return x
    x32 = x.astype(jnp.float32)
    return (cap * jnp.tanh(x32 / cap)).astype(x.dtype)


def attention_stats(scores_BHTT: jax.Array, causal_TT: jax.Array) -> dict:
    """Largest causal score, and the mean and min over heads of each head's mean row entropy (nats).

    fp32; probabilities only from log_softmax (max subtracted), masked entries contribute 0.
    """
    s = jnp.where(causal_TT, scores_BHTT.astype(jnp.float32), -jnp.inf)
    logp = jax.nn.log_softmax(s, axis=-1)
    ent_BHT = -jnp.sum(jnp.where(causal_TT, jnp.exp(logp) * logp, 0.0), axis=-1)
    ent_H = jnp.mean(ent_BHT, axis=(0, 2))
    return {"logit_max": jnp.max(s), "entropy_mean": jnp.mean(ent_H), "entropy_min": jnp.min(ent_H)}


def rotary(x_BTHK: jax.Array) -> jax.Array:
    """Rotary position embedding, computed in fp32 then cast back."""
    _, t, _, k = x_BTHK.shape
    half = k // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_TK = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle_TK)[None, :, None, :], jnp.sin(angle_TK)[None, :, None, :]
    x = x_BTHK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(x_BTHK.dtype)


class Dense(nn.Dense):
    """nn.Dense (same parameters, same forward) whose bias gradient is summed over tokens in fp32.

    `bias_add` is the policy's `add_broadcast`; nn.Dense's own `y += bias` would sum the bias
    gradient in the compute dtype, add by add (Policy.add_broadcast says why that is wrong).
    `output` is the policy's `dense_output` (an identity on values; a compile hint for the backward).
    Always with a bias, and the dot from `dot_general_cls` or lax.dot_general (the model's uses).
    """

    bias_add: Callable[[jax.Array, jax.Array], jax.Array] = jnp.add
    output: Callable[[jax.Array], jax.Array] = lambda y: y  # the policy's dense_output

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        dot_general = self.dot_general_cls() if self.dot_general_cls is not None else lax.dot_general
        y = dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return self.output(self.bias_add(y, bias))


class Block(nn.Module):
    cfg: ModelConfig
    policy: Policy
    naive_softmax: bool = False
    index: int = 0  # which block, for layers a policy keeps in bf16 (precision.recipe.keep_bf16)

    def dense(self, features: int, name: str) -> Dense:
        p = self.policy
        dot_cls = p.dot_general_cls(block=self.index, n_layer=self.cfg.n_layer)
        return Dense(features, name=name, dtype=p.compute_dtype, param_dtype=p.param_dtype,
                     precision=p.precision, dot_general_cls=dot_cls,
                     kernel_init=nn.initializers.normal(self.cfg.init_std), bias_add=p.add_broadcast,
                     output=p.dense_output)

    def norm(self, name: str) -> nn.LayerNorm:
        # Flax computes LayerNorm statistics in fp32 whatever the dtype.
        return nn.LayerNorm(name=name, dtype=self.policy.compute_dtype, param_dtype=self.policy.param_dtype)

    def qk_normed(self, x_BTHK, name: str):
        """model.qk_norm over the head width K, in fp32 (one scale vector of K shared by the heads)."""
        kind = self.cfg.qk_norm
        if kind == "false":
            return x_BTHK
        cls = nn.LayerNorm if kind == "layernorm" else nn.RMSNorm
        y = cls(name=name, dtype=jnp.float32, param_dtype=self.policy.param_dtype)(x_BTHK.astype(jnp.float32))
        return y.astype(x_BTHK.dtype)

    @nn.compact
    def __call__(self, x_BTD, deterministic: bool):
        c, p = self.cfg, self.policy
        b, t, d = x_BTD.shape
        h, k = c.n_head, d // c.n_head
        drop = nn.Dropout(c.dropout, deterministic=deterministic)

        with jax.named_scope("attention"):
            qkv = self.dense(3 * d, "qkv")(self.norm("ln_1")(x_BTD))
            q_BTHK, k_BTHK, v_BTHK = jnp.split(qkv.reshape(b, t, 3 * h, k), 3, axis=2)
            q_BTHK, k_BTHK = self.qk_normed(q_BTHK, "q_norm"), self.qk_normed(k_BTHK, "k_norm")
            if c.positions == "rotary":
                q_BTHK, k_BTHK = rotary(q_BTHK), rotary(k_BTHK)
            q_BTHK = q_BTHK * jnp.asarray(k**-0.5, q_BTHK.dtype)
            # The scores leave the dot in the softmax dtype (fp32 accumulation, one rounding),
            # never rounded to the compute dtype first; only the naive ablation keeps them narrow.
            # Their gradient enters the backward GEMMs in the compute dtype (Policy.wide_dot).
            scores_dtype = p.compute_dtype if self.naive_softmax else p.softmax_dtype
            scores_BHTT = p.wide_dot(lambda a, b, dtype: jnp.einsum(
                "bthk,bshk->bhts", a, b, precision=p.precision, preferred_element_type=dtype),
                q_BTHK, k_BTHK, scores_dtype)
            causal_TT = jnp.tril(jnp.ones((t, t), bool))
            if self.is_mutable_collection(ATTN):
                self.sow(ATTN, "stats", attention_stats(scores_BHTT, causal_TT))
            scores_BHTT = softcap(scores_BHTT, c.attn_softcap)
            probs_BHTT = p.attention_softmax(scores_BHTT, causal_TT, naive=self.naive_softmax)
            y_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTT, v_BTHK, precision=p.precision)
            x_BTD = x_BTD + drop(self.dense(d, "proj")(y_BTHK.reshape(b, t, d)))

        with jax.named_scope("mlp"):
            u_BTF = nn.gelu(self.dense(c.mlp_ratio * d, "fc")(self.norm("ln_2")(x_BTD)))
            x_BTD = x_BTD + drop(self.dense(d, "out")(u_BTF))

        if self.is_mutable_collection(STATS):
            x32 = x_BTD.astype(jnp.float32)
            finite = jnp.isfinite(x32)
            self.sow(STATS, "amax", jnp.max(jnp.where(finite, jnp.abs(x32), 0.0)))
            self.sow(STATS, "nonfinite", jnp.sum(~finite))
        return x_BTD


class GPT(nn.Module):
    cfg: ModelConfig
    policy: Policy
    naive_softmax: bool = False  # teaching ablation (module doc); config: precision.naive_softmax

    @nn.compact
    def __call__(self, tokens_BT, deterministic: bool = True):
        c, p = self.cfg, self.policy
        init = nn.initializers.normal(c.init_std)
        embed = nn.Embed(c.vocab_size, c.d_model, name="embed", dtype=p.compute_dtype,
                         param_dtype=p.param_dtype, embedding_init=init)
        # The table's and the positions' gradients sum over tokens: in fp32 (Policy.lookup, add_broadcast).
        w_VD = embed.embedding.astype(p.compute_dtype)
        x_BTD = p.lookup(w_VD, tokens_BT)
        if c.positions == "learned":
            pos_TD = self.param("pos_embed", init, (c.context, c.d_model), p.param_dtype)
            x_BTD = p.add_broadcast(x_BTD, pos_TD[: tokens_BT.shape[1]].astype(p.compute_dtype))
        x_BTD = nn.Dropout(c.dropout, deterministic=deterministic)(x_BTD)
        for i in range(c.n_layer):  # Flax puts module names on JAX's name stack (forensics reads it)
            x_BTD = Block(c, p, self.naive_softmax, i, name=f"block_{i}")(x_BTD, deterministic)
        x_BTD = nn.LayerNorm(name="ln_f", dtype=p.compute_dtype, param_dtype=p.param_dtype)(x_BTD)
        with jax.named_scope("head"):
            # Tied head; logits come out of the dot directly in the output dtype (fp32), and their
            # gradient enters the backward GEMMs in the compute dtype (Policy.wide_dot).
            dot_cls = p.dot_general_cls(head=True)
            dims = (((2,), (1,)), ((), ()))
            if dot_cls is None:
                logits_BTV = p.wide_dot(lambda a, b, dtype: lax.dot_general(
                    a, b, dims, precision=p.precision, preferred_element_type=dtype),
                    x_BTD, w_VD, p.output_dtype)
            else:
                logits_BTV = dot_cls(name="head_dot")(x_BTD, w_VD, dims,
                                                      preferred_element_type=p.output_dtype)
        return softcap(p.cast_to_output(logits_BTV), c.logit_softcap)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
