"""Bound rules, one module per op family. Importing this package registers them all."""

from certonnx.bounds.rules import activation, arith, gelu, linear, pool, shape  # noqa: F401
