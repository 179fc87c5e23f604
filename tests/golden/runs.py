"""The golden runs: a few policies, 30 steps each, whose curves must stay bit-identical across refactors.

tests/golden/curves.json holds one record per *machine class*; tests/test_golden.py reruns every run
and compares per-step loss, gradient norm, loss scale and the applied flag exactly, and a sha256 of the
final parameters (or of the failure bundle's state), with the record of the machine it runs on.

Why per machine. XLA:CPU compiles for the host: its matmuls (YNNPACK kernels) and loops are chosen by
the processor's instruction sets, and its thread pool, one thread per CPU the process may use, splits
some reductions. The same commit and jaxlib then give other bits on another processor. Measured
(session 12): 2-CPU AMD EPYC (AVX-512 with BF16) against 2-CPU Intel Xeon (also AMX and AVX512-FP16),
every run's losses differ after 0 to 6 steps (largest relative difference 7.6e-3, on fp8), while every
run's status, skip pattern and loss-scale trajectory are the same; on the Intel machine one CPU instead
of two moves the fp32 gradient norm of step 0 by one float. `machine_key` names that class: jaxlib,
architecture, vendor, usable CPUs and the instruction sets that pick kernels.

    python -m tests.golden.runs --record        # the numerics changed on purpose: this machine's record
                                                # replaces every record (the others are stale)
    python -m tests.golden.runs --add-machine   # nothing changed: add this machine's record beside the others
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from pathlib import Path

import jax
import jaxlib
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


# instruction sets that select XLA:CPU's and YNNPACK's kernels (x86 and Arm names as /proc/cpuinfo spells them)
KERNEL_ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "asimd", "sve", "sve2", "bf16", "i8mm")


def _cpuinfo() -> tuple[str, set[str]]:
    """(vendor, flags) from /proc/cpuinfo; ("", set()) where there is none (macOS, Windows)."""
    vendor, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return vendor, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "CPU implementer") and not vendor:
            vendor = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return vendor, flags


def machine_key() -> str:
    """The class of machine whose XLA:CPU programs compute the same bits (see the module docstring)."""
    vendor, flags = _cpuinfo()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = " ".join(f for f in KERNEL_ISA if f in flags) or "-"
    return (f"{jax.default_backend()} jaxlib {jaxlib.__version__} | {platform.machine()} {vendor or platform.processor()}"
            f" | {cpus} CPUs | {isa}")


def load_records() -> dict[str, dict]:
    """machine key -> {run name -> record}."""
    return json.loads(CURVES.read_text())["machines"]


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
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--record", action="store_true",
                      help=f"numerics changed on purpose: {CURVES.name} keeps this machine's record only")
    mode.add_argument("--add-machine", action="store_true",
                      help=f"numerics unchanged: add (or replace) this machine's record in {CURVES.name}")
    ap.add_argument("--root", default="/tmp/golden-runs")
    args = ap.parse_args()
    key = machine_key()
    curves = record_all(Path(args.root))
    if args.record or args.add_machine:
        records = load_records() if args.add_machine else {}
        records[key] = curves
        CURVES.write_text(json.dumps({"machines": records}, indent=1) + "\n")
    print(key)
    print(json.dumps({k: (v["status"], v["loss"][-1], v["params_sha256"][:12]) for k, v in curves.items()}, indent=1))


if __name__ == "__main__":
    main()
