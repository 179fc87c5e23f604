"""Corrupt checkpoints are detected, skipped, kept aside, and never load code.

Uses a small pytree through `Checkpointer` directly (no training, no compile):
the sha256 manifest catches truncation and bit flips, `newest_valid` walks
back past them, and a pickle planted in place of a checkpoint file is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import orbax.checkpoint as ocp

from sandbox.checkpoint import MANIFEST, Checkpointer, abstract_of, checkpoint_dir, write_manifest
from sandbox.errors import UserError
from sandbox.train.loop import train


def _state(v):
    return {"w": jnp.full((64,), float(v)), "b": jnp.arange(8.0) + v}


def _saved(tmp_path, steps=(1, 2, 3)):
    ck = Checkpointer(tmp_path / "run", keep=10)
    for s in steps:
        ck.save(s, _state(s), {"step": s})
    return ck


def _data_files(step_dir):
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def test_bit_flip_and_truncation_are_detected_and_skipped(tmp_path, capsys):
    ck = _saved(tmp_path)
    assert [ck.verify(s) for s in (1, 2, 3)] == [None, None, None]
    f3 = _data_files(ck.directory / "3")[0]
    raw = bytearray(f3.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f3.write_bytes(bytes(raw))
    f2 = _data_files(ck.directory / "2")[0]
    f2.write_bytes(f2.read_bytes()[:10])
    assert "checksum mismatch" in ck.verify(3) and "checksum mismatch" in ck.verify(2)
    with pytest.raises(UserError, match="corrupt checkpoint"):
        ck.restore(3, abstract_of(_state(0)))
    messages = []
    assert ck.newest_valid(report=messages.append) == 1
    assert len(messages) == 2 and all("moved aside" in m for m in messages), messages
    assert (ck.directory / "3.corrupt").is_dir() and (ck.directory / "2.corrupt").is_dir()  # kept, not deleted
    state, record = ck.restore(1, abstract_of(_state(0)))
    assert record["step"] == 1 and np.array_equal(np.asarray(state["w"]), np.full(64, 1.0))
    # training on from step 1 saves steps 2 and 3 again instead of being skipped
    ck.save(2, _state(20), {"step": 2})
    ck.save(3, _state(30), {"step": 3})
    state, _ = ck.restore(3, abstract_of(_state(0)))
    assert float(state["w"][0]) == 30.0 and ck.verify(3) is None
    ck.close()


def test_missing_manifest_means_interrupted_save(tmp_path):
    ck = _saved(tmp_path, steps=(1, 2))
    os.remove(ck.directory / "2" / MANIFEST)
    assert "no checksum manifest" in ck.verify(2)
    ro = Checkpointer(tmp_path / "run", read_only=True)
    assert ro.newest_valid(report=lambda m: None) == 1
    assert (ck.directory / "2").is_dir()  # read-only readers skip, never move
    ck.close()
    ro.close()


def test_save_at_existing_corrupt_step_moves_it_aside(tmp_path, capsys):
    ck = _saved(tmp_path, steps=(1,))
    (ck.directory / "1" / "record" / "metadata").write_text("{}")
    ck.save(1, _state(7), {"step": 1})
    assert "moved aside to 1.corrupt" in capsys.readouterr().err
    assert ck.verify(1) is None and (ck.directory / "1.corrupt").is_dir()
    state, _ = ck.restore(1, abstract_of(_state(0)))
    assert float(state["w"][0]) == 7.0
    ck.close()


class _Payload:
    def __reduce__(self):
        return (open, ("PWNED-by-checkpoint", "w"))


@pytest.mark.parametrize("target", ["record/metadata", "state/_METADATA"])
def test_planted_pickle_is_refused_even_with_a_matching_manifest(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    ck = _saved(tmp_path, steps=(1,))
    step_dir = ck.directory / "1"
    (step_dir / target).write_bytes(pickle.dumps(_Payload()))
    write_manifest(step_dir)  # an attacker who also rewrote the checksums
    with pytest.raises(UserError, match="corrupt or incompatible checkpoint") as e:
        ck.restore(1, abstract_of(_state(0)))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED-by-checkpoint").exists()
    ck.close()
    jax.clear_caches()


# ----------------------------------------------------------------- issue 14.6: a step must hold that step


def test_symlinked_step_directory_is_damage_and_moved_aside(tmp_path):
    ck = _saved(tmp_path)
    step3 = ck.directory / "3"
    os.rename(step3, tmp_path / "real3")
    os.symlink(ck.directory / "1", step3)  # "3" now shows step 1's (intact) files
    assert "symbolic link" in ck.verify(3)
    messages = []
    assert ck.newest_valid(report=messages.append) == 2
    assert "moved aside" in messages[0] and (ck.directory / "3.corrupt").is_symlink()
    assert ck.verify(1) is None  # the link's target is untouched
    ck.save(3, _state(33), {"step": 3})  # saved for real, not skipped
    assert not step3.is_symlink() and ck.verify(3) is None
    state, record = ck.restore(3, abstract_of(_state(0)))
    assert record["step"] == 3 and float(state["w"][0]) == 33.0
    ck.close()


def test_link_inside_a_step_directory_is_damage(tmp_path):
    ck = _saved(tmp_path, steps=(1, 2))
    target = _data_files(ck.directory / "2")[0]
    os.rename(target, tmp_path / "moved")
    os.symlink(tmp_path / "moved", target)  # same bytes, reached through a link
    assert "symbolic link" in ck.verify(2)
    ck.close()


def test_copied_step_directory_with_another_step_is_refused(tmp_path):
    ck = _saved(tmp_path, steps=(1, 2))
    shutil.rmtree(ck.directory / "2")
    shutil.copytree(ck.directory / "1", ck.directory / "2")  # manifest matches, but it is step 1
    assert "records step 1" in ck.verify(2)
    assert ck.newest_valid(report=lambda m: None) == 1
    ck.close()


def test_empty_manifest_is_refused(tmp_path):
    ck = _saved(tmp_path, steps=(1,))
    (ck.directory / "1" / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": {}}))
    assert "covers no files" in ck.verify(1)
    ck.close()


def test_manifest_that_omits_a_file_is_refused(tmp_path):
    ck = _saved(tmp_path, steps=(1,))
    manifest = json.loads((ck.directory / "1" / MANIFEST).read_text())
    manifest["files"].pop(sorted(manifest["files"])[0])
    (ck.directory / "1" / MANIFEST).write_text(json.dumps(manifest))
    assert "not in the checksum manifest" in ck.verify(1)
    ck.close()


def test_save_over_an_intact_step_holding_another_state_replaces_it(tmp_path, capsys):
    ck = _saved(tmp_path, steps=(1, 2))
    ck.save(2, _state(2), {"step": 2})  # the same state again: kept, nothing moved
    assert not list(ck.directory.glob("2.*"))
    ck.save(2, _state(99), {"step": 2})  # another state at step 2: never silently kept
    assert "moved aside" in capsys.readouterr().err
    state, _ = ck.restore(2, abstract_of(_state(0)))
    assert float(state["w"][0]) == 99.0
    assert len(list(ck.directory.glob("2.*"))) == 1  # the old one kept for inspection
    ck.close()


BAD_MANIFESTS = [{"algorithm": "sha256", "files": []}, {"files": "abc"}, [1, 2], {}, {"files": {}},
                 {"files": {"x": 1}}]


def test_malformed_manifests_are_refused_under_python_O(tmp_path):
    """Validation must not rest on `assert` (stripped by `python -O`)."""
    ck = _saved(tmp_path, steps=range(1, len(BAD_MANIFESTS) + 1))
    ck.close()
    for step, manifest in enumerate(BAD_MANIFESTS, 1):
        (ck.directory / str(step) / MANIFEST).write_text(json.dumps(manifest))
    code = ("import pathlib, sys; from sandbox.checkpoint import verify_manifest; "
            "[print(verify_manifest(pathlib.Path(d))) for d in sys.argv[1:]]")
    dirs = [str(ck.directory / str(s)) for s in range(1, len(BAD_MANIFESTS) + 1)]
    out = subprocess.run([sys.executable, "-O", "-c", code, *dirs], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(BAD_MANIFESTS) and all("checksum manifest" in line for line in lines), lines


def _leaves(step_dir):
    """The saved state's arrays, read without a target structure (orbax's own reader)."""
    return jax.tree.leaves(ocp.PyTreeCheckpointer().restore(step_dir / "state"))


@pytest.mark.slow
def test_resume_over_a_step_linked_to_an_older_one_ends_with_the_true_final_state(tiny, capsys):
    """Issue 14.6: `checkpoints/6 -> 2` used to make the run "finish" with step-2 weights under 6."""
    cfg = tiny(sets=["training.steps=6", "checkpoint.every=2", "checkpoint.keep=5", "training.log_every=2"])
    train(cfg)
    ckpts = checkpoint_dir(cfg.run_dir)
    os.rename(ckpts / "6", ckpts.parent / "true6")
    os.symlink(ckpts / "2", ckpts / "6")
    train(cfg, resume=True)
    printed = capsys.readouterr()
    assert "moved aside to 6.corrupt" in printed.out + printed.err and "resumed at step 4" in printed.err
    assert not (ckpts / "6").is_symlink() and (ckpts / "6.corrupt").is_symlink()
    assert json.loads((ckpts / "6" / "record" / "metadata").read_text())["step"] == 6
    resumed, truth = _leaves(ckpts / "6"), _leaves(ckpts.parent / "true6")
    assert len(resumed) == len(truth) and all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(resumed, truth))


def test_damaged_checkpoint_is_reported_in_one_line_without_absl_noise(tmp_path):
    """Issue 14.14: orbax logged `ERROR:absl:Failed to json parse ...` (with the file's content) first."""
    ck = _saved(tmp_path, steps=(1, 2))
    ck.close()
    (ck.directory / "2" / "_CHECKPOINT_METADATA").write_text("{" + "x" * 5000)
    code = ("import sys; from sandbox.checkpoint import Checkpointer; "
            "print(Checkpointer(sys.argv[1]).newest_valid())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1", out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("warning: ") and "moved aside" in out.stderr, \
        out.stderr[:500]
