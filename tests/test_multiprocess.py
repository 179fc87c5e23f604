"""Multi-host for real: two JAX processes on this machine, 2 CPU devices each.

`jax.distributed.initialize` on localhost with gloo CPU collectives makes two
processes one 4-device job. The same `train(cfg)` runs there and in one
process with 4 devices, and the per-step losses must agree: data parallel
(4x1) in fp32, FSDP (2x2) in fp16 with a loss scale that overflows the first
steps (skipped in every process alike). The FSDP run's checkpoint, written
collectively by the two processes, is then resumed by a single process, which
continues it exactly as the uninterrupted single-process run does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox.checkpoint import verify_manifest

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_STEP = 8, 4

# argv: tmp, run name prefix, comma-separated runs, process id, number of processes, coordinator port, resume
_WORKER = """
import json, sys
from pathlib import Path
import jax

tmp, prefix, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
pid, nproc, port, resume = map(int, sys.argv[4:])
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid,
                               initialization_timeout=120)
assert jax.device_count() == 4 and jax.local_device_count() == 4 // nproc
from conftest import tiny_config
from sandbox.train.loop import train

RUNS = {
    "dp": {"mesh": {"data": 4, "fsdp": 1}},
    # 2**17 overflows this model's fp16 gradients: step 1 is skipped and the scale halves until it fits
    "fsdp16": {"mesh": {"data": 2, "fsdp": 2}, "checkpoint": {"every": %(ckpt)d},
               "precision": {"policy": "fp16", "loss_scale": {"init_scale": 2.0 ** 17}}},
}
out = {}
for name in names:
    base = {"training": {"steps": %(steps)d, "log_every": 1, "batch_size": 8}, "model": {"context": 16}}
    cfg = tiny_config(tmp, f"{prefix}{name}", {**base, **RUNS[name]})
    res = train(cfg, resume=bool(resume), quiet=True)
    out[name] = {"status": res.status, "overflow_skips": res.summary["overflow_skips"]}
print(json.dumps(out))
""" % {"steps": STEPS, "ckpt": CKPT_STEP}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(tmp: Path, prefix: str, runs: str, pid: int, nproc: int, port: int,
           resume: bool = False) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO / "tests"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // nproc}")
    args = [sys.executable, "-c", textwrap.dedent(_WORKER), str(tmp), prefix, runs, str(pid), str(nproc), str(port),
            str(int(resume))]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[dict]:
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _train_rows(run_dir: Path) -> dict[int, dict]:
    """{step: last train row} (a resumed run re-logs the steps after its checkpoint)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def _losses(rows: dict[int, dict], steps) -> list[float]:
    return [rows[k]["loss"] for k in steps]


def _run_both(tmp: Path, runs: str) -> tuple[dict, dict]:
    """The same runs in two 2-device processes (prefix mp_) and in one 4-device process (sp_), at once."""
    port = _free_port()
    procs = [_start(tmp, "mp_", runs, pid, 2, port) for pid in range(2)]
    multi, _, single = _finish(procs + [_start(tmp, "sp_", runs, 0, 1, 0)])
    assert multi == single and {r["status"] for r in multi.values()} == {"finished"}, (multi, single)
    return multi, single


def _assert_same_losses(runs: Path, name: str, steps) -> None:
    mp, sp = _train_rows(runs / f"mp_{name}"), _train_rows(runs / f"sp_{name}")
    assert sorted(mp) == list(steps), name  # process 0 alone logged: one row per step
    # fp32 tolerance: gloo's all-reduce may add the 4 devices' gradients in another order
    assert _losses(mp, steps) == pytest.approx(_losses(sp, steps), rel=1e-5, abs=1e-6), name
    assert [mp[k]["overflow"] for k in steps] == [sp[k]["overflow"] for k in steps], name


@pytest.fixture(scope="module")
def fsdp16(tmp_path_factory) -> tuple[Path, dict]:
    """The fp16 FSDP run, once in two processes and once in one; (tmp dir, the runs' results)."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    multi, _ = _run_both(tmp, "fsdp16")
    return tmp, multi


def test_two_processes_fsdp_fp16_match_one_process_and_skip_the_same_overflows(fsdp16):
    tmp, multi = fsdp16
    runs = tmp / "runs"
    _assert_same_losses(runs, "fsdp16", range(1, STEPS + 1))
    rows = _train_rows(runs / "mp_fsdp16")
    assert rows[1]["overflow"] == 1 and rows[1]["applied"] == 0 and rows[STEPS]["applied"] == 1, rows[1]
    assert multi["fsdp16"]["overflow_skips"] >= 1
    # both checkpoints written collectively, each with its one checksum manifest
    ckpts = runs / "mp_fsdp16" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [str(CKPT_STEP), str(STEPS)]
    assert all(verify_manifest(ckpts / name) is None for name in (str(CKPT_STEP), str(STEPS)))


@pytest.mark.slow
def test_one_process_resumes_the_checkpoint_two_processes_wrote(fsdp16):
    tmp, _ = fsdp16
    runs = tmp / "runs"
    # The final checkpoint goes; one 4-device process resumes the two processes' step-4 checkpoint
    # and must continue it exactly as the uninterrupted single-process run did.
    shutil.rmtree(runs / "mp_fsdp16" / "checkpoints" / str(STEPS))
    [resumed] = _finish([_start(tmp, "mp_", "fsdp16", 0, 1, 0, resume=True)])
    assert resumed["fsdp16"]["status"] == "finished"
    after = range(CKPT_STEP + 1, STEPS + 1)
    assert _losses(_train_rows(runs / "mp_fsdp16"), after) == pytest.approx(
        _losses(_train_rows(runs / "sp_fsdp16"), after), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_two_processes_data_parallel_matches_one_process(tmp_path):
    _run_both(tmp_path, "dp")
    _assert_same_losses(tmp_path / "runs", "dp", range(1, STEPS + 1))
