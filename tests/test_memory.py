"""The memory estimate: its parameter count is the real model's, and a config over the limit is refused."""

from __future__ import annotations

import os

import jax
import pytest

from sandbox import memory
from sandbox.errors import UserError
from sandbox.model import GPT, count_params
from sandbox.precision.policy import make_policy


@pytest.mark.parametrize("sets", [
    (),
    ("model.positions=rotary", "model.mlp_ratio=3", "model.vocab_size=300"),
    ("model.n_layer=3", "model.d_model=48", "model.n_head=4", "model.context=40"),
])
def test_param_formula_matches_the_initialised_model(tiny, sets):
    cfg = tiny(sets=sets)
    model = GPT(cfg.model, make_policy(cfg.precision))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 4), "int32")))
    assert memory.param_count(cfg.model) == count_params(shapes["params"])


def test_activation_estimate_follows_the_documented_formula(tiny):
    cfg = tiny(sets=["training.batch_size=8", "optimizer.accum_steps=2"])
    m, b = cfg.model, 4
    per_token = m.n_layer * (10 * m.d_model + 2 * m.mlp_ratio * m.d_model + 2 * m.n_head * m.context) \
        + 3 * m.vocab_size
    est = memory.estimate(cfg)
    assert est.microbatch == b and est.activation_bytes == 4 * b * m.context * per_token
    assert est.state_bytes == 20 * est.params


def test_a_config_over_the_limit_is_refused_with_the_figures(tiny, monkeypatch):
    cfg = tiny()
    est = memory.estimate(cfg)
    monkeypatch.setattr(memory, "available_memory", lambda: (est.total_bytes - 1, "test RAM"))
    with pytest.raises(UserError) as e:
        memory.check_fits(cfg)
    msg = str(e.value)
    assert "do not fit" in msg and "test RAM" in msg and f"{est.params:,} parameters" in msg and "\n" not in msg
    monkeypatch.setattr(memory, "available_memory", lambda: (est.total_bytes, "test RAM"))
    assert memory.check_fits(cfg) == est


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="host RAM is the limit on CPU only")
def test_available_memory_on_cpu_is_the_host_ram():
    limit, where = memory.available_memory()
    assert where == "host RAM" and limit == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
