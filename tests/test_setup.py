"""The one builder (sandbox/train/setup.py): every caller gets the same parts from a config."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from sandbox import config as config_lib
from sandbox.errors import UserError
from sandbox.precision.loss_scale import LossScaler
from sandbox.train import setup


def test_parts_take_the_validated_config_sections_as_they_are(tiny):
    cfg = tiny(sets=["precision.policy=fp8", "precision.fp8.margin=2", "precision.naive_softmax=true",
                     "precision.loss_scale.init_scale=1024"])
    p = setup.parts(cfg)
    assert p.policy.fp8 is cfg.precision.fp8  # one schema: no field-by-field copy
    assert p.model.naive_softmax and p.model.policy is p.policy
    ls = cfg.precision.loss_scale
    assert p.scaler == LossScaler(mode=p.policy.loss_scaling, init_scale=ls.init_scale,
                                  growth_factor=ls.growth_factor, backoff_factor=ls.backoff_factor,
                                  growth_interval=ls.growth_interval, min_scale=ls.min_scale, max_scale=ls.max_scale)


def test_abstract_state_is_the_built_runs_initial_state(tiny):
    cfg = tiny(sets=["precision.policy=fp16"])
    run = setup.build(cfg)
    built = jax.eval_shape(lambda: setup.initial_state(run))
    alone = setup.abstract_state(cfg)
    assert jax.tree.structure(built) == jax.tree.structure(alone)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(built)] == [(x.shape, x.dtype) for x in jax.tree.leaves(alone)]


def test_run_is_typed_and_the_lean_step_shares_the_model(tiny):
    run = setup.build(tiny(sets=["precision.telemetry_every=3"]))
    assert not hasattr(run, "extra") and run.frozen == () and run.init_params is None
    assert {f.name for f in dataclasses.fields(run)} >= {"mesh", "state_shardings", "batch_sharding", "abstract_state"}
    assert run.lean_step_fn is not None and run.ctx.telemetry


def test_config_replace_validates_like_the_loader(tiny):
    cfg = tiny()
    assert config_lib.replace(cfg, model={"n_layer": 2}).model.n_layer == 2
    with pytest.raises(UserError, match="model.d_model"):
        config_lib.replace(cfg, model={"n_head": 3})  # 64 is not divisible by 3
    with pytest.raises(UserError, match="precision.loss_scale.backoff_factor"):
        config_lib.replace(cfg, precision={"loss_scale": {"backoff_factor": 2.0}})
