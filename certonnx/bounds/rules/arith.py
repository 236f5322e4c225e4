"""Element-wise arithmetic: Add/Sub of two perturbed tensors (residuals), and
Add/Sub/Mul/Div/Neg with constants (normalization layers, scaling)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import fx

from certonnx.bounds.core import AMat, Ball, Interval
from certonnx.bounds.rule import BackwardResult, Rule, Value, register
from certonnx.bounds.rules.common import const_for_A, sum_bias, unbroadcast, with_rounding
from certonnx.errors import UnsupportedOpError

_OPS = {
    operator.add: "Add", torch.add: "Add", "add": "Add",
    operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub",
    operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul",
    operator.truediv: "Div", torch.div: "Div", "div": "Div",
}


def _op_of(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
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
    return _OPS.get(key)


@register
class BinaryArithRule(Rule):
    label = "Arith"
    module_types = ()
    onnx2torch_names = ("OnnxBinaryMathOperation",)
    functions = tuple(k for k in _OPS if callable(k))
    method_names = tuple(k for k in _OPS if isinstance(k, str))

    @classmethod
    def matches(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        return _op_of(node, gm) is not None

    def __init__(self, node, gm, pert) -> None:
        super().__init__(node, gm, pert)
        self.op = _op_of(node, gm)
        self.label = self.op or "Arith"
        mod = self.module
        if mod is not None and getattr(mod, "broadcast", None) == 1 and getattr(mod, "axis", None) is not None:
            raise UnsupportedOpError(self.op or "Arith", node.name, "old-style broadcast with axis")
        if node.kwargs.get("alpha") not in (None, 1):
            raise UnsupportedOpError(self.op or "Arith", node.name, "alpha != 1")

    def check(self, gm: fx.GraphModule) -> None:
        if self.op in ("Mul", "Div") and len(self.pert) == 2:
            raise UnsupportedOpError(self.op, self.node.name, "product of two input-dependent tensors")
        if self.op == "Div" and self.pert == [1]:
            raise UnsupportedOpError(self.op, self.node.name, "division by an input-dependent tensor")
        if self.op == "Div" and self.node.kwargs.get("rounding_mode") is not None:
            raise UnsupportedOpError(self.op, self.node.name, "integer division")

    def _operands(self, vals: Sequence[Value]) -> tuple[Value, Value]:
        return vals[0], vals[1]

    #: an optimiser may move this addend into a neighbouring op's accumulation (a bias or a
    #: residual folded into a convolution), so the engine sizes its rounding factor from the
    #: graph's largest fan-in rather than from the 2 terms of the op itself
    fusable_addend = True

    def fan_in(self, vals: Sequence[Value]) -> int:
        return 2

    def rounding(self, vals: Sequence[Value]) -> torch.Tensor:
        """Per output element, ``γ·|exact result|``-style bound of the float error:
        ``γ (|a| + |b|)`` for a sum or difference, ``γ |c| |x|`` for a product, ``γ |x| / |c|``
        for a quotient (``|x|`` the interval's magnitude; one rounding, or two where an engine
        multiplies by a rounded reciprocal)."""
        a, b = self._operands(vals)

        def mag(v: Value) -> torch.Tensor | float:
            if isinstance(v, Interval):
                return v.center.abs() + v.radius
            return v.abs() if isinstance(v, torch.Tensor) else abs(float(v))

        if self.op in ("Add", "Sub"):
            e = mag(a) + mag(b)
        elif self.op == "Mul":
            e = mag(a) * mag(b)
        else:
            e = mag(a) / mag(b)
        e = torch.as_tensor(e)
        return e * self.gamma + self.tiny

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor:
        return self.rounding(vals)

    def check_batch(self, vals: Sequence[Value]) -> None:
        if len(self.pert) == 2:
            return
        a, b = self._operands(vals)
        c = b if self.pert == [0] else a
        if isinstance(c, torch.Tensor) and c.ndim == len(self.out_shape) + 1 and c.shape[0] != 1:
            raise UnsupportedOpError(self.op or "Arith", self.node.name,
                                     f"constant operand of shape {tuple(c.shape)} has a batch dimension")

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        a, b = self._operands(vals)
        if len(self.pert) == 2:
            return errs[0] + errs[1]
        c = b if self.pert == [0] else a
        ct = c if isinstance(c, torch.Tensor) else torch.as_tensor(float(c))
        if self.op in ("Add", "Sub"):
            return errs[0] + torch.zeros_like(ct, dtype=errs[0].dtype)  # broadcast like the op
        if self.op == "Mul":
            return errs[0] * ct.abs()
        return errs[0] / ct.abs()

    # -- IBP -------------------------------------------------------------------------------
    def ibp(self, vals: Sequence[Value]) -> Interval:
        a, b = self._operands(vals)
        err = self.rounding(vals)
        if self.op in ("Add", "Sub") and len(self.pert) == 2:
            if self.op == "Add":
                return Interval(a.lower + b.lower - err, a.upper + b.upper + err)
            return Interval(a.lower - b.upper - err, a.upper - b.lower + err)
        if self.op == "Add":
            itv, c = (a, b) if self.pert == [0] else (b, a)
            lo, hi = itv.lower + c - err, itv.upper + c + err
            return Interval(lo, hi, _affine_ball(itv, 1.0, c, lo, err))
        if self.op == "Sub":
            if self.pert == [0]:
                lo, hi = a.lower - b - err, a.upper - b + err
                return Interval(lo, hi, _affine_ball(a, 1.0, -b, lo, err))
            lo, hi = a - b.upper - err, a - b.lower + err
            return Interval(lo, hi, _affine_ball(b, -1.0, a, lo, err))
        # Mul / Div by a constant
        itv, c = (a, b) if self.pert == [0] else (b, a)
        k = c if self.op == "Mul" else 1.0 / c
        x1, x2 = itv.lower * k, itv.upper * k
        lo, hi = torch.minimum(x1, x2) - err, torch.maximum(x1, x2) + err
        return Interval(lo, hi, _affine_ball(itv, k, 0.0, lo, err))

    # -- CROWN -----------------------------------------------------------------------------
    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        a, b = self._operands(vals)
        y_nd = len(self.out_shape) + 1
        err = self.rounding(vals)
        outs: list[tuple[AMat, AMat]] = []
        if len(self.pert) == 2:  # Add/Sub of two perturbed tensors
            sign = 1.0 if self.op == "Add" else -1.0
            for j, s in ((0, 1.0), (1, sign)):
                shp = self.in_shapes[j]
                outs.append((unbroadcast(lA * s, shp) if lA is not None else None,
                             unbroadcast(uA * s, shp) if uA is not None else None))
            bl, bu = with_rounding(0.0, 0.0, lA, uA, _per_sample_err(err, y_nd))
            return outs, bl, bu
        (i,) = self.pert
        shp = self.in_shapes[0]
        c = const_for_A(b if i == 0 else a, y_nd)
        k: torch.Tensor | float
        off: torch.Tensor | float
        if self.op == "Add":
            k, off = 1.0, c
        elif self.op == "Sub":
            k, off = (1.0, -c) if i == 0 else (-1.0, c)
        elif self.op == "Mul":
            k, off = c, 0.0
        else:
            k, off = 1.0 / c, 0.0
        res: list[AMat] = []
        bias: list[torch.Tensor | float] = []
        for A in (lA, uA):
            if A is None:
                res.append(None)
                bias.append(0.0)
                continue
            res.append(unbroadcast(A * k, shp))
            bias.append(sum_bias(A, off) if _nonzero(off) else 0.0)
        bl, bu = with_rounding(bias[0], bias[1], lA, uA, _per_sample_err(err, y_nd))
        return [(res[0], res[1])], bl, bu

    def compose_lipschitz(self, vals: Sequence[Value], norm: str, ins: Sequence[float]) -> float | None:
        if len(ins) == 2 and self.op in ("Add", "Sub"):
            # ‖Δa ± Δb‖ ≤ ‖Δa‖ + ‖Δb‖, where an operand broadcast to m× its size has ‖Δ‖₂
            # multiplied by √m (each element copied m times); L∞ is unchanged by copies
            n_out = math.prod(self.out_shape)
            mult = [math.sqrt(n_out / max(1, math.prod(s))) if norm == "l2" else 1.0 for s in self.in_shapes]
            return ins[0] * mult[0] + ins[1] * mult[1]
        return super().compose_lipschitz(vals, norm, ins)

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


def _per_sample_err(err: torch.Tensor, y_nd: int) -> torch.Tensor:
    """The error tensor with a leading batch axis, for :func:`with_rounding` (a constant-only
    error has no batch axis yet)."""
    while err.ndim < y_nd:
        err = err.unsqueeze(0)
    return err


def _affine_ball(itv: Interval, k: object, c: object, out: torch.Tensor,
                 err: torch.Tensor) -> Ball | None:
    """The ball (L2 or L1, as the input's) of ``x -> k·x + c`` (then rounded), or None.

    A ball survives only a map that is a similarity up to a known factor: ``‖k ⊙ δ‖ ≤ max|k|·‖δ‖``
    (for every p-norm). Broadcasting to a larger per-sample shape copies each element the same
    number of times ``m = numel(out) / numel(in)``, so the copied perturbation has L2 norm
    ``sqrt(m)·‖δ‖₂`` and L1 norm ``m·‖δ‖₁``; and the float result lies within ``err`` of the
    exact one, a box whose norm (L2 / L1) is added to the radius. Anything else (a
    batch-dependent constant, an unexpected shape) drops the ball and leaves the sound box."""
    if itv.ball is None or isinstance(c, Interval) or isinstance(k, Interval):
        return None
    center, eps, norm = itv.ball
    try:
        new_center = center * k + c  # type: ignore[operator]
    except RuntimeError:
        return None
    if tuple(new_center.shape) != tuple(out.shape) or new_center.shape[0] != center.shape[0]:
        return None
    n_in, n_out = center[0].numel(), new_center[0].numel()
    if n_out % n_in:
        return None
    kmax = float(torch.as_tensor(k).detach().abs().max()) if not isinstance(k, (int, float)) else abs(float(k))
    box = torch.broadcast_to(err, out.shape).reshape(out.shape[0], -1)
    if norm == "l1":
        return new_center, eps * kmax * (n_out // n_in) + box.abs().sum(1), norm
    return new_center, eps * kmax * math.sqrt(n_out // n_in) + box.norm(dim=1), norm


@register
class NegRule(Rule):
    label = "Neg"
    ibp_intermediate = True
    functions = (operator.neg, torch.neg)
    method_names = ("neg",)
    onnx2torch_names = ("OnnxNeg",)

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        return errs[0]

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        ball = (-itv.ball[0], itv.ball[1], itv.ball[2]) if itv.ball is not None else None  # exact: a sign flip
        return Interval(-itv.upper, -itv.lower, ball)

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        return [(-lA if lA is not None else None, -uA if uA is not None else None)], 0.0, 0.0

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return 1.0
