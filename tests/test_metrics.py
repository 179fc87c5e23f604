"""Host-side metrics (sandbox/train/metrics.py): derived scalars, names of non-finite tensors, run telemetry."""

from __future__ import annotations

import math

import pytest

from sandbox.train.metrics import derived, first_bad_stage, name_list, run_telemetry


def test_derived_scalars_follow_from_the_cross_entropy():
    ce = 1.25
    out = derived(ce, {"source_floor": 1.0, "bytes_per_token": 2.5})
    assert out["bits_per_token"] == pytest.approx(ce / math.log(2.0), rel=1e-15)
    assert out["perplexity"] == pytest.approx(math.e ** ce, rel=1e-15)
    assert out["kl_to_source"] == pytest.approx(0.25) and out["bits_per_byte"] == pytest.approx(ce / math.log(2) / 2.5)
    assert set(derived(ce, {})) == {"ce", "bits_per_token", "perplexity"}
    assert math.isfinite(derived(1e6, {})["perplexity"])  # capped, not an OverflowError


def test_nonfinite_names_are_listed_gradients_first():
    names = ["params/a", "grads/b", "grads/c"]
    assert first_bad_stage(names) == ["grads/b", "grads/c"]
    assert first_bad_stage(["opt_state/x"]) == ["opt_state/x"]
    assert name_list(["a"]) == "1 tensor: a"
    assert name_list([f"t{i}" for i in range(8)], shown=2) == "8 tensors: t0, t1 (+6 more)"


def test_run_telemetry_means_fractions_and_takes_the_max_saturation():
    rows = [{"underflow_frac": 0.1, "fp8_stats/x/input_saturated_frac": 0.5},
            {"underflow_frac": 0.3, "fp8_stats/y/kernel_saturated_frac": 0.25, "loss": 2.0}]
    assert run_telemetry(rows) == {"underflow_frac": pytest.approx(0.2), "fp8_saturated_frac": 0.5}
