"""`sandbox demo`: each demo's claim, checked on the numbers it returns."""

import ml_dtypes
import numpy as np
import pytest

from sandbox.cli import main
from sandbox.teaching import demos


def test_update_rounding_bf16_never_moves_fp32_master_does():
    r = demos.update_rounding()
    bf16_01 = float(np.asarray(0.1).astype(ml_dtypes.bfloat16))
    assert r.start == bf16_01
    assert r.half_ulp_bf16 == 2.0**-4 * 2.0**-7 / 2  # 0.1 lies in [2^-4, 2^-3); 7 mantissa bits
    assert r.update < r.half_ulp_bf16
    assert all(w == bf16_01 for w in r.pure_bf16)  # every update rounded away
    i = r.steps.index(1000)
    assert r.master_fp32[i] - r.start == pytest.approx(1000 * r.update, rel=0.05)
    # The bf16 copy of the master moves once the total passes half a bf16 step.
    assert r.master_as_bf16[-1] > r.start and r.steps[-1] * r.update > r.half_ulp_bf16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cancellation_naive_variance_badly_wrong_welford_close(seed):
    r = demos.cancellation(seed=seed)
    assert r.tiny_fp32 == 0.0 and r.tiny_fp64 == pytest.approx(1e-8, rel=1e-6)
    naive_error = abs(r.naive_fp32 - r.true_variance)
    welford_error = abs(r.welford_fp32 - r.true_variance)
    assert naive_error > 10 * welford_error
    assert naive_error > 0.5  # wrong in the leading digit, not the last
    assert welford_error / r.true_variance < 1e-2
    assert r.naive_fp64 == pytest.approx(r.true_variance, rel=1e-6)


def test_summation_naive_fp16_stalls_kahan_and_pairwise_do_not():
    r = demos.summation()
    assert r.value == float(np.float16(0.1))
    assert r.exact == pytest.approx(10_000 * r.value)
    # The stall: the first power of two whose fp16 half-spacing exceeds the term.
    stall = next(2.0**k for k in range(20) if 2.0**k * 2.0**-10 / 2 > r.value)
    assert r.naive_fp16 == stall == 256
    assert abs(r.naive_fp16 - 1000) > 500
    for total in (r.kahan_fp16, r.pairwise_fp16):
        assert abs(total - r.exact) / r.exact < 0.01
    assert r.naive_fp32 == pytest.approx(r.exact, rel=1e-4)


def test_underflow_loss_scale_rescues_small_gradients():
    r = demos.underflow()
    grads = 10.0 ** np.random.default_rng(0).uniform(-8, -5, 10_000)  # the demo's data, independently
    assert r.zero_fraction == pytest.approx(np.mean(grads < 2.0**-25), abs=1e-3)
    assert r.subnormal_fraction == pytest.approx(np.mean((grads >= 2.0**-25) & (grads < 2.0**-14)), abs=1e-3)
    assert r.zero_fraction > 0.1 and r.subnormal_fraction > 0.5
    assert r.loss_scale == 2.0**16
    assert r.scaled_zero_fraction == 0.0 and r.scaled_subnormal_fraction == 0.0
    assert r.scaled_max_rel_error <= 2.0**-11 < r.max_rel_error


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_every_demo_table_has_rows_and_2_to_4_notes(name):
    title, headers, rows, notes = demos.run(name).table()
    assert title and rows and all(len(row) == len(headers) for row in rows)
    assert 2 <= len(notes) <= 4


@pytest.mark.parametrize("name", list(demos.DEMOS))
def test_cli_runs_each_demo(capsys, name):
    assert main(["demo", name]) == 0
    title = demos.run(name).table()[0]
    assert title in capsys.readouterr().out


def test_cli_list(capsys):
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in demos.DEMOS)


def test_cli_unknown_demo_exits_2_listing_names(capsys):
    assert main(["demo", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and all(name in err for name in demos.DEMOS)


def test_demo_list_reads_like_lesson_list_and_names_accept_either_spelling(capsys):
    from sandbox.cli import main

    assert main(["demo", "list"]) == 0 and main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.count("Demos: sandbox demo NAME") == 2 and "│ 1 │ update-rounding" in out
    assert main(["demo", "update_rounding"]) == 0
