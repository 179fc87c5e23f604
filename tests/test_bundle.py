"""Failure bundles are input: every field of meta.json, and the batch, is checked before use.

A real bundle of a tiny run's state is written once. Each case damages one
field (wrong type, negative, huge, missing, NaN, or an inner value) and
`sandbox replay` must exit 2 with one line naming meta.json (or the damaged
file) and the field, before compiling anything. meta.json has no checksum of
its own, so these checks are all that stands between it and the replay.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sandbox.cli import main
from sandbox.forensics import bundle as bundle_lib
from sandbox.rundir import file_sha256

FIELDS = ("format", "failed_step", "seed", "rng_rule", "policy", "config", "devices", "recorded", "history",
          "state_leaves", "batch_leaves", "sha256")
MISSING = object()
WHOLE = {"wrong_type_str": "x", "wrong_type_list": [1, "x"], "wrong_type_map": {"x": 1}, "negative": -1,
         "huge": 2**70, "huge_float": 1e300, "missing": MISSING, "nan": float("nan")}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from conftest import tiny_config
    from sandbox.train.loop import build, initial_state

    root = tmp_path_factory.mktemp("bundle")
    cfg = tiny_config(root, "b", sets=["training.steps=4"])
    run = build(cfg)
    batch = run.pipeline.train_batch(1).as_dict()
    history = [{"step": 1, "loss": 2.5, "grad_norm": 1.0}, {"step": 2, "loss": float("nan")}]
    state = initial_state(run)
    return bundle_lib.save_bundle(root / "failure", cfg, state._replace(step=np.int32(2)), batch, 1, history)


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _with_meta(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = _meta(dst)
    edit(meta)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def _set(key, value):
    def edit(meta):
        if value is MISSING:
            del meta[key]
        else:
            meta[key] = value
    return edit


def _refused(path: Path, capsys, *names: str) -> str:
    code = main(["replay", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def test_intact_bundle_loads(bundle_dir):
    b = bundle_lib.load_bundle(bundle_dir)
    assert b.failed_step == 1 and int(b.arrays["step"]) == 1
    assert "stopped at step 2 (numbered as in metrics.jsonl)" in (bundle_dir / "summary.txt").read_text()


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_every_meta_field_is_checked(bundle_dir, tmp_path, capsys, field, kind):
    bad = _with_meta(bundle_dir, tmp_path / "b", _set(field, WHOLE[kind]))
    err = _refused(bad, capsys, "meta.json")
    assert field in err or "not a sandbox-failure-bundle" in err, err


def _inner(path: tuple, value):
    def edit(meta):
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


def _first_leaf(meta) -> str:
    return sorted(meta["state_leaves"])[0]


INNER = {
    "failed_step_past_the_run": (("failed_step",), 4),  # a 4-step run has steps 0..3
    "failed_step_not_the_states": (("failed_step",), 2),  # state.safetensors holds step 1
    "seed_not_the_configs": (("seed",), 7),
    "config_bad_value": (("config", "model", "n_layer"), 0),
    "config_unknown_key": (("config", "bogus"), 1),
    "recorded_loss_text": (("recorded", "loss"), "lots"),
    "recorded_unknown_metric": (("recorded", "junk"), 1.0),
    "history_row_not_a_map": (("history", 0), 5),
    "history_step_negative": (("history", 0, "step"), -3),
    "history_step_after_the_failure": (("history", 0, "step"), 9),
    "history_value_a_list": (("history", 0, "loss"), [1, 2]),
    "leaf_dtype_unknown": (("state_leaves", "step", "dtype"), "object"),
    "leaf_shape_negative": (("state_leaves", "step", "shape"), [-1]),
    "leaf_shape_huge": (("state_leaves", "step", "shape"), [2**40, 2**40]),
    "leaf_shape_nan": (("state_leaves", "step", "shape"), [float("nan")]),
    "leaf_info_missing_dtype": (("batch_leaves", "inputs"), {"shape": [16, 32]}),
    "sha256_not_hex": (("sha256", "summary.txt"), "zz" * 32),
}


@pytest.mark.parametrize("case", sorted(INNER))
def test_inner_fields_are_checked(bundle_dir, tmp_path, capsys, case):
    path, value = INNER[case]
    bad = _with_meta(bundle_dir, tmp_path / "b", _inner(path, value))
    err = _refused(bad, capsys)
    assert "meta.json" in err or "state.safetensors" in err, err


def _rewrite_batch(src: Path, dst: Path, edit) -> Path:
    """A bundle whose batch.safetensors was replaced (checksum updated, so only the content check can refuse)."""
    shutil.copytree(src, dst)
    batch = load_file(str(dst / "batch.safetensors"))
    edit(batch)
    save_file(batch, str(dst / "batch.safetensors"))
    meta = _meta(dst)
    meta["batch_leaves"] = {k: {"dtype": v.dtype.name, "shape": list(v.shape)} for k, v in batch.items()}
    meta["sha256"]["batch.safetensors"] = file_sha256(dst / "batch.safetensors")
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("case", ["out_of_vocabulary", "negative_token", "float_tokens", "wrong_shape", "extra"])
def test_batch_must_be_tokens_the_model_can_embed(bundle_dir, tmp_path, capsys, case):
    def edit(batch):
        if case == "out_of_vocabulary":
            batch["inputs"][0, 0] = 10**6
        elif case == "negative_token":
            batch["targets"][0, 0] = -1
        elif case == "float_tokens":
            batch["inputs"] = batch["inputs"].astype(np.float32)
        elif case == "wrong_shape":
            batch["inputs"] = batch["inputs"][:, :5].copy()
        else:
            batch["junk"] = np.zeros(3, np.float32)

    bad = _rewrite_batch(bundle_dir, tmp_path / "b", edit)
    _refused(bad, capsys, "batch.safetensors")
