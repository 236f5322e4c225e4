"""Sound output bounds for torch.fx graphs: IBP, CROWN-IBP, CROWN and α-CROWN, for L∞ and L2
input sets. See docs/bounds.md.

The names below are imported on first use, so that importing one layer of the package (the
rule contract, the registry, the input-set objects) does not import the engine."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from certonnx.bounds.core import NORMS, InputSet, Interval, margin_matrix
    from certonnx.bounds.engine import BoundedModule
    from certonnx.bounds.registry import METHODS, register, support_table
    from certonnx.graph.analysis import trace

_WHERE = {
    "NORMS": "certonnx.bounds.core", "InputSet": "certonnx.bounds.core", "Interval": "certonnx.bounds.core",
    "margin_matrix": "certonnx.bounds.core", "BoundedModule": "certonnx.bounds.engine",
    "METHODS": "certonnx.bounds.registry", "register": "certonnx.bounds.registry",
    "support_table": "certonnx.bounds.registry", "trace": "certonnx.graph.analysis",
}

__all__ = ["METHODS", "NORMS", "BoundedModule", "InputSet", "Interval", "margin_matrix", "register",
           "support_table", "trace"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'certonnx.bounds' has no attribute {name!r}")
