"""RecipeDotGeneral: `scaled_dot` as a Flax dot_general module, for nn.Dense and the head.

    nn.Dense(n, dot_general_cls=partial(RecipeDotGeneral, recipe=preset("mxfp8")))

Stateless recipes (every preset but fp8_delayed, which is fp8.Fp8DotGeneral)
need two things from the caller, both optional:

* the rounding key, from the Flax rng stream QUANT_RNG. Flax folds each
  module's path (and call count) into it, so one key per step,
  `fold_in(key(seed), step)`, gives every quantized tensor its own bits: a
  pure function of (seed, step, tensor), as recipe.rounding_key asks.
  Without the stream (evaluation, sampling) the key is fixed: stochastic
  rounding only ever applies to gradients in the shipped presets, which a
  forward pass never quantizes.
* the telemetry probe, a zeros [3, telemetry.N_STATS] variable in the
  QUANT_PROBE collection. `init` declares it (so a step can build the zeros
  from `jax.eval_shape(model.init)`); a step that passes the collection in
  and differentiates with respect to it receives, as its cotangent, each
  operand's statistics (rows: input, kernel, output_grad). Not passed: no
  statistics are computed at all.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sandbox.precision.recipes.dot import scaled_dot
from sandbox.precision.recipes.recipe import ROLES, Recipe
from sandbox.precision.recipes.telemetry import N_STATS

QUANT_RNG = "quant"  # rng stream of stochastic rounding
QUANT_PROBE = "quant_probe"  # collection of telemetry probes (zeros; only their cotangents matter)
PROBE = "stats"


class RecipeDotGeneral(nn.Module):
    recipe: Recipe

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if self.is_initializing():
            self.variable(QUANT_PROBE, PROBE, jnp.zeros, (len(ROLES), N_STATS), jnp.float32)
        probe = self.get_variable(QUANT_PROBE, PROBE) if self.has_variable(QUANT_PROBE, PROBE) else None
        if self.is_initializing():
            probe = None
        key = self.make_rng(QUANT_RNG) if self.has_rng(QUANT_RNG) else jax.random.key(0)
        return scaled_dot(lhs, rhs.astype(lhs.dtype), dimension_numbers, self.recipe, precision,
                          preferred_element_type, key=key, probe=probe)
