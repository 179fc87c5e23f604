"""Shared test helpers: tiny configs that compile and train in seconds on CPU, and a compile cache.

The compile cache. About four fifths of the default suite's time on a 2-core CPU is XLA compiling
(a tiny run's train step takes ~3-7 s to compile, its initial state and eval step ~1-2 s each), and
a quarter of that time went to programs compiled before in the same run: a resumed run, a second
run of a config, a lesson's repeats, a CLI test's subprocess. So the test processes (pytest, its
xdist workers, and every subprocess a test starts, through the inherited JAX_COMPILATION_CACHE_DIR)
share JAX's persistent compilation cache, in a directory that the first pytest process's
`pytest_configure` creates and its `pytest_unconfigure` removes; JAX's file lock keeps their reads
and writes apart. JAX keys an entry on the whole program, the compile options, the devices and the
JAX/XLA versions, and a hit is the executable that compile produced, so it computes the same bits.
The product itself never turns the cache on: it would run compiled code loaded from disk
(docs/scaling.md, "Not taken").

Tests that watch compiles happen (tests/test_fast_path.py, test_state.py), and the golden curves,
which hold the product's numerics as a cold run computes them, use the `fresh_compiles` fixture:
inside it every program is compiled by XLA again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest
from jax._src import compilation_cache  # reset_cache: the only way to switch the cache off after its first use

from sandbox import config as config_lib

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "sandbox" / "data" / "corpora" / "tinyshakespeare.txt"  # shipped: never skipped

COMPILE_CACHE_MIN_SECONDS = 0.5  # below this a compile is not cached (JAX's default: 1 s)
COMPILE_CACHE_MAX_BYTES = 8 << 30  # a limit turns on JAX's file lock (filelock, in the test extra): shared safely
_CACHE_ENV = "SANDBOX_TESTS_COMPILE_CACHE"  # the directory, set by the pytest process that made it
_CACHE_DIR = pytest.StashKey[str]()


def pytest_configure(config):
    cache = os.environ.get(_CACHE_ENV) if os.environ.get("PYTEST_XDIST_WORKER") else None
    if cache is None:  # the first pytest process (xdist's controller): it makes the directory and owns it
        cache = tempfile.mkdtemp(prefix="sandbox-tests-xla-cache-")
        config.stash[_CACHE_DIR] = cache
        os.environ[_CACHE_ENV] = cache
    # the environment, for the workers' and the tests' subprocesses; jax.config for this process
    settings = {"jax_compilation_cache_dir": cache, "jax_compilation_cache_max_size": COMPILE_CACHE_MAX_BYTES,
                "jax_persistent_cache_min_compile_time_secs": COMPILE_CACHE_MIN_SECONDS}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)


def pytest_unconfigure(config):
    cache = config.stash.get(_CACHE_DIR, None)
    if cache:  # the directory pytest_configure made, and nothing else
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def fresh_compiles():
    """No compile cache inside the test: every program is compiled by XLA, as in a product run."""
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once whether the cache is used; ask it again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


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
