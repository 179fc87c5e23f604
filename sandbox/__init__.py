"""sandbox: a JAX mixed-precision training lab."""

__version__ = "0.1.0"
