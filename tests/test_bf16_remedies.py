"""bf16 weights that still learn, wired into training: the `bf16_sr` / `bf16_kahan` presets and
the `precision.moments` knob (the library pieces are tested in tests/test_lowp_optim.py).

References are independent of the code under test: ml_dtypes rounding for the step's last stage,
leaf .nbytes for the memory accounting, the uninterrupted run for resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import yaml

from sandbox import config as config_lib
from sandbox.cli import main
from sandbox.logger import read_metrics
from sandbox.precision.policy import PRESETS
from sandbox.train import setup
from sandbox.train.step import optimizer_update
from tests.conftest import TINY, merge

BF16 = ml_dtypes.bfloat16
# A small lr: Adam's steps (~lr) fall under half a bf16 ulp of most weights, so rounding matters.
LOW_LR = {"optimizer": {"lr": 1e-4, "warmup_steps": 0, "decay_steps": 12}}


def _yaml(tmp_path: Path, policy: str, **over) -> Path:
    raw = merge(merge(TINY, LOW_LR), {"run_root": str(tmp_path / "runs"), "data": {"cache_dir": str(tmp_path / "c")},
                                      "precision": {"policy": policy},
                                      "training": {"steps": 12, "log_every": 1},
                                      "checkpoint": {"every": 0}})
    path = tmp_path / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(merge(raw, over)))
    return path


def _cli_train(path: Path, name: str, *sets: str, resume: bool = False) -> int:
    args = ["train", str(path), "--set", f"name={name}", *[a for s in sets for a in ("--set", s)]]
    return main(args + (["--resume"] if resume else []))


def _rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def test_presets_store_bf16_weights_without_a_master_copy():
    for name, rounding in (("bf16_sr", "stochastic"), ("bf16_kahan", "kahan")):
        p = PRESETS[name]
        assert p.param_dtype == jnp.bfloat16 and p.compute_dtype == jnp.bfloat16 and p.update_rounding == rounding
    assert all(p.update_rounding == "nearest" for n, p in PRESETS.items() if n not in ("bf16_sr", "bf16_kahan"))


def test_bad_moments_value_is_one_line_and_exit_2(tmp_path, capsys):
    path = _yaml(tmp_path, "bf16_sr")
    assert _cli_train(path, "bad", "precision.moments=fp4") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "precision.moments" in err and "fp4" in err and "bf16" in err, err
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("policy", ["bf16_kahan", "bf16_sr"])
def test_optimizer_update_rounds_the_adam_update_like_the_reference(tmp_path, policy):
    """The step's last stage, checked with ml_dtypes: Kahan = bf16_rne(w + u) at the first step
    (empty buffer) with buffer bf16((w + u) - w'); SR = one of the two bf16 neighbours of w + u."""
    cfg = config_lib.load_config(_yaml(tmp_path, policy))
    run = setup.build(cfg, with_data=False)
    state = setup.initial_state(run)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, jnp.float32) * jnp.sign(p.astype(jnp.float32) + 1e-3),
                         state.params)
    updates, new_params, new_opt = optimizer_update(run.ctx, grads, state.opt_state, state.params)
    w, u, n = (np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(t)])
               for t in (state.params, updates, new_params))
    assert u.dtype == np.float32 and np.any(u != 0)
    exact = w + u  # fp32, as the stage adds
    if policy == "bf16_kahan":
        np.testing.assert_array_equal(n, (w + u).astype(BF16).astype(np.float32))
        c = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(new_opt[1].compensation)])
        np.testing.assert_array_equal(c, (u - (n - w)).astype(BF16).astype(np.float32))
    else:
        nearest = (w + u).astype(BF16)
        other = np.where(nearest.astype(np.float32) > exact, np.nextafter(nearest, BF16(-np.inf)),
                         np.nextafter(nearest, BF16(np.inf))).astype(np.float32)
        assert np.all((n == nearest.astype(np.float32)) | (n == other))
        assert np.any(n != nearest.astype(np.float32))  # it does round away from nearest sometimes
        assert int(new_opt[1].count) == 1


@pytest.mark.parametrize("policy,moments", [("bf16_sr", "auto"), ("bf16_kahan", "auto"), ("bf16", "fp8")])
def test_cli_trains_and_resumes_bit_exactly_with_memory_and_telemetry_in_the_summary(tmp_path, policy, moments):
    path = _yaml(tmp_path, policy, precision={"policy": policy, "moments": moments})
    assert _cli_train(path, "straight") == 0
    assert _cli_train(path, "part", "training.steps=5") == 0
    assert _cli_train(path, "part", "training.steps=12", resume=True) == 0
    runs = tmp_path / "runs"
    straight, part = (setup.load_run_state(runs / n) for n in ("straight", "part"))
    assert straight[2] == part[2] == 12
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                        straight[1], part[1])
    assert all(jax.tree.leaves(same))
    a, b = _rows(runs / "straight"), _rows(runs / "part")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]

    # memory accounting from the actual state: per category, bytes of the leaves it names
    summary = json.loads((runs / "straight" / "summary.json").read_text())
    state = straight[1]
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree.leaves(t))  # noqa: E731
    sb = summary["state_bytes"]
    assert summary["state_bytes_per_param"] == sb["total"] == pytest.approx(nbytes(state) / n_params)
    if policy == "bf16":  # fp32 master, e4m3 m + e5m2 v and a scale per moment tensor
        assert sb["master"] == 4.0 and sb["params"] == 0.0 and sb["moments"] == 2.0
        n_tensors = len(jax.tree.leaves(state.params))
        assert sb["fp8_meta"] == pytest.approx(2 * n_tensors * 4 / n_params)
        assert all("nu_underflow_frac" in r for r in a) and "nu_underflow_frac" in summary
        assert "recovered_update_frac" not in summary
    else:  # bf16 weights, moments stored like the weights ("auto"), + a bf16 buffer for Kahan
        assert sb["params"] == 2.0 and sb["master"] == 0.0 and sb["moments"] == 4.0
        assert sb["compensation"] == (2.0 if policy == "bf16_kahan" else 0.0)
        comp = state.opt_state[1]
        assert nbytes(comp) == (2 * n_params if policy == "bf16_kahan" else 4)  # buffer / SR's int32 count
        assert all("recovered_update_frac" in r for r in a)
        assert summary["recovered_update_frac"] > 0.05  # at this lr plain rounding would drop these


@pytest.mark.parametrize("policy", ["bf16_kahan", "bf16_sr"])
def test_the_steps_split_update_equals_the_optax_chain(tmp_path, policy):
    """The step runs the rounding stage apart (for telemetry); the result must be optax.chain's."""
    cfg = config_lib.load_config(_yaml(tmp_path, policy))
    run = setup.build(cfg, with_data=False)
    state = setup.initial_state(run)
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape) * 1e-2,
                         state.params)
    _, new_params, new_opt = optimizer_update(run.ctx, grads, state.opt_state, state.params)
    tx = run.parts.full_tx
    deltas, chain_opt = tx.update(run.policy.cast_to_param(grads), state.opt_state, state.params)
    chain_params = optax.apply_updates(state.params, deltas)
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes(),
                        (new_params, new_opt), (chain_params, chain_opt))
    assert all(jax.tree.leaves(same))


_MESHES = """
import json, sys
from pathlib import Path
import jax
from conftest import tiny_config
from sandbox.train.loop import build, initial_state, place_batch

tmp = Path(sys.argv[1])
out = {}
for policy, moments in [("bf16_sr", "auto"), ("bf16_kahan", "fp8")]:
    for data, fsdp in [(1, 1), (1, 4), (2, 2)]:
        cfg = tiny_config(tmp, f"{policy}{data}x{fsdp}", {"mesh": {"data": data, "fsdp": fsdp},
                          "precision": {"policy": policy, "moments": moments}})
        run = build(cfg)
        state = initial_state(run)
        losses = []
        for k in range(4):
            state, m = run.step_fn(state, place_batch(run, run.pipeline.train_batch(k)))
            losses.append(float(m["loss"]))
        last = state.opt_state[1]
        leaf = last.compensation["embed"]["embedding"] if policy == "bf16_kahan" else last.count
        out[f"{policy}_{data}x{fsdp}"] = {"losses": losses, "spec": str(leaf.sharding.spec),
                                          "param_spec": str(state.params["embed"]["embedding"].sharding.spec),
                                          "recovered": float(m["recovered_update_frac"])}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_remedies_train_on_sharded_meshes_like_on_one_device(tmp_path):
    """The rounding stage's state is sharded like the parameters (the Kahan buffer) and the run
    follows the one-device run (bf16 weights: equal up to the mesh's reduction order)."""
    from tests.test_sharding import _run

    out = _run(_MESHES, 4, tmp_path)
    for policy in ("bf16_sr", "bf16_kahan"):
        ref = out[f"{policy}_1x1"]["losses"]
        for mesh in ("1x4", "2x2"):
            r = out[f"{policy}_{mesh}"]
            assert r["losses"] == pytest.approx(ref, rel=2e-3), (policy, mesh)
            assert r["recovered"] > 0
            if policy == "bf16_kahan":
                assert r["spec"] == r["param_spec"] and "fsdp" in r["spec"], r
