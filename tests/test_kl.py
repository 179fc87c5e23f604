"""KL-to-reference objective, precision drift and the reference loader (sandbox/reference.py).

Module-level divergence maths is in test_infotheory.py; here: the objective's
parts and gradient, the beta schedule, loading/refusing references, and the
trainer end to end (one tiny reference run shared by the module).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from scipy import special

from sandbox import infotheory
from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.logger import read_metrics
from sandbox.objectives import kl_objective, lm_objective
from sandbox.reference import KLTerm, precision_drift, resolve
from sandbox.train.loop import Trainer, initial_state, train


def _logits(seed, shape=(2, 5, 11), scale=3.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


# ------------------------------------------------------------------ objective (no training)


def test_objective_parts_zero_kl_and_gradient():
    lg, targets = _logits(0), jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    ce, _ = lm_objective(lg, targets)
    loss, parts = kl_objective(lg, targets, lg, beta=2.0)
    assert float(parts["kl"]) == pytest.approx(0.0, abs=1e-6)  # reference == model
    assert float(loss) == pytest.approx(float(ce), abs=1e-6)
    ref = _logits(2)
    loss, parts = kl_objective(lg, targets, ref, beta=2.0, direction="reverse")
    rev, fwd = float(parts["kl_to_reference_reverse"]), float(parts["kl_to_reference_forward"])
    assert rev > 0 and fwd > 0 and abs(rev - fwd) > 1e-3  # >= 0 and asymmetric
    assert float(loss) == pytest.approx(float(parts["ce"]) + 2.0 * rev, rel=1e-6)
    assert float(kl_objective(lg, targets, ref, beta=2.0, direction="forward")[1]["kl"]) == pytest.approx(fwd)
    assert float(parts["entropy"]) == pytest.approx(float(jnp.mean(infotheory.entropy(lg))), rel=1e-6)
    # d(loss)/d(logits) = d(CE) + beta * d(KL): the reference is a constant
    g = jax.grad(lambda x: kl_objective(x, targets, ref, beta=2.0)[0])(lg)
    g_ce = jax.grad(lambda x: lm_objective(x, targets)[0])(lg)
    g_kl = jax.grad(lambda x: jnp.mean(infotheory.kl_divergence(x, ref)))(lg)
    np.testing.assert_allclose(g, g_ce + 2.0 * g_kl, atol=1e-6)


@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_objective_and_drift_match_float64_at_large_logits(magnitude):
    # Near-tie logits far from 0: every log-probability must be formed max-shifted
    # (x - logsumexp(x) alone is off by 3e-5 nats at 1e3, 5e-4 at 1e4).
    rng = np.random.default_rng(0)
    lg = (magnitude + rng.uniform(-1, 1, (2, 5, 11))).astype(np.float32)
    ref = (magnitude + rng.uniform(-1, 1, (2, 5, 11))).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    lp = special.log_softmax(lg.astype(np.float64), axis=-1)
    lq = special.log_softmax(ref.astype(np.float64), axis=-1)
    ce = -np.mean(np.take_along_axis(lp, targets[..., None], -1))
    reverse = np.mean(np.sum(np.exp(lp) * (lp - lq), -1))
    forward = np.mean(np.sum(np.exp(lq) * (lq - lp), -1))
    loss, parts = kl_objective(jnp.asarray(lg), targets, jnp.asarray(ref), beta=2.0)
    assert float(parts["ce"]) == pytest.approx(ce, abs=1e-6)
    assert float(parts["kl_to_reference_reverse"]) == pytest.approx(reverse, abs=1e-6)
    assert float(parts["kl_to_reference_forward"]) == pytest.approx(forward, abs=1e-6)
    assert float(loss) == pytest.approx(ce + 2.0 * reverse, abs=4e-6)
    assert float(precision_drift(jnp.asarray(lg), jnp.asarray(ref))) == pytest.approx(reverse, abs=1e-6)


def test_beta_schedule_and_reference_paths(tmp_path):
    term = KLTerm(None, None, beta=1.0, beta_end=0.0, direction="reverse", total_steps=100)
    assert [float(term.beta_at(s)) for s in (0, 50, 100, 500)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert float(KLTerm(None, None, 0.3, -1.0, "reverse", 100).beta_at(70)) == pytest.approx(0.3)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert resolve(str(tmp_path / "runs" / "a")) == (tmp_path / "runs" / "a", None)
    assert resolve("a", str(tmp_path / "runs")) == (tmp_path / "runs" / "a", None)
    assert resolve(str(tmp_path / "runs" / "a" / "checkpoints" / "20")) == (tmp_path / "runs" / "a", 20)
    with pytest.raises(UserError, match="objective.kl.reference"):
        resolve(str(tmp_path / "nope"))


# ------------------------------------------------------------------ trainer


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """A tiny reference trained on the synthetic source (seed 7)."""
    root = tmp_path_factory.mktemp("kl")
    result = train(tiny_config(root, "ref", sets=["training.steps=20"]), quiet=True)
    return root, result.run_dir


def _student(root, name, ref_dir, sets=()):
    return tiny_config(root, name, sets=[f"objective.kl.reference={ref_dir}", *sets])


def test_kl_is_zero_at_the_reference_and_nonnegative(ref_run):
    root, ref_dir = ref_run
    result = train(_student(root, "same", ref_dir, ["objective.kl.beta=1.0", "objective.kl.init_from_reference=true",
                                                    "training.steps=6", "training.log_every=1",
                                                    "data.synthetic.seed=8"]), quiet=True)
    rows = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    first = rows[0]  # metrics of step 1 are computed before its update: the student is the reference
    assert first["kl_to_reference_reverse"] == pytest.approx(0.0, abs=1e-6)
    assert first["kl_to_reference_forward"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(first["ce"], abs=1e-6)
    for r in rows:
        # >= 0 up to fp32 rounding of the sum (about 1e-9 when the two coincide)
        assert r["kl_to_reference_reverse"] >= -1e-6 and r["kl_to_reference_forward"] >= -1e-6
        assert r["loss"] == pytest.approx(r["ce"] + r["beta"] * r["kl"], rel=1e-5)
        assert r["entropy"] > 0
    assert rows[-1]["kl_to_reference_reverse"] > 0  # it moved away on the new source
    assert rows[-1]["kl_to_reference_reverse"] != pytest.approx(rows[-1]["kl_to_reference_forward"], rel=1e-3)
    s = result.summary
    assert s["precision_drift"] == 0.0  # fp32 policy vs its fp32 twin: the same computation
    assert s["val_kl_to_reference_reverse"] > 0 and s["val_entropy"] > 0


def test_mismatched_reference_is_refused_before_training(ref_run, capsys):
    root, ref_dir = ref_run
    cfg = _student(root, "wide", ref_dir, ["model.d_model=32"])
    with pytest.raises(UserError, match=r"does not match the model.*d_model 64 != 32"):
        Trainer(cfg, quiet=True)
    assert not cfg.run_dir.exists()  # nothing written
    cfg_file = root / "bad_vocab.yaml"
    cfg_file.write_text(f"model: {{vocab_size: 512, context: 32, n_layer: 1, d_model: 64}}\n"
                        f"run_root: {root / 'runs'}\nobjective: {{kl: {{reference: {ref_dir}}}}}\n")
    assert main(["train", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size 256 != 512" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_large_beta_stays_closer_to_the_reference(ref_run):
    """Fine-tune on another source: beta 0 drifts away, a large beta keeps the KL small."""
    root, ref_dir = ref_run
    kls = {}
    for beta in (0.0, 10.0):
        result = train(_student(root, f"ft{beta:g}", ref_dir, [
            f"objective.kl.beta={beta}", "objective.kl.init_from_reference=true",
            "data.synthetic.seed=99", "training.steps=40"]), quiet=True)
        kls[beta] = result.summary["val_kl_to_reference_reverse"]
    assert kls[10.0] < 0.5 * kls[0.0], kls


@pytest.mark.slow
def test_precision_drift_orders_fp32_bf16_fp8(ref_run):
    """The reference's weights under each policy vs their fp32 twin."""
    root, ref_dir = ref_run
    drift = {}
    for policy in ("fp32", "bf16", "fp8"):
        trainer = Trainer(_student(root, f"drift_{policy}", ref_dir, [
            f"precision.policy={policy}", "objective.kl.init_from_reference=true"]), quiet=True)
        drift[policy] = trainer.evaluate(initial_state(trainer.run))["precision_drift"]
    assert drift["fp32"] == 0.0
    assert 0 < drift["bf16"] < drift["fp8"], drift


def test_failure_under_kl_replays_with_the_reference(ref_run):
    """A diverging KL run fails with a finite loss; replay reloads the reference and gets the same loss."""
    from sandbox.forensics.bundle import load_bundle, save_bundle
    from sandbox.forensics.replay import replay

    root, ref_dir = ref_run
    # experiments/failures/lr_divergence.yaml's optimizer (plain SGD at step 10) under a KL term
    result = train(_student(root, "diverge", ref_dir, [
        "objective.kl.beta=1.0", "optimizer.lr=1e21", "optimizer.eps=1e20", "optimizer.b1=0.0",
        "optimizer.b2=0.0", "optimizer.weight_decay=0.0", "optimizer.grad_clip=0.0",
        "optimizer.warmup_steps=0", "optimizer.min_lr_ratio=1.0", "training.steps=200"]), quiet=True,
        capture=save_bundle)
    assert result.status == "failed" and result.bundle is not None
    report = replay(load_bundle(result.bundle))
    rows = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    assert rows[-1]["kl"] > 0 and np.isfinite(report.replayed_loss)  # the KL term is part of the loss
    assert report.reproduced and report.replayed_loss == report.recorded_loss
    assert report.origin is not None
