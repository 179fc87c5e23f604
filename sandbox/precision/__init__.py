"""Precision engine: policies, loss scaling, fp8 delayed scaling, the newer quantization recipes and
low-precision optimizer pieces. The names below are the public API (docs/api.md)."""

from sandbox.precision.fp8 import FP8_META, Fp8DotGeneral, dequantize, fp8_dot, quantize, update_fp8_meta
from sandbox.precision.loss_scale import LossScaler, LossScaleState, all_finite, nonfinite_leaf_mask, select_tree
from sandbox.precision.policy import PRESETS, Policy, make_policy, parse_policy_string



def __getattr__(name: str):  # the recipe and optimizer modules load on first use (PEP 562)
    if name in ("lowp_optim", "recipes"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FP8_META", "PRESETS", "Fp8DotGeneral", "LossScaleState", "LossScaler", "Policy", "all_finite",
           "dequantize", "fp8_dot", "lowp_optim", "make_policy", "nonfinite_leaf_mask", "parse_policy_string",
           "quantize", "recipes", "select_tree", "update_fp8_meta"]
