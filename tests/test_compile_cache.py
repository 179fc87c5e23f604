"""The test processes' compile cache (tests/conftest.py).

A program compiled again in the same test process is a cache hit that computes the same bits;
inside `fresh_compiles` XLA compiles it again; and the product never turns the cache on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import dispatch  # BACKEND_COMPILE_EVENT: the event name has no public constant

from tests.conftest import COMPILE_CACHE_MIN_SECONDS, REPO

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Compiles:
    """JAX's compile event covers a cache lookup too: XLA compiled `requests - hits` times."""

    def __init__(self):
        self.requests, self.hits = 0, 0

    def on_duration(self, event, duration, **kw):
        self.requests += event == dispatch.BACKEND_COMPILE_EVENT and "cache_probe" in kw.get("fun_name", "")

    def on_event(self, event, **kw):
        self.hits += event == CACHE_HIT_EVENT

    @property
    def by_xla(self) -> int:
        return self.requests - self.hits


@pytest.fixture
def compiles():
    # cache every compile here: this test's programs compile faster than the suite's threshold
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    log = Compiles()
    jax.monitoring.register_event_duration_secs_listener(log.on_duration)
    jax.monitoring.register_event_listener(log.on_event)
    try:
        yield log
    finally:
        jax.monitoring.unregister_event_duration_listener(log.on_duration)
        jax.monitoring.unregister_event_listener(log.on_event)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)


def _twice(tag: float):
    """The same program (a constant no other test uses) jitted twice, as two runs of one config do."""
    x = jnp.linspace(-3.0, 3.0, 1000, dtype=jnp.float32)
    outs = []
    for _ in range(2):
        def cache_probe(v):  # a new function each time: JAX's in-memory caches hold the one before
            return jnp.cumsum(jnp.sin(v) * tag) / (1.0 + v * v)

        outs.append(np.asarray(jax.jit(cache_probe)(x)))
    return outs


def _unique_tag(base: float) -> float:
    """A constant of this process's own: no other worker's compile of the program can come first."""
    return base + os.getpid() / 2**22


def test_a_program_compiled_again_in_a_test_process_is_a_hit_with_the_same_bits(compiles):
    first, second = _twice(_unique_tag(1.0))
    assert (compiles.requests, compiles.hits, compiles.by_xla) == (2, 1, 1)
    assert first.tobytes() == second.tobytes()


def test_fresh_compiles_compiles_every_time(compiles, fresh_compiles):
    first, second = _twice(_unique_tag(2.0))
    assert (compiles.requests, compiles.hits, compiles.by_xla) == (2, 0, 2)
    assert first.tobytes() == second.tobytes()


def test_the_product_never_turns_the_cache_on(tmp_path):
    """A run, in a process without the tests' settings, compiles with no cache directory set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {"JAX_PLATFORMS": "cpu"}
    code = textwrap.dedent(f"""
        from pathlib import Path

        import jax
        from sandbox.train import loop
        from tests.conftest import tiny_config
        result = loop.train(tiny_config(Path({str(tmp_path)!r}), sets=["training.steps=2"]), quiet=True)
        print(result.status, jax.config.jax_compilation_cache_dir)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["finished", "None"]
