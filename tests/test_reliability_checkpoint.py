"""Corrupt checkpoints are detected, skipped, kept aside, and never load code.

Uses a small pytree through `Checkpointer` directly (no training, no compile):
the sha256 manifest catches truncation and bit flips, `newest_valid` walks
back past them, and a pickle planted in place of a checkpoint file is refused.
"""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sandbox.checkpoint import MANIFEST, Checkpointer, abstract_of, write_manifest
from sandbox.errors import UserError


def _state(v):
    return {"w": jnp.full((64,), float(v)), "b": jnp.arange(8.0) + v}


def _saved(tmp_path, steps=(1, 2, 3)):
    ck = Checkpointer(tmp_path / "run", keep=5)
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
