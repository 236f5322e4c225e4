"""Shape and indexing ops: reshape/flatten/squeeze, transpose, slice, pad, gather, concat,
identity, and shape queries."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from certonnx.bounds.core import AMat, Interval
from certonnx.bounds.rounding import CAST_MAX, CAST_TINY, CAST_UNIT
from certonnx.bounds.rule import BackwardResult, Rule, Value, register
from certonnx.bounds.rules.common import (
    MonotoneLinearRule,
    check_per_sample,
    const_for_A,
    sum_bias,
    with_rounding,
)
from certonnx.errors import UnsupportedOpError


def _check_batch(rule: Rule, out: torch.Tensor, batch: int) -> None:
    if out.ndim == 0 or out.shape[0] != batch:
        raise UnsupportedOpError(rule.label, rule.node.name, "op mixes the batch dimension with others")


@register
class ReshapeRule(Rule):
    """Any op that only re-views each sample's elements in the same order."""

    label = "Reshape"
    reorders_only = True
    ibp_intermediate = True
    module_types: ClassVar[tuple[type, ...]] = (nn.Flatten, nn.Unflatten)
    functions: ClassVar[tuple[Callable[..., Any], ...]] = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
    method_names: ClassVar[tuple[str, ...]] = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous")
    onnx2torch_names: ClassVar[tuple[str, ...]] = (
        "OnnxReshape", "OnnxFlatten", "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes",
        "OnnxUnsqueezeStaticAxes", "OnnxUnsqueezeDynamicAxes",
    )

    def check(self, gm: fx.GraphModule) -> None:
        if self.pert != [0]:
            raise UnsupportedOpError(self.label, self.node.name, "shape must not depend on the input")

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        lo = self.call_with(vals, {0: itv.lower})
        _check_batch(self, lo, itv.lower.shape[0])
        hi = self.call_with(vals, {0: itv.upper})
        ball = None
        if itv.ball is not None:
            center, eps, norm = itv.ball
            ball = (center.reshape(lo.shape), eps, norm)
        return Interval(lo, hi, ball)

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.call_with(vals, {0: errs[0]})

    def check_batch(self, vals: Sequence[Value]) -> None:
        check_per_sample(self, vals)

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        shp = self.in_shapes[0]

        def f(A: AMat) -> AMat:
            return None if A is None else A.reshape(*A.shape[:2], *shp)

        return [(f(lA), f(uA))], 0.0, 0.0

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return 1.0


@register
class IdentityRule(ReshapeRule):
    label = "Identity"
    module_types = (nn.Identity, nn.Dropout)
    onnx2torch_names = ("OnnxCopyIdentity",)
    method_names = ("clone", "detach")
    functions = ()

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        if isinstance(self.module, nn.Dropout) and self.module.training and self.module.p > 0:
            # dropout is random in training mode: bounds would not describe the function
            raise UnsupportedOpError("Dropout", self.node.name, "dropout in training mode (call .eval())")


_METHOD_DTYPES = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def cast_target(node: fx.Node, gm: fx.GraphModule) -> torch.dtype | None:
    """The dtype a cast node converts to; None for a ``.to()`` that changes no dtype."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(str(node.target)), "torch_dtype", None)
    name = str(node.target)
    if name in _METHOD_DTYPES:
        return _METHOD_DTYPES[name]
    for a in (*node.args[1:], *node.kwargs.values()):
        if isinstance(a, torch.dtype):
            return a
    return None


@register
class CastRule(Rule):
    """ONNX Cast / ``.to(dtype)`` / ``.float()`` / ``.half()`` between float types.

    The engine computes in float32 whatever the model's dtype, so a cast is the identity on
    the *values* up to the rounding of the target type: relative ``u_t`` (2⁻¹¹ for float16,
    2⁻⁸ for bfloat16, 2⁻²⁴ for float32) plus the absolute error near zero (subnormals, flush to
    zero), and ±inf beyond the type's range. Arithmetic carried out *in* a low-precision type
    would need that type's rounding model, so a cast to float16/bfloat16 is accepted only when
    every user casts straight back up; casts to integers are refused.
    """

    label = "Cast"
    onnx2torch_names = ("OnnxCast",)
    method_names = ("to", "float", "half", "bfloat16", "double")

    def __init__(self, node, gm, pert) -> None:
        super().__init__(node, gm, pert)
        self.target = cast_target(node, gm)

    def check(self, gm: fx.GraphModule) -> None:
        if self.pert != [0]:
            raise UnsupportedOpError(self.label, self.node.name, "only the cast tensor may depend on the input")
        dt = self.target
        if dt is None:
            return
        if not torch.empty(0, dtype=dt).is_floating_point():
            raise UnsupportedOpError(self.label, self.node.name, f"cast of the input to {dt}")
        if dt not in CAST_UNIT:
            raise UnsupportedOpError(self.label, self.node.name, f"cast to {dt}")
        if dt in (torch.float16, torch.bfloat16):
            for user in self.node.users:
                up = cast_target(user, gm) if self._is_cast(user, gm) else None
                if up not in (torch.float32, torch.float64):
                    raise UnsupportedOpError(
                        self.label, self.node.name,
                        f"arithmetic in {dt} after a cast (only a cast straight back to float32 is supported)")

    @classmethod
    def _is_cast(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        if node.op == "call_module":
            return type(gm.get_submodule(str(node.target))).__name__ in cls.onnx2torch_names
        return node.op == "call_method" and str(node.target) in cls.method_names

    def rounding(self, itv: Interval) -> torch.Tensor | float:
        dt = self.target
        if dt is None or dt == torch.float64:
            return 0.0
        m = itv.center.abs() + itv.radius
        err = m * CAST_UNIT[dt] + CAST_TINY[dt]
        return torch.where(m > CAST_MAX[dt], torch.full_like(m, float("inf")), err)

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor | float:
        return self.rounding(vals[0])

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        return errs[0]

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        err = self.rounding(itv)
        if isinstance(err, float) and err == 0.0:
            return Interval(itv.lower, itv.upper, itv.ball)
        return itv.widen(err)

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        err = self.rounding(vals[0])
        if isinstance(err, float):
            return [(lA, uA)], 0.0, 0.0
        bl, bu = with_rounding(0.0, 0.0, lA, uA, err)
        return [(lA, uA)], bl, bu

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        dt = self.target
        # rounding is not Lipschitz (a jump of one ulp at every rounding boundary)
        return 1.0 if dt is None or dt in (torch.float32, torch.float64) else None


@register
class IndexOpRule(MonotoneLinearRule):
    """Transpose, slice, pad, gather and expand: linear, non-negative, one perturbed input."""

    label = "Index"
    ibp_intermediate = True
    module_types = (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
    functions = (torch.transpose, torch.permute, F.pad, operator.getitem, torch.narrow)
    method_names = ("permute", "transpose", "narrow", "expand", "__getitem__")
    onnx2torch_names = (
        "OnnxTranspose", "OnnxSlice", "OnnxSliceV9", "OnnxPadStatic", "OnnxPadDynamic", "OnnxGather",
        "OnnxExpand",
    )

    def __init__(self, node: fx.Node, gm: fx.GraphModule, pert: list[int]) -> None:
        super().__init__(node, gm, pert)
        name = type(self.module).__name__ if self.module is not None else str(getattr(node.target, "__name__", node.target))
        for key, lab in (("ranspose", "Transpose"), ("ermute", "Transpose"), ("lice", "Slice"), ("getitem", "Slice"),
                         ("ad", "Pad"), ("ather", "Gather"), ("xpand", "Expand"), ("arrow", "Slice")):
            if key in name:
                self.label = lab
                break
        # expand, gather, indexing with index lists and reflect/replicate padding repeat
        # elements; transposes, slices and constant padding never do
        self.may_copy = self.label in ("Expand", "Gather", "Slice", "Pad")

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        if self.pert != [0]:
            raise UnsupportedOpError(self.label, self.node.name, "indices must not depend on the input")


    # lipschitz: MonotoneLinearRule's exact bound for non-negative maps (repeated indices,
    # expand and reflect padding raise the L2 constant above 1)

    def ibp(self, vals: Sequence[Value]) -> Interval:
        out = super().ibp(vals)
        _check_batch(self, out.lower, vals[0].lower.shape[0])
        if tuple(out.lower.shape[1:]) != tuple(self.out_shape) and self.out_shape:
            raise UnsupportedOpError(self.label, self.node.name, "output shape depends on the batch size")
        return out


@register
class ConcatRule(Rule):
    label = "Concat"
    ibp_intermediate = True
    functions = (torch.cat, torch.concat)
    onnx2torch_names = ("OnnxConcat",)

    def compose_lipschitz(self, vals: Sequence[Value], norm: str, ins: Sequence[float]) -> float | None:
        # the parts are disjoint coordinates of the output: ‖Δy‖₂² = Σ‖Δpart‖₂², ‖Δy‖∞ = max
        return math.sqrt(sum(p * p for p in ins)) if norm == "l2" else max(ins)

    def _dim(self) -> int:
        if self.module is not None:
            d = int(getattr(self.module, "axis"))  # noqa: B009 - an onnx2torch attribute
        else:
            d = int(str(self.node.kwargs.get("dim", self.node.args[1] if len(self.node.args) > 1 else 0)))
        return d

    def check(self, gm: fx.GraphModule) -> None:
        if self._dim() == 0:
            raise UnsupportedOpError(self.label, self.node.name, "concatenation along the batch dimension")

    def _parts(self, vals: Sequence[Value]) -> list[Value]:
        # the tensors are all leaves except a trailing dim literal (torch.cat(xs, dim))
        first = self.node.args[0]
        n_tensors = len(first) if self.module is None and isinstance(first, (list, tuple)) else len(self.node.args)
        return list(vals[:n_tensors])

    def ibp(self, vals: Sequence[Value]) -> Interval:
        parts = self._parts(vals)
        d = self._dim()
        B = next(p.lower.shape[0] for p in parts if isinstance(p, Interval))
        lo, hi = [], []
        for p in parts:
            if isinstance(p, Interval):
                lo.append(p.lower)
                hi.append(p.upper)
            else:
                t = torch.as_tensor(p)
                t = t.expand(B, *t.shape[1:]) if t.shape[0] == 1 else t
                lo.append(t)
                hi.append(t)
        return Interval(torch.cat(lo, d), torch.cat(hi, d))

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = self._parts(vals)
        it = iter(errs)
        B = errs[0].shape[0]
        pieces = []
        for p in parts:
            if isinstance(p, Interval):
                pieces.append(next(it))
            else:
                t = torch.as_tensor(p)
                pieces.append(torch.zeros((B, *t.shape[1:]), dtype=errs[0].dtype, device=errs[0].device))
        return torch.cat(pieces, self._dim())

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        parts = self._parts(vals)
        d = self._dim()
        d = d if d >= 0 else len(self.out_shape) + 1 + d
        sizes = []
        j = 0
        for p in parts:
            if isinstance(p, Interval):
                sizes.append(self.in_shapes[j][d - 1])
                j += 1
            else:
                sizes.append(torch.as_tensor(p).shape[d])
        outs: list[tuple[AMat, AMat]] = []
        biases: list[torch.Tensor | float] = [0.0, 0.0]
        for k, A in enumerate((lA, uA)):
            if A is None:
                continue
            pieces = torch.split(A, sizes, d + 1)
            for p, piece in zip(parts, pieces):
                if not isinstance(p, Interval):
                    c = const_for_A(torch.as_tensor(p), len(self.out_shape) + 1)
                    biases[k] = biases[k] + sum_bias(piece, c)
        pert_pieces: list[list[AMat]] = [[None, None] for _ in self.pert]
        for k, A in enumerate((lA, uA)):
            if A is None:
                continue
            pieces = torch.split(A, sizes, d + 1)
            q = 0
            for p, piece in zip(parts, pieces):
                if isinstance(p, Interval):
                    pert_pieces[q][k] = piece
                    q += 1
        outs = [(a, b) for a, b in pert_pieces]
        return outs, biases[0], biases[1]

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        return None  # several branches: composed by the certificate


@register
class ShapeOfRule(Rule):
    """``x.size()``, ``x.shape`` and ONNX Shape: not perturbed values, just the shape."""

    label = "Shape"
    shape_only = True
    functions = (getattr,)
    method_names = ("size", "dim")
    onnx2torch_names = ("OnnxShape",)

    @classmethod
    def matches(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        if node.op == "call_function":
            return len(node.args) > 1 and bool(node.args[1] == "shape")
        return True

    def ibp(self, vals: Sequence[Value]) -> Interval:  # pragma: no cover - never perturbed
        raise AssertionError("shape queries are not bounded")
