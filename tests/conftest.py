"""Shared test helpers: tiny configs that compile and train in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import config as config_lib

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "sandbox" / "data" / "corpora" / "tinyshakespeare.txt"  # shipped: never skipped

TINY = {
    "model": {"context": 32, "n_layer": 1, "n_head": 2, "d_model": 64},
    "data": {"synthetic": {"alphabet": 8, "order": 1, "concentration": 0.3, "seed": 7}, "prefetch": 0},
    "optimizer": {"lr": 3e-3, "warmup_steps": 5},
    "training": {"steps": 30, "batch_size": 16, "eval_every": 0, "eval_batches": 2, "log_every": 5},
    "logging": {"progress": False, "tensorboard": False},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(tmp_path: Path, name: str = "tiny", overrides: dict | None = None, sets=()) -> config_lib.Config:
    raw = merge(TINY, {"name": name, "run_root": str(tmp_path / "runs"),
                       "data": {"cache_dir": str(tmp_path / "cache")}})
    raw = merge(raw, overrides or {})
    raw = config_lib.apply_overrides(raw, list(sets))
    return config_lib.from_dict(raw)


@pytest.fixture
def tiny(tmp_path):
    return lambda name="tiny", overrides=None, sets=(): tiny_config(tmp_path, name, overrides, sets)


@pytest.fixture
def shakespeare_path():
    return SHAKESPEARE
