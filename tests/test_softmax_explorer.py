"""`sandbox softmax`: naive vs stable columns against a float64 reference."""

import math

import numpy as np
import pytest
from scipy import special

from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.teaching.softmax import explore


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_fp32_huge_logits_naive_nan_stable_exact():
    r = explore([1000, 1001, 1002], "fp32")
    assert np.all(np.isinf(r.naive_exp)) and np.all(np.isnan(r.naive))
    np.testing.assert_allclose(r.stable, softmax64([1000, 1001, 1002]), rtol=1e-6)
    np.testing.assert_allclose(r.reference, softmax64([0, 1, 2]), rtol=1e-12)
    np.testing.assert_allclose(np.round(r.log_softmax, 3), [-2.408, -1.408, -0.408])
    assert r.logsumexp == pytest.approx(1002 + math.log(1 + math.exp(-1) + math.exp(-2)), abs=1e-3)
    assert "inf" in r.explanation and "NaN" in r.explanation


@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_log_space_columns_match_float64_at_large_logits(magnitude):
    # The explorer's log-softmax, cross-entropy and entropy are the trainer's (infotheory):
    # near-tie logits far from 0 must not lose digits to the size of the log-sum-exp.
    logits = (magnitude + np.random.default_rng(0).uniform(-1, 1, 16)).astype(np.float32)
    r = explore(logits.tolist(), "fp32", target=5)
    ref = special.log_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(r.log_softmax, ref, rtol=0, atol=1e-6)
    assert r.cross_entropy_nats == pytest.approx(-ref[5], abs=1e-6)
    assert r.entropy_nats == pytest.approx(-np.sum(np.exp(ref) * ref), abs=1e-6)
    np.testing.assert_allclose(r.stable, np.exp(ref), rtol=0, atol=1e-6)


def test_fp16_overflows_at_exp_12():
    assert math.exp(12) > float(np.finfo(np.float16).max)  # 162754.8 > 65504
    r = explore([12, 13, 14], "fp16")
    assert np.all(np.isinf(r.naive_exp)) and np.all(np.isnan(r.naive))
    np.testing.assert_allclose(r.stable, softmax64([12, 13, 14]), atol=1e-3)  # fp16 resolution
    assert "65504" in r.explanation
    # The same logits are harmless in fp32.
    assert np.allclose(explore([12, 13, 14], "fp32").naive, softmax64([12, 13, 14]), rtol=1e-5)


def test_small_logits_everything_agrees_with_float64():
    logits = [2.0, 1.0, 0.1]
    ref = softmax64(logits)
    r = explore(logits, "fp32", target=2)
    np.testing.assert_allclose(r.naive, ref, rtol=1e-6)
    np.testing.assert_allclose(r.stable, ref, rtol=1e-6)
    np.testing.assert_allclose(r.log_softmax, np.log(ref), atol=1e-6)
    assert r.cross_entropy_nats == pytest.approx(-np.log(ref[2]), abs=1e-6)
    h = -np.sum(ref * np.log(ref))
    assert r.entropy_nats == pytest.approx(h, abs=1e-6)
    assert r.entropy_bits == pytest.approx(h / np.log(2), abs=1e-6)
    assert r.explanation.startswith("No overflow")


def test_all_negative_logits_underflow_naive():
    r = explore([-1000, -1001], "fp32")
    assert np.all(r.naive_exp == 0) and np.all(np.isnan(r.naive))
    np.testing.assert_allclose(r.stable, softmax64([0, -1]), rtol=1e-6)
    assert "underflows" in r.explanation


def test_bf16_rounds_the_logits_themselves():
    r = explore([1000, 1001, 1002], "bf16")
    assert list(r.stored_logits) == [1000, 1000, 1000]  # bf16 spacing at 1000 is 4
    np.testing.assert_allclose(r.stable, [1 / 3] * 3, atol=2**-8)


def test_temperature_divides_logits():
    logits = [2.0, 1.0, 0.1]
    hot = explore(logits, "fp32", temperature=2.0)
    np.testing.assert_allclose(hot.logits, [1.0, 0.5, 0.05])
    np.testing.assert_allclose(hot.stable, softmax64(np.array(logits) / 2), rtol=1e-6)
    assert hot.entropy_nats > explore(logits, "fp32").entropy_nats  # flatter distribution


def test_masked_logit_is_allowed():
    r = explore([0.0, -math.inf, 0.0], "fp32", target=0)
    np.testing.assert_allclose(r.stable, [0.5, 0.0, 0.5])
    assert r.cross_entropy_nats == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(target=3), dict(target=-1), dict(temperature=0.0), dict(dtype="fp64"), dict(logits=[math.nan, 1.0])],
)
def test_bad_input_raises_user_error(kwargs):
    kwargs = {"logits": [1.0, 2.0, 3.0], **kwargs}
    with pytest.raises(UserError):
        explore(**kwargs)


def test_cli_prints_naive_nan_and_explanation(capsys):
    assert main(["softmax", "1000", "1001", "1002"]) == 0
    out = capsys.readouterr().out
    assert "nan" in out and "0.665241" in out and "inf/inf = NaN" in out


def test_cli_target_and_dtype(capsys):
    assert main(["softmax", "12", "13", "14", "--dtype", "fp16", "--target", "2"]) == 0
    out = capsys.readouterr().out
    assert "exp(12) > fp16 max 65504" in out
    assert f"{-np.log(softmax64([12, 13, 14])[2]):.4f} nats" in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["softmax", "1", "2", "--target", "2"], "--target 2"),
        (["softmax", "1", "x"], "'x'"),
        (["softmax", "1", "2", "--temperature", "-1"], "--temperature"),
    ],
)
def test_cli_bad_input_exits_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
