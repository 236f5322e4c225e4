"""Sound output bounds for torch.fx graphs: IBP, CROWN-IBP, CROWN and α-CROWN, for L∞ and L2
input sets. See docs/bounds.md."""

from certonnx.bounds.core import NORMS, InputSet, Interval, margin_matrix
from certonnx.bounds.engine import BoundedModule, trace
from certonnx.bounds.registry import METHODS, register, support_table

__all__ = [
    "METHODS", "NORMS", "BoundedModule", "InputSet", "Interval", "margin_matrix", "register", "support_table", "trace",
]
