"""Low-precision recipes: formats, recipe descriptions, quantizers, an emulated dot.

    from sandbox.precision.recipes import preset, quantize, fake_quant, scaled_dot
    recipe = preset("nvfp4")
    y = scaled_dot(x, w, (((1,), (0,)), ((), ())), recipe, key=rounding_key(seed, step, tid))

See docs/recipes.md for the design and one section per recipe.
"""

from sandbox.precision.recipes.dot import init_delayed_meta, scaled_dot, update_delayed_meta
from sandbox.precision.recipes.quantize import Scales, dequantize, fake_quant, quantize
from sandbox.precision.recipes.recipe import (
    PRESETS,
    OperandSpec,
    Recipe,
    preset,
    rounding_key,
)

__all__ = [
    "PRESETS",
    "OperandSpec",
    "Recipe",
    "Scales",
    "dequantize",
    "fake_quant",
    "init_delayed_meta",
    "preset",
    "quantize",
    "rounding_key",
    "scaled_dot",
    "update_delayed_meta",
]
