"""NaN forensics end to end: guard -> failure bundle -> replay names the first bad op and cause."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sandbox.cli import main
from sandbox.config import load_config, replace
from sandbox.errors import UserError
from sandbox.forensics.bundle import load_bundle, save_bundle
from sandbox.forensics.replay import replay
from sandbox.train import setup
from sandbox.train.loop import train

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "experiments" / "failures"

# recipe -> (failed step, 1-based; expected cause; a fragment of the op's module path; primitive; phase)
EXPECTED = {
    "fp16_overflow": (1, "overflow", "block_0/attention", "dot_general", "forward"),
    "naive_softmax_overflow": (1, "exp_overflow", "block_0/attention/softmax", "exp", "forward"),
    # log(0) in the loss's forward, although the step differentiates the objective on its own
    "log_softmax_underflow": (1, "log_of_zero", "naive_log_softmax", "log", "forward"),
    # 16 steps of geometric growth, then fp32 overflows in ln_f's backward (the loss is still finite)
    "lr_divergence": (17, "exploding_update", "ln_f", "mul", "backward"),
}


def _recipe(name: str, root: Path):
    return replace(load_config(RECIPES / f"{name}.yaml"), run_root=str(root))


def _fail_and_replay(name: str, root: Path):
    result = train(_recipe(name, root), overwrite=True, quiet=True, capture=save_bundle)
    assert result.status == "failed" and result.bundle is not None
    return result, replay(load_bundle(result.bundle))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_fails_deterministically_and_replay_names_cause(name, tmp_path):
    step, cause, where, primitive, phase = EXPECTED[name]
    first, report = _fail_and_replay(name, tmp_path / "a")
    again = train(_recipe(name, tmp_path / "b"), overwrite=True, quiet=True, capture=save_bundle)
    assert again.summary["failed_step"] == first.summary["failed_step"]
    if step is not None:
        assert first.summary["failed_step"] == step
    assert report.reproduced
    assert report.cause == cause
    if primitive is not None:
        assert report.origin.primitive == primitive
        assert where in report.origin.name_stack
        assert report.origin.phase == phase
    if cause == "exploding_update":  # the history explains an fp32 overflow: values diverged
        assert report.divergence[0] == cause
        assert report.origin.cause == "overflow" and report.origin.dtype == "float32"
        assert "gradient norm" in report.explanation and "ln_f" in report.explanation
    else:
        assert report.origin.cause == cause
    # The bundle holds the state before the bad step: every stored float is finite.
    for key, a in load_bundle(first.bundle).arrays.items():
        if a.dtype.kind == "f" and not key.startswith("guard"):
            assert np.isfinite(a).all(), key


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """One real bundle (the fastest recipe), shared by the bad-input tests."""
    root = tmp_path_factory.mktemp("runs")
    result = train(_recipe("naive_softmax_overflow", root), overwrite=True, quiet=True, capture=save_bundle)
    return Path(result.bundle)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_contents(bundle_dir):
    meta = json.loads((bundle_dir / "meta.json").read_text())
    assert meta["failed_step"] == 0 and meta["seed"] == 0 and "fold_in" in meta["rng_rule"]
    assert meta["config"]["precision"]["naive_softmax"] is True
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "batch.safetensors", "meta.json", "state.safetensors", "summary.txt"]
    b = load_bundle(bundle_dir)
    assert int(b.arrays["step"]) == 0 and int(b.arrays["guard/failed_step"]) == -1
    assert b.batch["inputs"].shape == (8, 32)
    assert "sandbox replay" in (bundle_dir / "summary.txt").read_text()


def test_replay_cli_text_and_json(bundle_dir, capsys, monkeypatch):
    def no_data(cfg):
        raise AssertionError("replay built the data pipeline")

    monkeypatch.setattr(setup, "make_pipeline", no_data)  # the bundle holds the batch
    assert main(["replay", str(bundle_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cause"] == "exp_overflow" and out["op"] == "exp"
    assert out["module_path"].endswith("block_0/attention/softmax") and out["reproduced"] is True
    assert out["origin"]["phase"] == "forward" and out["phase"] == "gradients"
    # op by op, the same tensors went non-finite as in the compiled step (tests/test_replay_agreement.py)
    agreed = out["agreement"]
    assert agreed["compared"] == "gradients" and agreed["same"] is True and agreed["compiled"][0] == "loss"
    assert main(["replay", str(bundle_dir)]) == 0
    text = capsys.readouterr().out
    assert "exp_overflow" in text and "policy.py" in text
    assert "op by op vs compiled step: the same non-finite loss and gradients" in text
    # One step numbering (1-based) in replay's text and JSON, summary.json and metrics.jsonl.
    run_dir = bundle_dir.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    flagged = [r["step"] for r in rows if r["split"] == "train" and r.get("nonfinite")]
    assert out["failed_step"] == summary["failed_step"] == flagged[0] == 1
    assert text.startswith(f"bundle {bundle_dir}: step 1 ") and "0-based" not in text
    # The naive-softmax ablation's remedy is to turn it off, named by its config key.
    assert out["remedies"][0]["key"] == "precision.naive_softmax" and out["remedies"][0]["value"] is False


def test_planted_pickle_is_refused(bundle_dir, tmp_path, capsys):
    bad = _copy(bundle_dir, tmp_path)
    (bad / "state.safetensors").write_bytes(pickle.dumps({"params": np.zeros(3)}))
    with pytest.raises(UserError, match="pickle, refused"):
        load_bundle(bad)
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_extra_file_and_damage_are_refused(bundle_dir, tmp_path):
    bad = _copy(bundle_dir, tmp_path)
    (bad / "extra.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(UserError, match="unexpected file extra.pkl"):
        load_bundle(bad)
    (bad / "extra.pkl").unlink()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_bundle(bad)


def test_missing_bundle_exit_2(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "nope")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["replay", str(tmp_path)]) == 2
    assert "not a failure bundle" in capsys.readouterr().err


@pytest.mark.slow
def test_bundle_from_four_devices_replays_on_one(bundle_dir, tmp_path):
    """A recipe trained data-parallel on a 4-device CPU mesh fails at the same step; its bundle
    replays in this one-device process to the same op and cause as the one-device run's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    script = "import sys; from sandbox.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", script, "train", str(RECIPES / "naive_softmax_overflow.yaml"),
         "--set", "mesh.data=4", "--set", f"run_root={tmp_path}", "--overwrite"],
        env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]  # loop.EXIT_FAILURE
    bundle = load_bundle(tmp_path / "naive_softmax_overflow" / "failure")
    assert bundle.cfg.mesh.data == 4
    assert jax.device_count() == 1
    one = replay(load_bundle(bundle_dir))
    four = replay(bundle)
    assert four.reproduced and four.failed_step == one.failed_step == 1  # 1-based, as summary.json
    assert (four.cause, four.origin.primitive, four.origin.name_stack, four.origin.phase) == \
        (one.cause, one.origin.primitive, one.origin.name_stack, one.origin.phase)
