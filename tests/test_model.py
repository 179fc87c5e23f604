"""The model's dtypes, read from the jaxpr of `model.apply` under every shipped policy.

The policy table promises that the numerically fragile ops stay wide: the
attention scores reach the softmax in the softmax dtype (fp32), rounded once
by the fp32-accumulating QK^T dot and never to the compute dtype first, and
the logits leave the head dot in the output dtype (fp32). Only the
`naive_softmax` ablation keeps the scores in the compute dtype. The checks
read the traced program, not the result, so they see a rounding that a
value comparison would only catch statistically.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import jaxprs_in_params

from sandbox.config import ModelConfig, load_config
from sandbox.model import GPT
from sandbox.precision.policy import make_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTARTS = sorted(p.name for p in CONFIGS.glob("quickstart*.yaml"))
B, T, V = 2, 5, 256  # T appears in no other dimension, so a (B, H, T, T) dot is the score dot
MODEL = ModelConfig(vocab_size=V, context=8, n_layer=1, n_head=2, d_model=16)
CALLS = ("pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call")


def _precision(config_name: str, fp8_head: bool = False):
    precision = load_config(CONFIGS / config_name).precision
    if fp8_head:
        precision = dataclasses.replace(precision, fp8=dataclasses.replace(precision.fp8, head=True))
    return precision


def _policy(config_name: str, fp8_head: bool = False):
    return make_policy(_precision(config_name, fp8_head))


def _model_jaxpr(policy, naive_softmax: bool = False):
    """Closed jaxpr of the forward as the trainer runs it: params cast to compute, fp8 meta as is."""
    model = GPT(MODEL, policy, naive_softmax=naive_softmax)
    tokens = jnp.zeros((B, T), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def forward(v, x):
        return model.apply(dict(v, params=policy.cast_to_compute(v["params"])), x)

    return jax.make_jaxpr(forward)(variables, tokens)


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _walk(sub)


def _inner(eqn):
    (sub,) = jaxprs_in_params(eqn.params)
    return sub


def score_dtypes(closed) -> set:
    """Output dtypes of the QK^T dot_generals (shape B, H, T, T)."""
    return {e.outvars[0].aval.dtype for e in _walk(closed.jaxpr)
            if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (B, MODEL.n_head, T, T)}


def logit_path_dtypes(closed) -> list:
    """Dtypes of every value from the head's dot_general to the model's output.

    Walks back from the output through converts and call boundaries (the fp8
    dot and its gradient quantizer are custom_vjp calls) to the dot itself.
    A narrowing anywhere on the path rounds the logits, even when the dot
    accumulates in fp32 and the output is cast back up.
    """
    dtypes = []

    def back(jaxpr, var):
        producers = {v: e for e in jaxpr.eqns for v in e.outvars}
        while var in producers:
            dtypes.append(var.aval.dtype)
            eqn = producers[var]
            name = eqn.primitive.name
            if name == "dot_general":
                return True
            if name == "convert_element_type":
                var = eqn.invars[0]
            elif name in CALLS:
                inner = _inner(eqn)
                inner_out = inner.outvars[eqn.outvars.index(var)]
                if back(inner, inner_out):
                    return True
                var = eqn.invars[inner.invars.index(inner_out)]  # an identity call: continue outside
            else:
                raise AssertionError(f"unexpected {name} between the head dot and the logits")
        return False

    assert back(closed.jaxpr, closed.jaxpr.outvars[0]), "no dot_general feeds the logits"
    return dtypes


POLICY_CASES = [(name, False) for name in QUICKSTARTS] + [("quickstart_fp8.yaml", True)]


@pytest.mark.parametrize("config_name, fp8_head", POLICY_CASES,
                         ids=[n.removesuffix(".yaml") + ("+fp8_head" if h else "") for n, h in POLICY_CASES])
def test_scores_in_softmax_dtype_and_logits_in_output_dtype(config_name, fp8_head):
    naive = _precision(config_name).naive_softmax
    policy = _policy(config_name, fp8_head)
    closed = _model_jaxpr(policy, naive)
    wanted_scores = policy.compute_dtype if naive else policy.softmax_dtype
    assert score_dtypes(closed) == {jnp.dtype(wanted_scores)}, policy.describe()
    assert set(logit_path_dtypes(closed)) == {jnp.dtype(policy.output_dtype)}, policy.describe()


def test_shipped_policies_are_all_covered():
    names = {_policy(n).name for n, _ in POLICY_CASES}
    assert {"fp32", "tf32", "bf16", "fp16", "fp8", "bf16_pure", "fp16_noscale"} <= names
    assert any(_precision(n).naive_softmax for n, _ in POLICY_CASES)
    assert any(_policy(n, h).fp8 is not None and _policy(n, h).fp8.head for n, h in POLICY_CASES)
    # Where the checks can tell: the low-precision policies compute below fp32.
    assert jnp.dtype(_policy("quickstart_bf16.yaml").compute_dtype) == jnp.bfloat16
