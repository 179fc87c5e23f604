"""The golden runs: a few policies, 30 steps each, whose curves must stay bit-identical across refactors.

`python -m tests.golden.runs --record` writes tests/golden/curves.json; tests/test_golden.py reruns
every entry and compares per-step loss, gradient norm, loss scale and the applied flag exactly, and a
sha256 of the final parameters (or of the failure bundle's state).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from sandbox import config as config_lib
from sandbox.logger import read_metrics
from sandbox.train.loop import train

REPO = Path(__file__).resolve().parents[2]
CURVES = Path(__file__).with_name("curves.json")
STEPS = 30
COMMON = [f"training.steps={STEPS}", "training.log_every=1", "training.eval_every=0", "checkpoint.every=0",
          "logging.tensorboard=false", "logging.progress=false", "data.prefetch=0"]

# name -> (config relative to the repo, extra overrides)
RUNS = {
    **{p: (f"configs/quickstart_{p}.yaml", []) for p in
       ("bf16", "fp16", "fp8", "tf32", "bf16_pure", "fp16_noscale", "naive_softmax")},
    "fp32": ("configs/quickstart.yaml", []),
    "fp16_overflow": ("configs/quickstart_fp16.yaml", ["precision.loss_scale.init_scale=1073741824",
                                                       "precision.loss_scale.max_scale=1073741824"]),
    "kl": ("configs/kl_finetune.yaml", []),  # reference: the golden fp32 run
    "failure_bundle": ("experiments/failures/fp16_overflow.yaml", []),
}


def tree_sha256(tree) -> str:
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_one(name: str, root: Path) -> dict:
    path, extra = RUNS[name]
    sets = [*COMMON, f"run_root={root}", f"name={name}", *extra]
    if name == "kl":
        sets.append(f"objective.kl.reference={root / 'fp32'}")
    result = train(config_lib.load_config(REPO / path, sets), overwrite=True, quiet=True)
    rows = [r for r in read_metrics(result.run_dir) if r.get("split") == "train"]
    out = {key: [repr(r.get(key)) for r in rows] for key in ("loss", "grad_norm", "loss_scale", "applied")}
    out["status"] = result.status
    out["params_sha256"] = tree_sha256(result.state.params)
    return out


def record_all(root: Path) -> dict:
    return {name: run_one(name, root) for name in RUNS}  # fp32 before kl: dict order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true", help=f"write {CURVES.name}")
    ap.add_argument("--root", default="/tmp/golden-runs")
    args = ap.parse_args()
    curves = record_all(Path(args.root))
    if args.record:
        CURVES.write_text(json.dumps(curves, indent=1) + "\n")
    print(json.dumps({k: (v["status"], v["loss"][-1], v["params_sha256"][:12]) for k, v in curves.items()}, indent=1))


if __name__ == "__main__":
    main()
