"""exact.stored_cotangent / Policy.dense_output: on CPU, under fp16 compute or a quantization recipe,
a dense layer's output cotangent is computed once and stored, where XLA:CPU recomputed its chain in
each reader.

What is checked: the optimised CPU step evaluates the MLP's GELU chain in one backward fusion per
layer (three before), the values are those of the step without the hint (bit for bit), and the
graph lowered for CUDA carries no barrier."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax import export

from sandbox.precision.policy import Policy
from sandbox.train import setup

N_LAYER = 2
_SQRT_2_OVER_PI = np.float16(np.sqrt(2 / np.pi))  # GELU's tanh approximation: tanh(sqrt(2/pi) (x + 0.044715 x^3))


def _run(tiny, policy="fp16", *sets):
    return setup.build(tiny(sets=[f"precision.policy={policy}", f"model.n_layer={N_LAYER}", *sets]))


def _gelu_fusion_calls(hlo: str) -> int:
    """Call sites of fused computations that evaluate GELU (hold the f16 constant sqrt(2/pi))."""
    computations = re.split(r"\n(?=\S[^\n]*\{\n)", hlo)
    gelu = set()
    for comp in computations:
        name = comp.split(maxsplit=1)[0]
        consts = re.findall(r"= f16\[\] constant\(([-\d.e]+)\)", comp)
        if "fused" in name and any(np.float16(float(c)) == _SQRT_2_OVER_PI for c in consts):
            gelu.add(name)
    return sum(len(re.findall(re.escape(f"calls={n}") + r"\b", hlo)) for n in gelu)


def test_the_fp16_step_evaluates_gelus_derivative_once_per_layer(tiny):
    """Forward and backward: 2 GELU fusions per layer. Without the stored cotangent XLA:CPU fused the
    derivative's chain into the three readers of its result: 4 per layer."""
    run = _run(tiny)
    state = setup.initial_state(run)
    batch = setup.place_batch(run, run.pipeline.train_batch(0))
    hlo = run.step_fn.lower(state, batch).compile().as_text()
    assert _gelu_fusion_calls(hlo) == 2 * N_LAYER


@pytest.mark.parametrize("policy", ["fp16", pytest.param("fp8_current", marks=pytest.mark.slow), pytest.param("nvfp4", marks=pytest.mark.slow)])
def test_storing_the_cotangent_changes_no_value(tiny, monkeypatch, policy):
    """Three steps with and without the hint: parameters and metrics equal bit for bit."""
    def three_steps():
        run = _run(tiny, policy)
        state = setup.initial_state(run)
        for k in range(3):
            state, metrics = run.step_fn(state, setup.place_batch(run, run.pipeline.train_batch(k)))
        return jax.device_get((state.params, metrics["loss"], metrics["grad_norm"]))

    stored = three_steps()
    monkeypatch.setattr(Policy, "dense_output", lambda self, y: y)
    plain = three_steps()
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(plain)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("policy, stored", [("fp16", True), ("mxfp8", True), ("bf16", False), ("fp8", False)])
def test_only_the_cpu_graph_gets_the_barriers(tiny, policy, stored):
    """4 dense layers per block: 4 barriers per layer lowered for CPU (fp16, recipes), none in the graph
    for CUDA; none at all where storing does not pay (bf16, delayed-scaling fp8). Telemetry off: the
    recipes' statistics store their operands too (test_quant_stats_exact.py)."""
    run = _run(tiny, policy, "precision.telemetry=false")
    state = setup.initial_state(run)
    batch = setup.place_batch(run, run.pipeline.train_batch(0))
    cpu = run.step_fn.lower(state, batch).as_text()
    cuda = export.export(run.step_fn, platforms=["cuda"])(state, batch).mlir_module()
    assert cpu.count("stablehlo.optimization_barrier") == (4 * N_LAYER if stored else 0)
    assert "optimization_barrier" not in cuda
