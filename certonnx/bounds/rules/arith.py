"""Element-wise arithmetic: Add/Sub of two perturbed tensors (residuals), and
Add/Sub/Mul/Div/Neg with constants (normalization layers, scaling)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from certonnx.bounds.core import Interval
from certonnx.bounds.registry import AMat, Rule, Value, register
from certonnx.bounds.rules.common import const_for_A, sum_bias, unbroadcast
from certonnx.errors import UnsupportedOpError

_OPS = {
    operator.add: "Add", torch.add: "Add", "add": "Add",
    operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub",
    operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul",
    operator.truediv: "Div", torch.div: "Div", "div": "Div",
}


def _op_of(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)  # type: ignore[arg-type]
        if type(mod).__name__ == "OnnxBinaryMathOperation":
            f = mod.math_op_function
            name = getattr(f, "__name__", "")
            if f is torch.add:
                return "Add"
            if f is torch.sub:
                return "Sub"
            if f is torch.mul:
                return "Mul"
            if "div" in name:
                return "Div"
        return None
    key = node.target if node.op == "call_function" else str(node.target)
    return _OPS.get(key)  # type: ignore[arg-type]


def _scalar_or_none(c: object) -> float | None:
    if isinstance(c, (int, float)):
        return float(c)
    if isinstance(c, torch.Tensor) and c.numel() == 1:
        return float(c)
    return None


@register
class BinaryArithRule(Rule):
    label = "Arith"
    module_types = ()
    onnx2torch_names = ("OnnxBinaryMathOperation",)
    functions = tuple(k for k in _OPS if not isinstance(k, str))
    method_names = tuple(k for k in _OPS if isinstance(k, str))

    @classmethod
    def matches(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        return _op_of(node, gm) is not None

    def __init__(self, node, gm, pert) -> None:  # type: ignore[no-untyped-def]
        super().__init__(node, gm, pert)
        self.op = _op_of(node, gm)
        self.label = self.op or "Arith"  # type: ignore[misc]
        mod = self.module
        if mod is not None and getattr(mod, "broadcast", None) == 1 and getattr(mod, "axis", None) is not None:
            raise UnsupportedOpError(self.op or "Arith", node.name, "old-style broadcast with axis")
        if node.kwargs.get("alpha") not in (None, 1):
            raise UnsupportedOpError(self.op or "Arith", node.name, "alpha != 1")

    def check(self, gm) -> None:  # type: ignore[no-untyped-def]
        if self.op in ("Mul", "Div") and len(self.pert) == 2:
            raise UnsupportedOpError(self.op, self.node.name, "product of two input-dependent tensors")
        if self.op == "Div" and self.pert == [1]:
            raise UnsupportedOpError(self.op, self.node.name, "division by an input-dependent tensor")
        if self.op == "Div" and self.node.kwargs.get("rounding_mode") is not None:
            raise UnsupportedOpError(self.op, self.node.name, "integer division")

    def _operands(self, vals: Sequence[Value]) -> tuple[Value, Value]:
        return vals[0], vals[1]

    # -- IBP -------------------------------------------------------------------------------
    def ibp(self, vals: Sequence[Value]) -> Interval:
        a, b = self._operands(vals)
        if self.op in ("Add", "Sub") and len(self.pert) == 2:
            if self.op == "Add":
                return Interval(a.lower + b.lower, a.upper + b.upper)
            return Interval(a.lower - b.upper, a.upper - b.lower)
        if self.op == "Add":
            itv, c = (a, b) if self.pert == [0] else (b, a)
            return Interval(itv.lower + c, itv.upper + c, _shift_ball(itv, c))
        if self.op == "Sub":
            if self.pert == [0]:
                return Interval(a.lower - b, a.upper - b, _shift_ball(a, -b if not isinstance(b, Interval) else 0))
            return Interval(a - b.upper, a - b.lower, _scale_ball(b, -1.0, a))
        # Mul / Div by a constant
        itv, c = (a, b) if self.pert == [0] else (b, a)
        k = c if self.op == "Mul" else 1.0 / c
        x1, x2 = itv.lower * k, itv.upper * k
        return Interval(torch.minimum(x1, x2), torch.maximum(x1, x2), _scale_ball(itv, k, 0.0))

    # -- CROWN -----------------------------------------------------------------------------
    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value]):  # type: ignore[no-untyped-def]
        a, b = self._operands(vals)
        y_nd = len(self.out_shape) + 1
        outs: list[tuple[AMat, AMat]] = []
        if len(self.pert) == 2:  # Add/Sub of two perturbed tensors
            sign = 1.0 if self.op == "Add" else -1.0
            for j, s in ((0, 1.0), (1, sign)):
                shp = self.in_shapes[j]
                outs.append(tuple(unbroadcast(A * s, shp) if A is not None else None for A in (lA, uA)))  # type: ignore[arg-type]
            return outs, 0.0, 0.0
        (i,) = self.pert
        shp = self.in_shapes[0]
        c = const_for_A(b if i == 0 else a, y_nd)
        if self.op == "Add":
            k, off = 1.0, c
        elif self.op == "Sub":
            k, off = (1.0, -c) if i == 0 else (-1.0, c)  # type: ignore[operator]
        elif self.op == "Mul":
            k, off = c, 0.0
        else:
            k, off = 1.0 / c, 0.0  # type: ignore[operator]
        res = []
        bias = []
        for A in (lA, uA):
            if A is None:
                res.append(None)
                bias.append(0.0)
                continue
            res.append(unbroadcast(A * k, shp))
            bias.append(sum_bias(A, off) if _nonzero(off) else 0.0)  # type: ignore[arg-type]
        return [(res[0], res[1])], bias[0], bias[1]

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        if len(self.pert) == 2:
            return None  # two branches: composed by the Lipschitz certificate, not per op
        a, b = self._operands(vals)
        c = b if self.pert == [0] else a
        if norm == "l2" and tuple(self.in_shapes[0]) != tuple(self.out_shape):
            return None  # broadcasting copies elements
        if self.op in ("Add", "Sub"):
            return 1.0
        cmax = float(torch.as_tensor(c).abs().max()) if self.op == "Mul" else float((1.0 / torch.as_tensor(c).abs()).max())
        return cmax


def _nonzero(off: object) -> bool:
    if isinstance(off, torch.Tensor):
        return True
    return off != 0.0


def _shift_ball(itv: Interval, c: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    if itv.ball is None or isinstance(c, Interval):
        return None
    center, eps = itv.ball
    try:
        return (center + c, eps)  # type: ignore[operator]
    except RuntimeError:
        return None


def _scale_ball(itv: Interval, k: object, c: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x -> k·x + c keeps an L2 ball only for a scalar k."""
    if itv.ball is None:
        return None
    ks = _scalar_or_none(k)
    if ks is None:
        return None
    center, eps = itv.ball
    return (center * ks + c, eps * abs(ks))  # type: ignore[operator]


@register
class NegRule(Rule):
    label = "Neg"
    functions = (operator.neg, torch.neg)
    method_names = ("neg",)
    onnx2torch_names = ("OnnxNeg",)

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        return Interval(-itv.upper, -itv.lower, _scale_ball(itv, -1.0, 0.0))

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value]):  # type: ignore[no-untyped-def]
        return [(-lA if lA is not None else None, -uA if uA is not None else None)], 0.0, 0.0

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return 1.0
