"""infotheory: worked examples checked against independent float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from sandbox import infotheory as it
from sandbox.sample import filter_logprobs


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def random_dist(rng, n):
    return rng.dirichlet(np.ones(n))


def test_kl_worked_example():
    p, q = np.log([0.5, 0.5]), np.log([0.6, 0.4])
    assert float(it.kl_divergence(p, q)) == pytest.approx(np_kl([0.5, 0.5], [0.6, 0.4]), abs=1e-6)
    assert round(float(it.kl_divergence(p, q)), 4) == 0.0204


def test_entropy_in_bits_worked_example():
    h_bits = float(it.nats_to_bits(it.entropy(np.log([0.9, 0.1]))))
    reference = -(0.9 * np.log2(0.9) + 0.1 * np.log2(0.1))
    assert h_bits == pytest.approx(reference, abs=1e-5)
    assert round(h_bits, 3) == 0.469


@pytest.mark.parametrize("target", [0, 1, 2])
def test_cross_entropy_matches_float64(target):
    logits = np.array([2.0, 1.0, 0.1])
    reference = -(logits[target] - np.log(np.sum(np.exp(logits))))
    got = float(it.cross_entropy(logits, target))
    assert got == pytest.approx(reference, abs=1e-5)


def test_cross_entropy_is_per_position_and_fp32():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7)), jnp.bfloat16)
    targets = np.arange(10).reshape(2, 5) % 7
    ce = it.cross_entropy(logits, targets)
    assert ce.shape == (2, 5) and ce.dtype == jnp.float32
    x = np.asarray(logits.astype(jnp.float32), np.float64)
    logp = x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
    reference = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(ce), reference, atol=1e-5)


def test_label_smoothing_formula():
    logits = np.array([[2.0, 1.0, 0.1, -3.0]])
    eps = 0.1
    x = logits[0]
    logp = x - np.log(np.sum(np.exp(x)))
    reference = (1 - eps) * -logp[1] + eps * np.mean(-logp)
    assert float(it.cross_entropy(logits, [1], label_smoothing=eps)[0]) == pytest.approx(reference, abs=1e-5)
    with pytest.raises(ValueError):
        it.cross_entropy(logits, [1], label_smoothing=1.5)


def test_perplexity_and_unit_conversions():
    assert float(it.perplexity(2.3)) == pytest.approx(9.974, abs=1e-3)
    assert it.NATS_PER_BIT == pytest.approx(np.log(2))
    assert it.nats_to_bits(np.log(2)) == pytest.approx(1.0)
    assert it.bits_to_nats(1.0) == pytest.approx(np.log(2))  # not only the inverse of nats_to_bits
    assert it.bits_to_nats(it.nats_to_bits(1.7)) == pytest.approx(1.7)


def test_log_softmax_of_huge_logits_is_finite():
    got = np.asarray(it.log_softmax([1000.0, 1001.0, 1002.0]))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(np.round(got, 3), [-2.408, -1.408, -0.408])
    assert float(it.logsumexp([1000.0, 1001.0, 1002.0])) == pytest.approx(1002.4076, abs=1e-3)


def test_kl_zero_for_equal_and_nonnegative_on_random():
    rng = np.random.default_rng(0)
    p = np.log(random_dist(rng, 6))
    assert abs(float(it.kl_divergence(p, p))) < 1e-6
    for seed in range(50):
        rng = np.random.default_rng(seed)
        a, b = random_dist(rng, 8), random_dist(rng, 8)
        kl = float(it.kl_divergence(np.log(a), np.log(b)))
        assert kl >= -1e-6
        assert kl == pytest.approx(np_kl(a, b), abs=1e-4, rel=1e-4)


def test_kl_is_asymmetric():
    p, q = np.log([0.9, 0.1]), np.log([0.5, 0.5])
    forward, backward = float(it.kl_divergence(p, q)), float(it.kl_divergence(q, p))
    assert forward == pytest.approx(np_kl([0.9, 0.1], [0.5, 0.5]), abs=1e-6)
    assert backward == pytest.approx(np_kl([0.5, 0.5], [0.9, 0.1]), abs=1e-6)
    assert abs(forward - backward) > 0.05


def test_js_symmetric_and_bounded():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        a, b = np.log(random_dist(rng, 5)), np.log(random_dist(rng, 5))
        js_ab, js_ba = float(it.js_divergence(a, b)), float(it.js_divergence(b, a))
        assert js_ab == pytest.approx(js_ba, abs=1e-6)
        p, q = np.exp(a), np.exp(b)
        m = (p + q) / 2
        assert js_ab == pytest.approx(0.5 * (np_kl(p, m) + np_kl(q, m)), abs=1e-6)  # the value, too
        assert 0 <= js_ab <= np.log(2) + 1e-6
    # Disjoint supports reach the bound exactly.
    disjoint = float(it.js_divergence(jnp.log(jnp.array([1.0, 0.0])), jnp.log(jnp.array([0.0, 1.0]))))
    assert disjoint == pytest.approx(np.log(2), abs=1e-6)


def test_kl_finite_where_p_is_zero_and_q_tiny():
    logp = jnp.log(jnp.array([1.0, 0.0]))  # [0, -inf]
    logq = jnp.array([0.0, -200.0])  # exp(-200) rounds to 0 in fp32, log q does not
    kl = float(it.kl_divergence(logp, logq))
    assert np.isfinite(kl) and kl == pytest.approx(0.0, abs=1e-6)
    # The other way round p has no mass where q has some: KL is +inf, not the
    # NaN of exp(-200) * inf = 0 * inf in fp32.
    assert float(it.kl_divergence(logq, logp)) == np.inf
    grads = jax.grad(lambda a: it.kl_divergence(a, logq))(jnp.array([0.0, -1e30]))
    assert np.all(np.isfinite(np.asarray(grads)))


def test_cross_entropy_dist_is_entropy_plus_kl():
    rng = np.random.default_rng(3)
    p, q = np.log(random_dist(rng, 6)), np.log(random_dist(rng, 6))
    h_pq = float(it.cross_entropy_dist(p, q))
    assert h_pq == pytest.approx(float(it.entropy(p)) + float(it.kl_divergence(p, q)), abs=1e-5)
    assert h_pq == pytest.approx(-np.sum(np.exp(p) * q), abs=1e-5)


def test_entropy_handles_masked_logits():
    h = float(it.entropy(jnp.array([0.0, 0.0, -jnp.inf])))
    assert h == pytest.approx(np.log(2), abs=1e-6)


# ------------------------------------------------- precision at large logits (float64 references)

MAGNITUDES = [1e0, 1e1, 1e2, 1e3, 1e4]
ROWS, VOCAB = 32, 64


def near_tie_logits(magnitude, seed=0):
    """fp32 logits within +-1 of +-magnitude: every class plausible."""
    rng = np.random.default_rng(seed)
    sign = np.where(np.arange(ROWS) % 2, -1.0, 1.0)[:, None]
    return (sign * magnitude + rng.uniform(-1, 1, (ROWS, VOCAB))).astype(np.float32)


def peaked_logits(magnitude, seed=1):
    """fp32 logits at +-magnitude with one winner 1..7 nats above the rest."""
    rng = np.random.default_rng(seed)
    offsets = -rng.uniform(1, 7, (ROWS, VOCAB))
    offsets[np.arange(ROWS), rng.integers(0, VOCAB, ROWS)] = 0.0
    sign = np.where(np.arange(ROWS) % 2, -1.0, 1.0)[:, None]
    return (sign * magnitude + offsets).astype(np.float32)


def log_softmax64(x):
    """float64 log-softmax of the fp32 logits as given: only the computation's rounding is measured."""
    return special.log_softmax(np.asarray(x, np.float64), axis=-1)


def kl64(logp_logits, logq_logits):
    lp, lq = log_softmax64(logp_logits), log_softmax64(logq_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def max_error(got, reference):
    return float(np.max(np.abs(np.asarray(got, np.float64) - reference)))


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("make", [near_tie_logits, peaked_logits])
def test_log_softmax_within_1e_6_of_float64_at_large_logits(magnitude, make):
    # x - logsumexp(x) rounds the log-sum-exp at the magnitude of the largest logit:
    # 3e-5 at 1e3 and 5e-4 at 1e4. Shifting by the max first keeps it at the result's own ulp.
    x = make(magnitude)
    assert max_error(it.log_softmax(x), log_softmax64(x)) <= 1e-6
    nll = -log_softmax64(x)[:, 3]
    assert max_error(it.cross_entropy(x, np.full(ROWS, 3)), nll) <= 1e-6
    entropy = -np.sum(np.exp(log_softmax64(x)) * log_softmax64(x), axis=-1)
    assert max_error(it.entropy(x), entropy) <= 1e-6 * np.max(np.maximum(1.0, entropy))


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_kl_within_1e_6_of_float64_at_large_logits(magnitude):
    near, other = near_tie_logits(magnitude, seed=0), near_tie_logits(magnitude, seed=2)
    assert max_error(it.kl_divergence(near, other), kl64(near, other)) <= 1e-6
    # Peaked against near-tie: a few nats, so 1e-6 relative (fp32 summation of the terms).
    peaked = peaked_logits(magnitude)
    for p, q in ((peaked, near), (near, peaked)):
        reference = kl64(p, q)
        assert max_error(it.kl_divergence(p, q), reference) <= 1e-6 * np.max(np.maximum(1.0, reference))


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_sampling_logprobs_within_1e_6_of_float64_at_large_logits(magnitude):
    x = near_tie_logits(magnitude)[:4]
    for row in x:
        got = filter_logprobs(jnp.asarray(row), temperature=1.0, top_k=0, top_p=1.0)
        assert max_error(got, log_softmax64(row)) <= 1e-6
        kept = np.argsort(-row.astype(np.float64))[:5]  # top-5, renormalised, in float64
        reference = np.full(row.shape, -np.inf)
        reference[kept] = log_softmax64(row[kept])
        got = np.asarray(filter_logprobs(jnp.asarray(row), temperature=1.0, top_k=5, top_p=1.0), np.float64)
        assert np.array_equal(np.isinf(got), np.isinf(reference))
        assert max_error(got[kept], reference[kept]) <= 1e-6
