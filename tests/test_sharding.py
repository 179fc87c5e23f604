"""Sharding: mesh rules in-process; multi-device behaviour in 4-device CPU subprocesses.

The main pytest process keeps its single device, so anything that needs a
mesh runs in a child with XLA_FLAGS=--xla_force_host_platform_device_count=4
and prints JSON for the assertions here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.sharding import FSDP, leaf_spec, make_mesh

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, devices: int, tmp_path: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "tests"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fsdp_rule_shards_largest_divisible_axis_and_replicates_small_leaves():
    assert leaf_spec((256, 64), 4) == P(FSDP, None)
    assert leaf_spec((64, 192), 4) == P(None, FSDP)
    assert leaf_spec((64, 190), 4) == P(FSDP, None)  # 190 % 4 != 0: next largest axis
    assert leaf_spec((66, 190), 4) == P()  # nothing divisible
    assert leaf_spec((256,), 4) == P()  # 1-D: biases, norms, amax histories
    assert leaf_spec((16, 16), 4) == P()  # below MIN_SHARD_SIZE
    assert leaf_spec((256, 64), 1) == P()  # no fsdp axis: pure data parallel


def test_mesh_config_errors_are_one_line():
    mesh = make_mesh(config_lib.MeshConfig())
    assert mesh.axis_names == ("data", "fsdp") and mesh.size == 1
    with pytest.raises(UserError, match="mesh.fsdp: 2 is more than"):
        make_mesh(config_lib.MeshConfig(fsdp=2))
    with pytest.raises(UserError, match="needs 2 devices"):
        make_mesh(config_lib.MeshConfig(data=2))


# Losses of the same run on four meshes, and one skipped step seen from every device.
_EQUIVALENCE = """
import json, sys
from pathlib import Path
import jax, numpy as np
from conftest import tiny_config
from sandbox.train.loop import build, initial_state, place_batch

tmp = Path(sys.argv[1])
assert jax.device_count() == 4
out = {}

def shards_equal(a, b):
    return all(np.array_equal(x.data, y.data) for x, y in zip(a.addressable_shards, b.addressable_shards))

for data, fsdp in [(1, 1), (4, 1), (1, 4), (2, 2)]:
    cfg = tiny_config(tmp, f"m{data}x{fsdp}", {"mesh": {"data": data, "fsdp": fsdp}})
    run = build(cfg)
    state = initial_state(run)
    sharded = [p for p in jax.tree.leaves(state.params) if any(a is not None for a in p.sharding.spec)]
    losses = []
    for k in range(6):
        state, m = run.step_fn(state, place_batch(run, run.pipeline.train_batch(k)))
        losses.append(float(m["loss"]))
    out[f"{data}x{fsdp}"] = {"losses": losses, "devices": len(state.params["embed"]["embedding"].devices()),
                             "sharded_leaves": len(sharded)}

# fp16 overflow (a loss scale far past fp16's range): every device's shard of the
# state must be left exactly as it was, and every device must see the backoff.
for data, fsdp in [(4, 1), (1, 4)]:
    scale = {"init_scale": 2.0 ** 100, "max_scale": 2.0 ** 100}
    cfg = tiny_config(tmp, f"fp16{data}x{fsdp}", {"mesh": {"data": data, "fsdp": fsdp},
                      "precision": {"policy": "fp16", "loss_scale": scale}})
    run = build(cfg)
    state = initial_state(run)
    before = jax.tree.map(lambda x: x.copy(), (state.params, state.opt_state))
    state, m = run.step_fn(state, place_batch(run, run.pipeline.train_batch(0)))
    after = (state.params, state.opt_state)
    out[f"fp16_{data}x{fsdp}"] = {
        "overflow": bool(m["overflow"]), "applied": bool(m["applied"]),
        "unchanged_all_shards": all(shards_equal(a, b)
                                    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))),
        "scale_per_device": sorted({float(s.data) for s in state.loss_scale.scale.addressable_shards}),
        "skipped_per_device": sorted({int(s.data) for s in state.guard.skipped_overflow.addressable_shards}),
        "opt_step": int(state.opt_step)}

# One poisoned shard: a NaN in the Adam moment on the last device's shard of one
# FSDP-sharded leaf makes only that shard's new parameters non-finite. The skip
# is one global decision, so no device applies its (finite) part of the update.
cfg = tiny_config(tmp, "poison", {"mesh": {"data": 1, "fsdp": 4}, "forensics": {"nan_policy": "skip"}})
run = build(cfg)
state = initial_state(run)
adam = state.opt_state[1][0]
mu = adam.mu["embed"]["embedding"]
host = np.asarray(mu).copy()
last_rows = mu.addressable_shards[-1].index
host[last_rows][0, 0] = np.nan
mu = jax.device_put(host, mu.sharding)
opt = (state.opt_state[0], (adam._replace(mu={**adam.mu, "embed": {"embedding": mu}}),) + state.opt_state[1][1:])
state = state._replace(opt_state=opt)
before = jax.tree.map(lambda x: x.copy(), state.params)
state, m = run.step_fn(state, place_batch(run, run.pipeline.train_batch(0)))
out["poison"] = {"spec": str(mu.sharding.spec), "applied": bool(m["applied"]), "nonfinite": bool(m["nonfinite"]),
                 "unchanged_all_shards": all(shards_equal(a, b) for a, b in
                                             zip(jax.tree.leaves(before), jax.tree.leaves(state.params))),
                 "skipped_per_device": sorted({int(s.data) for s in state.guard.skipped_nonfinite.addressable_shards})}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_and_fsdp_match_one_device_and_skip_together(tmp_path):
    out = _run(_EQUIVALENCE, 4, tmp_path)
    ref = out["1x1"]["losses"]
    assert out["1x1"]["devices"] == 1 and out["4x1"]["devices"] == 4
    assert out["1x1"]["sharded_leaves"] == 0 and out["4x1"]["sharded_leaves"] == 0
    assert out["1x4"]["sharded_leaves"] > 0 and out["2x2"]["sharded_leaves"] > 0
    assert ref[-1] < ref[0]  # it trains
    for mesh in ("4x1", "1x4", "2x2"):
        assert out[mesh]["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6), mesh
    for mesh in ("fp16_4x1", "fp16_1x4"):
        r = out[mesh]
        assert r["overflow"] and not r["applied"] and r["unchanged_all_shards"], (mesh, r)
        assert r["scale_per_device"] == [2.0 ** 99] and r["skipped_per_device"] == [1] and r["opt_step"] == 0
    p = out["poison"]
    assert "fsdp" in p["spec"] and p["nonfinite"] and not p["applied"], p
    assert p["unchanged_all_shards"] and p["skipped_per_device"] == [1], p


_WRITE = """
import json, sys
from pathlib import Path
import jax, numpy as np
from conftest import tiny_config
from sandbox.train.loop import train

tmp = Path(sys.argv[1])
cfg = tiny_config(tmp, "ckpt", {"mesh": {"data": 2, "fsdp": 2}, "training": {"steps": 10}})
res = train(cfg)
w = res.state.params["embed"]["embedding"]
np.save(tmp / "embed.npy", np.asarray(w))
print(json.dumps({"status": res.status, "spec": str(w.sharding.spec), "devices": len(w.devices())}))
"""

_RESUME = """
import json, sys
from pathlib import Path
import jax, numpy as np
from conftest import tiny_config
from sandbox.train.loop import Trainer

tmp = Path(sys.argv[1])
cfg = tiny_config(tmp, "ckpt", {"training": {"steps": 14}})  # default mesh: the one device here
trainer = Trainer(cfg, resume=True, quiet=True)
state = trainer.restore_or_init()
w = state.params["embed"]["embedding"]
same = bool(np.array_equal(np.asarray(w), np.load(tmp / "embed.npy")))
res = trainer.train()  # one trainer: it holds the run directory's lock from construction to the end of train()
print(json.dumps({"step": int(state.step), "same": same, "devices": len(w.devices()), "status": res.status,
                  "final_step": res.summary["steps"]}))
"""


@pytest.mark.slow
def test_checkpoint_written_on_four_devices_resumes_on_one(tmp_path):
    w = _run(_WRITE, 4, tmp_path)
    assert w["status"] == "finished" and w["devices"] == 4 and "fsdp" in w["spec"], w
    r = _run(_RESUME, 1, tmp_path)
    assert r["step"] == 10 and r["same"] and r["devices"] == 1, r
    assert r["status"] == "finished" and r["final_step"] == 14, r
