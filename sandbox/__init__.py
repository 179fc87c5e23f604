"""sandbox: a JAX mixed-precision training lab."""

from sandbox import _malloc

_malloc.tune()  # before JAX allocates: XLA:CPU's per-step temporaries stop faulting in (sandbox/_malloc.py)

__version__ = "0.1.0"

# The most used public pieces (docs/api.md); the rest live in sandbox.precision. Resolved on first use
# (PEP 562), so `import sandbox` stays light and never starts JAX's backend: `deterministic: true`
# must still be able to set XLA_FLAGS after the package is imported (train/loop.apply_deterministic).
_EXPORTS = {"PRESETS": "sandbox.precision", "LossScaler": "sandbox.precision", "Policy": "sandbox.precision",
            "all_finite": "sandbox.precision", "make_policy": "sandbox.precision", "select_tree": "sandbox.precision",
            "load_run_state": "sandbox.train.setup"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
