"""sandbox: a JAX mixed-precision training lab."""

from sandbox import _malloc

_malloc.tune()  # before JAX allocates: XLA:CPU's per-step temporaries stop faulting in (sandbox/_malloc.py)

__version__ = "0.1.0"
