"""ONNX import (passes, conversion, parity gate), export with certificate metadata."""

from certonnx.io.export import export
from certonnx.io.load import load
from certonnx.io.metadata import make_certificate, read_certificate

__all__ = ["load", "export", "read_certificate", "make_certificate"]
