"""What-if: the error each dense layer's operands would have had under every recipe.

`sandbox whatif RUN [--step K]` takes a run's checkpoint (the newest, or step
K) and the batch that step trains on (the batch of step k is a pure function
of data, seed and k), and runs one forward and backward pass under the run's
own policy, recording at every nn.Dense (Flax `intercept_methods`, the model
is untouched):

    x  its input, as the GEMM reads it (compute dtype)
    w  its kernel (compute dtype: the trainer casts parameters once per step)
    g  the gradient of the cross-entropy with respect to its output (the
       gradient of a zero perturbation added to the output)

Then, for each recipe, each triple goes through the recipe's own emulated
dot (`scaled_dot` with a telemetry probe, recipes/module.py), so the numbers
are exactly what training under that recipe reports as `quant/...` for those
operands: SNR, flushed and saturated fractions, each tensor over both GEMMs
it enters (with the recipe's Hadamard transform and stochastic rounding,
keys from the run's seed and the step). The gradient is the plain CE's,
unscaled, mean over tokens; the head (kept in bf16 by default) is not
covered. Pick a recipe before training with it: the table says which
tensors a recipe would hurt, and by how much.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sandbox.errors import UserError
from sandbox.objectives import kl_objective
from sandbox.precision import exact
from sandbox.precision.policy import RECIPE_POLICIES
from sandbox.precision.recipes import preset, rounding_key, scaled_dot
from sandbox.precision.recipes.recipe import ROLES
from sandbox.precision.recipes.telemetry import N_STATS, summarize
from sandbox.train import setup
from sandbox.train.step import forward

DIMS = (((1,), (0,)), ((), ()))


def capture(run, state, batch) -> dict[str, tuple]:
    """{layer path: (x_MK, w_KN, g_MN)} of every nn.Dense, for one batch under the run's policy."""
    ctx = run.ctx
    seen: dict[str, tuple] = {}

    def loss(perturb):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if not isinstance(module, nn.Dense) or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            name = "/".join(module.path)
            x = jnp.asarray(args[0]).astype(module.dtype or jnp.float32)
            seen[name] = (x, module.get_variable("params", "kernel").astype(x.dtype))
            y = next_fun(*args, **kwargs)
            return y + perturb[name].astype(y.dtype) if name in perturb else y

        with nn.intercept_methods(interceptor):
            logits, _ = forward(ctx, state.params, state.fp8_meta, batch["inputs"])
        ce, _ = kl_objective(logits, batch["targets"], label_smoothing=ctx.label_smoothing)
        return ce, {k: v for k, v in seen.items()}

    shapes = jax.eval_shape(lambda: loss({}))[1]
    outputs = {k: jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[1],), x.dtype) for k, (x, w) in shapes.items()}
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), outputs)
    grads, operands = exact.jit(jax.grad(loss, has_aux=True))(zeros)
    return {k: (x.reshape(-1, x.shape[-1]), w, grads[k].reshape(-1, w.shape[1]))
            for k, (x, w) in operands.items()}


def recipe_stats(operands: dict, recipe, seed: int, step: int) -> dict[str, np.ndarray]:
    """{layer: [len(ROLES), N_STATS]} telemetry of `recipe` on the captured operands."""

    def one(x, w, g, key):
        probe = jnp.zeros((len(ROLES), N_STATS), jnp.float32)
        _, vjp = jax.vjp(lambda a, b, p: scaled_dot(a, b, DIMS, recipe, key=key, probe=p), x, w, probe)
        return vjp(g.astype(x.dtype))[2]

    keys = {k: rounding_key(seed, step, zlib.crc32(k.encode())) for k in operands}
    out = exact.jit(lambda ops, ks: {k: one(*ops[k], ks[k]) for k in ops})(operands, keys)
    return {k: np.asarray(v) for k, v in out.items()}


@dataclass
class WhatIf:
    run_dir: str
    step: int
    policy: str
    layers: list[str]
    recipes: list[str]
    # [recipe][layer][role] -> {"snr_db", "flushed_frac", "saturated_frac"}
    tensors: dict

    def means(self, recipe: str) -> dict:
        """Per role: SNR mean and min over layers; flushed and saturated means over all tensors."""
        t = self.tensors[recipe]
        out = {}
        for role in ROLES:
            snr = [t[layer][role]["snr_db"] for layer in self.layers]
            out[f"snr_{role}_db"] = float(np.mean(snr))
            out[f"min_snr_{role}_db"] = float(np.min(snr))
        for stat in ("flushed_frac", "saturated_frac"):
            out[stat] = float(np.mean([t[layer][role][stat] for layer in self.layers for role in ROLES]))
        return out

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "step": self.step, "policy": self.policy, "layers": self.layers,
                "recipes": self.recipes, "summary": {r: self.means(r) for r in self.recipes},
                "tensors": self.tensors}


def whatif(run_dir: str | Path, step: int | None = None, recipes=RECIPE_POLICIES) -> WhatIf:
    unknown = [r for r in recipes if r not in RECIPE_POLICIES]
    if unknown:
        raise UserError(f"whatif --recipes: unknown {', '.join(unknown)} (choose from {', '.join(RECIPE_POLICIES)})")
    cfg, state, step = setup.load_run_state(run_dir, step)
    run = setup.build(cfg)
    batch = setup.place_batch(run, run.pipeline.train_batch(step))  # what step `step + 1` trains on
    operands = capture(run, state, batch)
    tensors = {}
    for name in recipes:
        stats = recipe_stats(operands, preset(name), cfg.seed, step)
        tensors[name] = {layer: {role: {k: float(v) for k, v in summarize(stats[layer][i]).items()}
                                 for i, role in enumerate(ROLES)} for layer in operands}
    return WhatIf(str(run_dir), step, run.policy.name, sorted(operands), list(recipes), tensors)


def format_whatif(w: WhatIf) -> str:
    lines = [f"what-if for {w.run_dir} at step {w.step} (trained under {w.policy}): quantization error each "
             f"dense layer's operands would have had under each recipe (forward + backward GEMM).", "",
             "| recipe | SNR in (dB) | SNR w (dB) | SNR grad (dB) | worst tensor (dB) | flushed | saturated |",
             "|---|---|---|---|---|---|---|"]
    for r in w.recipes:
        m = w.means(r)
        worst_layer, worst_role = min(((layer, role) for layer in w.layers for role in ROLES),
                                      key=lambda lr: w.tensors[r][lr[0]][lr[1]]["snr_db"])
        worst = w.tensors[r][worst_layer][worst_role]["snr_db"]
        lines.append(f"| {r} | {m['snr_input_db']:.1f} | {m['snr_kernel_db']:.1f} | {m['snr_output_grad_db']:.1f} "
                     f"| {worst:.1f} ({worst_layer} {worst_role}) | {m['flushed_frac']:.2e} "
                     f"| {m['saturated_frac']:.2e} |")
    lines += ["", "SNR per tensor (dB):", "",
              "| tensor | " + " | ".join(w.recipes) + " |", "|---|" + "---|" * len(w.recipes)]
    for layer in w.layers:
        for role in ROLES:
            lines.append(f"| {layer} {role} | " + " | ".join(f"{w.tensors[r][layer][role]['snr_db']:.1f}"
                                                           for r in w.recipes) + " |")
    lines += ["", "SNR = 10 log10(sum x^2 / sum (x - Q(x))^2); every 3 dB is a factor 2 in error energy, "
              "6 dB one bit. flushed: nonzero elements quantized to 0; saturated: elements clipped at the "
              "format's max."]
    return "\n".join(lines)
