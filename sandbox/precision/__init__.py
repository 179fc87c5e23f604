"""Precision engine: policies, dynamic loss scaling and fp8 delayed scaling."""
