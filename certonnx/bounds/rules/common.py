"""Helpers shared by the rules: broadcasting of bound matrices and vjp-based linear steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from certonnx.bounds.core import Interval
from certonnx.bounds.registry import AMat, Rule, Value


def unbroadcast(A: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sum ``A`` (``(B, S, *y)``) down to ``(B, S, *shape)`` where ``shape`` broadcast to ``y``."""
    ys = A.shape[2:]
    if tuple(ys) == tuple(shape):
        return A
    extra = len(ys) - len(shape)
    if extra > 0:
        A = A.sum(dim=tuple(range(2, 2 + extra)))
    dims = tuple(2 + i for i, (a, b) in enumerate(zip(A.shape[2:], shape)) if b == 1 and a != 1)
    if dims:
        A = A.sum(dim=dims, keepdim=True)
    return A


def const_for_A(c: torch.Tensor | float, y_ndim: int) -> torch.Tensor | float:
    """A constant that broadcasts against a perturbed ``(B, *s)`` tensor, reshaped so it
    broadcasts against bound matrices ``(B, S, *s)``: a leading batch dim of 1 is dropped."""
    if not isinstance(c, torch.Tensor):
        return c
    if c.ndim == y_ndim:
        if c.shape[0] != 1:
            from certonnx.errors import UnsupportedOpError

            raise UnsupportedOpError("per-sample constant", detail="constant operand with a batch dimension")
        return c[0]
    return c


def concretize_interval(A: torch.Tensor, itv: Interval, sign: float) -> torch.Tensor:
    """min (sign=-1) / max (sign=+1) of ``A · v`` over the box ``itv``: ``(B, S)``."""
    c = itv.center.flatten(1).unsqueeze(-1)
    r = itv.radius.flatten(1).unsqueeze(-1)
    Af = A.flatten(2)
    return torch.bmm(Af, c).squeeze(-1) + sign * torch.bmm(Af.abs(), r).squeeze(-1)


def stack_A(lA: AMat, uA: AMat) -> tuple[torch.Tensor, list[int]]:
    """Stack the available bound matrices along S so one op application serves both."""
    parts = [a for a in (lA, uA) if a is not None]
    return torch.cat(parts, 1), [a.shape[1] for a in parts]


def unstack_A(A: torch.Tensor, sizes: list[int], lA: AMat, uA: AMat) -> tuple[AMat, AMat]:
    pieces = list(torch.split(A, sizes, 1))
    return (pieces.pop(0) if lA is not None else None), (pieces.pop(0) if uA is not None else None)


def sum_bias(A: AMat, c: torch.Tensor) -> torch.Tensor | float:
    """``A · c`` summed over the per-sample dims: ``(B, S)``; c broadcasts to A's trailing dims."""
    if A is None:
        return 0.0
    return (A * c).flatten(2).sum(2)


class MonotoneLinearRule(Rule):
    """Ops that are linear with non-negative coefficients in their single perturbed input
    (selection, permutation, padding, averaging): IBP applies the op to both bounds, and the
    CROWN step is the op's vector-Jacobian product (computed by autograd at zero), so each
    such op needs no hand-written transpose."""

    def ibp(self, vals: Sequence[Value]) -> Interval:
        (i,) = self.pert
        itv: Interval = vals[i]
        return Interval(self.call_with(vals, {i: itv.lower}), self.call_with(vals, {i: itv.upper}))

    def check(self, gm) -> None:  # type: ignore[no-untyped-def]
        if len(self.pert) != 1:
            from certonnx.errors import UnsupportedOpError

            raise UnsupportedOpError(self.label, self.node.name, "only one input may depend on the model input")

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value]):  # type: ignore[no-untyped-def]
        (i,) = self.pert
        A, sizes = stack_A(lA, uA)
        B, S = A.shape[:2]
        z = torch.zeros((B * S, *self.in_shapes[0]), dtype=A.dtype, device=A.device, requires_grad=True)
        with torch.enable_grad():
            out = self.call_with(vals, {i: z})
            (g,) = torch.autograd.grad(out, z, A.reshape(B * S, *self.out_shape), create_graph=A.requires_grad)
        g = g.reshape(B, S, *self.in_shapes[0])
        # offset of the op at zero (non-zero only for constant padding)
        off = out.detach().reshape(B, S, *self.out_shape)
        bias_all = (A * off).flatten(2).sum(2)
        nl, nu = unstack_A(g, sizes, lA, uA)
        bl, bu = unstack_A(bias_all, sizes, lA, uA)
        return [(nl, nu)], (bl if bl is not None else 0.0), (bu if bu is not None else 0.0)

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        return 1.0
