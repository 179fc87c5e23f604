"""`--resume` with a changed config: refused with the changed keys unless every change is a safe one,
and nothing in the run directory changes before the new config has been checked against the checkpoint.

One real 2-step run is trained once per module; each test works on a copy of it.
The refusals happen before anything compiles, so each case costs a config build.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY, merge
from sandbox import config as config_lib
from sandbox import rundir
from sandbox.cli import main
from sandbox.errors import UserError
from sandbox.runs import RESUME_MAY_CHANGE, check_resume
from sandbox.train.setup import load_run_state
from sandbox.train.loop import Trainer


def _one_error_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def _raw(tmp_path: Path) -> dict:
    return merge(TINY, {"name": "r", "run_root": str(tmp_path / "runs"), "data": {"cache_dir": str(tmp_path / "cache")},
                        "training": {"steps": 2, "log_every": 1}})


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path)))
    return path


def _snapshot(run_dir: Path) -> dict:
    """Every file's bytes, the lock file left out (taking the lock is not a change to the run)."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", str(_write_config(root))]) == 0
    return root / "runs" / "r"


@pytest.fixture
def run_copy(trained, tmp_path) -> tuple[Path, Path]:
    """(config file, run directory): a copy of the trained run under tmp_path, and its config."""
    shutil.copytree(trained, tmp_path / "runs" / "r")
    return _write_config(tmp_path), tmp_path / "runs" / "r"


def test_resume_as_another_policy_is_refused_listing_the_keys_and_changes_nothing(run_copy, capsys):
    cfg_path, run_dir = run_copy
    before = _snapshot(run_dir)
    code = main(["train", str(cfg_path), "--resume", "--set", "precision.policy=fp16", "--set", "optimizer.lr=0.01"])
    err = capsys.readouterr().err
    assert code == 2 and _one_error_line(err), err
    assert "precision.policy 'fp32' -> 'fp16'" in err and "optimizer.lr 0.003 -> 0.01" in err
    assert "vs checkpoint 2" in err and "training.steps" in err  # names what may change
    assert _snapshot(run_dir) == before


def test_refused_resume_leaves_the_checkpoint_loadable(run_copy, capsys):
    # The failure this guards against: config.yaml rewritten by a refused resume, so
    # `sandbox sample` then builds the wrong model and cannot restore an intact checkpoint.
    cfg_path, run_dir = run_copy
    assert main(["train", str(cfg_path), "--resume", "--set", "model.n_layer=2"]) == 2
    cfg, state, step = load_run_state(run_dir)
    assert step == 2 and cfg.model.n_layer == 1 and cfg.precision.policy == "fp32"


def test_shape_change_is_explained_not_an_orbax_tree_mismatch(run_copy, capsys):
    cfg_path, run_dir = run_copy
    assert main(["train", str(cfg_path), "--resume", "--set", "model.d_model=32"]) == 2
    err = capsys.readouterr().err
    assert _one_error_line(err), err
    assert "model.d_model 64 -> 32" in err and "other shapes" in err and "cannot be loaded" in err
    assert "params/block_0/fc/kernel: float32[64, 256] -> float32[32, 128]" in err  # named, both shapes


def test_safe_changes_are_accepted_with_a_schedule_note(run_copy, capsys):
    cfg_path, run_dir = run_copy
    cfg = config_lib.load_config(cfg_path, ["training.steps=6", "training.log_every=2", "checkpoint.keep=5",
                                            "logging.tensorboard=true", "data.prefetch=1"])
    trainer = Trainer(cfg, resume=True)
    trainer.run_lock.release()
    out = capsys.readouterr().out
    assert "resuming with changed " in out and "training.steps 2 -> 6" in out and "checkpoint.keep 3 -> 5" in out
    assert "schedule's cosine decay spans training.steps, so it changes with it (2 -> 6)" in out
    assert config_lib.read_yaml(run_dir / "config.yaml")["training"]["steps"] == 6


def test_the_checkpoint_record_wins_over_a_rewritten_config_yaml(run_copy, capsys):
    # A run damaged by the old behaviour: config.yaml says fp16, the checkpoint was saved under fp32.
    cfg_path, run_dir = run_copy
    raw = config_lib.read_yaml(run_dir / "config.yaml")
    raw["precision"]["policy"] = "fp16"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path), "--resume", "--set", "precision.policy=fp16"]) == 2
    assert "precision.policy 'fp32' -> 'fp16'" in capsys.readouterr().err
    trainer = Trainer(config_lib.load_config(cfg_path), resume=True, quiet=True)  # fp32 matches the checkpoint
    trainer.run_lock.release()
    assert config_lib.read_yaml(run_dir / "config.yaml")["precision"]["policy"] == "fp32"


# ----------------------------------------------------------------- the rule itself, without a checkpoint


def _run_with_config_yaml(tmp_path: Path, **sets) -> tuple[Path, config_lib.Config]:
    raw = _raw(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    return run_dir, config_lib.from_dict(config_lib.apply_overrides(raw, [f"{k}={v}" for k, v in sets.items()]))


def test_every_documented_safe_key_may_change(tmp_path):
    sets = {"training.steps": 9, "training.eval_every": 3, "training.eval_batches": 1, "training.log_every": 3,
            "checkpoint.every": 3, "checkpoint.keep": 1, "logging.jsonl": "false", "data.prefetch": 4,
            "data.cache_dir": "elsewhere", "run_root": "/somewhere/else"}
    run_dir, cfg = _run_with_config_yaml(tmp_path, **sets)
    notes = check_resume(run_dir, cfg)
    assert "training.steps 2 -> 9" in notes[0] and "run_root" not in notes[0]  # where the run lives is no change
    assert all(any(k.startswith(s.rstrip("*")) for s in RESUME_MAY_CHANGE) for k in sets if k != "run_root")


def test_a_fixed_decay_keeps_the_schedule_and_says_so(tmp_path):
    run_dir, cfg = _run_with_config_yaml(tmp_path, **{"optimizer.decay_steps": 2})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg)))
    cfg = config_lib.replace(cfg, training={"steps": 8})
    assert "fixed by optimizer.decay_steps=2" in check_resume(run_dir, cfg)[1]


@pytest.mark.parametrize("key, value", [("seed", 1), ("precision.loss_scale.init_scale", 2.0),
                                        ("optimizer.grad_clip", 0.0), ("objective.label_smoothing", 0.1),
                                        ("data.synthetic.seed", 3)])
def test_changes_to_the_maths_are_refused(tmp_path, key, value):
    run_dir, cfg = _run_with_config_yaml(tmp_path, **{key: value})
    with pytest.raises(UserError, match=f"--resume with a changed config \\(vs config.yaml\\): {key} "):
        check_resume(run_dir, cfg)


def test_no_previous_config_means_nothing_to_compare(tmp_path):
    cfg = config_lib.from_dict(_raw(tmp_path))
    assert check_resume(tmp_path / "runs" / "r", cfg) == []


def test_a_resume_onto_another_mesh_is_accepted_and_says_it_matches_to_rounding_only(tmp_path):
    # A checkpoint restores onto any mesh (orbax reshards it; tests/test_sharding.py resumes a 2x2 run on
    # one device), so moving a run to fewer or more devices is a resume, not a new run. What a step
    # computes is the same, but its sums over devices may add in another order.
    run_dir, cfg = _run_with_config_yaml(tmp_path, **{"mesh.data": 2, "mesh.fsdp": 2})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg)))
    cfg = config_lib.replace(cfg, mesh={"data": -1, "fsdp": 1})
    notes = check_resume(run_dir, cfg)
    assert "mesh.data 2 -> -1" in notes[0] and "mesh.fsdp 2 -> 1" in notes[0]
    assert any("another mesh" in n and "not bit for bit" in n for n in notes), notes
