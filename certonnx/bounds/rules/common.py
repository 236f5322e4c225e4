"""Helpers shared by the rules: broadcasting of bound matrices and vjp-based linear steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch
from torch import fx

from certonnx.bounds.core import AMat, Interval, per_sample_flat, rounding_term
from certonnx.bounds.rule import BackwardResult, Rule, Value


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


def with_rounding(bl: torch.Tensor | float, bu: torch.Tensor | float, lA: AMat, uA: AMat,
                  err: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Bias terms of a CROWN step, moved outward by the op's rounding error ``err``."""
    if err is None:
        return bl, bu
    return bl - rounding_term(lA, err), bu + rounding_term(uA, err)


def stack_A(lA: AMat, uA: AMat) -> tuple[torch.Tensor, list[int]]:
    """Stack the available bound matrices along S so one op application serves both."""
    parts = [a for a in (lA, uA) if a is not None]
    return torch.cat(parts, 1), [a.shape[1] for a in parts]


def unstack_A(A: torch.Tensor, sizes: list[int], lA: AMat, uA: AMat) -> tuple[AMat, AMat]:
    pieces = list(torch.split(A, sizes, 1))
    return (pieces.pop(0) if lA is not None else None), (pieces.pop(0) if uA is not None else None)


@overload
def sum_bias(A: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor: ...
@overload
def sum_bias(A: None, c: torch.Tensor | float) -> float: ...
@overload
def sum_bias(A: AMat, c: torch.Tensor | float) -> torch.Tensor | float: ...
def sum_bias(A: AMat, c: torch.Tensor | float) -> torch.Tensor | float:
    """``A · c`` summed over the per-sample dims: ``(B, S)``; c broadcasts to A's trailing dims."""
    if A is None:
        return 0.0
    return per_sample_flat(A * c, 2).sum(2)


class MonotoneLinearRule(Rule):
    """Ops that are linear with non-negative coefficients in their single perturbed input
    (selection, permutation, padding, averaging): IBP applies the op to both bounds, and the
    CROWN step is the op's vector-Jacobian product (computed by autograd at zero), so each
    such op needs no hand-written transpose.

    Rounding: an op that *sums* (an average) rounds its result, and an op that may *copy* an
    element (expand, gather, indexing) has a CROWN step that sums the copies' coefficients. Both
    err by at most ``γ · op(|x|)`` (the op applied to the input's magnitude, since its
    coefficients are non-negative), which is added where it applies; a pure permutation or
    slice is exact.
    """

    #: the op's output is a float sum of several input elements (rounds in the forward pass)
    sums: bool = False
    #: an input element may appear in several outputs (the CROWN step sums coefficients)
    may_copy: bool = False

    def rounding(self, vals: Sequence[Value]) -> torch.Tensor:
        """``γ · op(max(|l|, |u|)) + tiny``, one value per output element."""
        (i,) = self.pert
        itv: Interval = vals[i]
        m = itv.center.abs() + itv.radius
        return self.call_with(vals, {i: m}).abs() * self.gamma + self.tiny

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor | float:
        return self.rounding(vals) if self.sums else 0.0

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        (i,) = self.pert
        return self.call_with(vals, {i: errs[0]}) - self.call_with(vals, {i: torch.zeros_like(errs[0])})

    def ibp(self, vals: Sequence[Value]) -> Interval:
        (i,) = self.pert
        itv: Interval = vals[i]
        out = Interval(self.call_with(vals, {i: itv.lower}), self.call_with(vals, {i: itv.upper}))
        return out.widen(self.rounding(vals)) if self.sums else out

    def check(self, gm: fx.GraphModule) -> None:
        if len(self.pert) != 1:
            from certonnx.errors import UnsupportedOpError

            raise UnsupportedOpError(self.label, self.node.name, "only one input may depend on the model input")

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        (i,) = self.pert
        A, sizes = stack_A(lA, uA)
        B, S = A.shape[:2]
        z = torch.zeros((B * S, *self.in_shapes[0]), dtype=A.dtype, device=A.device, requires_grad=True)
        with torch.enable_grad():
            out = self.call_with(vals, {i: z})
            if tuple(out.shape) != (B * S, *self.out_shape):
                from certonnx.errors import UnsupportedOpError

                # e.g. an Expand to a shape read from the input (its batch size): the op cannot
                # be applied to the B·S rows of a bound matrix
                raise UnsupportedOpError(self.label, self.node.name, "the op's output shape depends on the batch size")
            (g,) = torch.autograd.grad(out, z, A.reshape(B * S, *self.out_shape), create_graph=A.requires_grad)
        g = g.reshape(B, S, *self.in_shapes[0])
        # offset of the op at zero (non-zero only for constant padding)
        off = out.detach().reshape(B, S, *self.out_shape)
        bias_all = per_sample_flat(A * off, 2).sum(2)
        nl, nu = unstack_A(g, sizes, lA, uA)
        bl, bu = unstack_A(bias_all, sizes, lA, uA)
        bl_, bu_ = (bl if bl is not None else 0.0), (bu if bu is not None else 0.0)
        if self.sums or self.may_copy:
            bl_, bu_ = with_rounding(bl_, bu_, lA, uA, self.rounding(vals))
        return [(nl, nu)], bl_, bu_

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        return nonnegative_map_norm(self, vals, norm)

    def check_batch(self, vals: Sequence[Value]) -> None:
        check_per_sample(self, vals)


def check_per_sample(rule: Rule, vals: Sequence[Value]) -> None:
    """If the op maps a batch of two to a batch of two, each output sample must equal the op
    applied to that sample alone (a flip or a permutation of the batch axis is refused).

    Ops that only run at one batch size (``view(1, -1)`` of a batch-1 export) are left alone
    here: at any other batch size their output's first axis is not the batch, which every bound
    pass refuses (``BoundedModule._ibp_pass``)."""
    from certonnx.errors import UnsupportedOpError

    (i,) = rule.pert[:1]
    ref = next((v for v in vals if isinstance(v, Interval)), None)
    dtype = ref.lower.dtype if ref is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    z = torch.rand((2, *rule.in_shapes[0]), generator=g, dtype=torch.float64).to(dtype) + 0.5
    with torch.no_grad():
        try:
            both = rule.call_with(vals, {i: z})
            one = [rule.call_with(vals, {i: z[k:k + 1]}) for k in range(2)]
        except RuntimeError:
            return  # batch-size specific: refused at bound time for other sizes
    if not (isinstance(both, torch.Tensor) and both.ndim > 0 and both.shape[0] == 2
            and all(o.ndim > 0 and o.shape[0] == 1 and o.shape[1:] == both.shape[1:] for o in one)):
        return
    if not all(torch.equal(both[k:k + 1], o) for k, o in enumerate(one)):
        raise UnsupportedOpError(rule.label, rule.node.name, "the op mixes the samples of a batch")


def nonnegative_map_norm(rule: Rule, vals: Sequence[Value], norm: str) -> float | None:
    """Induced norm of a linear map ``A`` with non-negative entries (the op at ``pert[0]``).

    L∞: the largest row sum ``max(A·1)``. L2: ``‖A‖₂ ≤ sqrt(‖A‖₁ ‖A‖∞)`` (Schur's test, or
    Hölder/Riesz–Thorin), with the largest column sum ``max(Aᵀ·1)`` computed by a
    vector-Jacobian product. Both are evaluated in float64 on the op itself, so repeated
    indices, upsampling, partial windows and padding divisors are all accounted for exactly;
    a relative 1e-9 covers float64 rounding. The constant part of the op (a padding value) does
    not affect the Lipschitz constant and is removed by evaluating at zero.
    """
    (i,) = rule.pert
    shape = (1, *rule.in_shapes[0])
    dvals = [v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in vals]
    with torch.enable_grad():
        z = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        out0 = rule.call_with(dvals, {i: z})
        (colsum,) = torch.autograd.grad(out0, z, torch.ones_like(out0))
    with torch.no_grad():
        rowsum = rule.call_with(dvals, {i: torch.ones(shape, dtype=torch.float64)}) - out0.detach()
    r_inf = float(rowsum.abs().max()) if rowsum.numel() else 0.0
    if norm == "linf":
        return r_inf * (1 + 1e-9)
    c_one = float(colsum.abs().max()) if colsum.numel() else 0.0
    return (c_one * r_inf) ** 0.5 * (1 + 1e-9)


def window_multiplicity(k: Sequence[int], s: Sequence[int], d: Sequence[int]) -> int:
    """Most windows (kernel ``k``, stride ``s``, dilation ``d`` per axis) that contain one input
    element. Along an axis, element ``p`` is tap ``i`` of window ``o`` iff ``p = o·s + i·d − pad``;
    for a fixed ``p`` the valid taps satisfy ``i·d ≡ p + pad (mod s)``, an arithmetic progression
    with step ``s / gcd(s, d)``, so at most ``ceil(k / (s / gcd(s, d)))`` of the ``k`` taps.
    Padding and ceil_mode only add or remove windows at the border, never taps per element."""
    return math.prod(-(-kk // (ss // math.gcd(ss, dd))) for kk, ss, dd in zip(k, s, d))
