"""Erf and GELU (exact and tanh forms): the activations of transformer-style MLPs.

**Erf** is S-shaped exactly like tanh (odd, convex for ``x ≤ 0``, concave for ``x ≥ 0``, its
derivative ``(2/√π)·e^{−x²}`` unimodal with its peak at 0), so it reuses the chord/tangent
relaxation of :class:`~certonnx.bounds.rules.activation._SShapedRule`; Lipschitz constant
``max erf' = 2/√π``.

**GELU** ``f(x) = x·Φ(x)`` (``Φ`` the standard normal CDF; the tanh form replaces ``Φ(x)`` by
``½(1 + tanh(√(2/π)(x + 0.044715x³)))``) is neither monotone nor convex:

* ``f''(x) = φ(x)(2 − x²)``: convex on ``[−√2, √2]``, concave outside (tanh form: inflections at
  ``±1.4185040087908284``, found with mpmath and checked to be the only sign changes of the even
  factor of ``f''`` on a 10⁻⁶ grid of ``[0, 50]`` and log grid to 10⁶; beyond, its negative
  ``x⁵`` term dominates). So ``f'`` is monotone on each of the three pieces.
* ``f' < 0`` left of one critical point ``x* ≈ −0.7518`` (tanh form ``−0.7525``) and ``> 0`` right
  of it: for ``x ≤ −1`` Mills' ratio ``Φ(x) < φ(x)/|x|`` gives ``f' < φ(x)(1/|x| − |x|) ≤ 0``;
  on ``[−1, √2]`` ``f'`` increases (convexity) through ``f'(x*) = 0``; for ``x ≥ 0`` both terms
  of ``f' = Φ + xφ`` are positive. (Tanh form: ``f' = s(1 + 2x·z'·(1 − s))`` with
  ``s = σ(2z)``, negative for ``x ≤ −1.26`` where ``|x|·z' > 1``, the same argument elsewhere.)
  Hence the **IBP** bound is exact: ``max = max(f(l), f(u))``, ``min = f(x*)`` when ``x* ∈ [l, u]``
  (a constant rounded down, ``−0.1699712075``, tanh form ``−0.1700407506``), else ``min(f(l), f(u))``.
* ``max |f'| = f'(√2) = Φ(√2) + √2·φ(√2) = 1.1289041…`` (tanh form ``1.1289931…``, at its
  inflection), both padded to **1.129** as the Lipschitz constant; ``min f' = −0.1289…``.

**Linear relaxation (CROWN).** For any slope ``k`` the lines ``k·x + min_{[l,u]}(f − kx)`` and
``k·x + max_{[l,u]}(f − kx)`` bound ``f`` on ``[l, u]``; what remains is to compute the min and
max of ``g = f − kx`` soundly, and to pick ``k``:

* the points ``l``, ``u`` and the inflections inside split ``[l, u]`` into pieces where ``g`` is
  convex or concave and ``g' = f' − k`` monotone; in each piece, a table of ``f'`` (8192 points
  per piece, ``searchsorted``) brackets the root of ``g'``, the only place an interior extremum
  can be;
* on every sub-segment ``[a, b]`` of the resulting points (all within one piece), a convex
  ``g`` has ``max = max(g(a), g(b))`` and ``min ≥`` the tangent lines at ``a`` and ``b`` where
  they cross (``g(a)`` if ``g'(a) ≥ 0``, ``g(b)`` if ``g'(b) ≤ 0``, else ``min(T_a(t), T_b(t))``
  at the computed crossing ``t``, which is ``≤`` the true crossing value for any ``t``), and a
  concave ``g`` the mirror image. This holds for *any* points, so soundness does not depend on
  the table; the brackets only make it tight: around a root the segment is at most ``3/8192``
  wide, where the tangent bound is within ``|f''|·h²/8 < 2·10⁻⁸`` of the true extremum. This is
  the verified offset, with no grid and no curvature padding;
* slopes tried: the chord, and ``f'`` at the midpoint and at both ends; the lower line keeps
  the one with the highest value at the midpoint (= its mean over ``[l, u]``), the upper line
  the lowest. On a convex interval this gives chord above and the midpoint tangent below, on a
  concave one the reverse, exactly as for the S-shaped rules. (Over 20 000 random intervals,
  the best of 141 slopes is better by 0.004 on average for the lower line, 6·10⁻⁵ for the upper
  one, against a mean gap of 2.7 between the two lines; slope 0, the IBP bound, never wins.)

The relaxation is computed in float64 (its own error, ~1e-16, is far below the allowances that
follow) and rounded to float32; :meth:`ActivationRule.outward` then moves each line outward by
``γ (|b| + |w| max|x|)`` for the rounding of the lines and the CROWN products, and by the GELU
kernels' own error ``GELU_ERROR_ABS + GELU_ERROR_REL·max|x|`` (:func:`~certonnx.bounds.rounding.gelu_error`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from certonnx.bounds.core import Interval
from certonnx.bounds.rounding import gelu_error
from certonnx.bounds.rule import Value, register
from certonnx.bounds.rules.activation import ActivationRule, _SShapedRule
from certonnx.errors import UnsupportedOpError

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
#: max erf' = 2/√π = 1.12837916709…, rounded up
ERF_LIPSCHITZ = 1.1283792
#: max |GELU'| (1.1289041…, tanh form 1.1289931…), rounded up
GELU_LIPSCHITZ = 1.129

_C2 = math.sqrt(2.0 / math.pi)
_C1 = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
#: float64 stand-in for ±inf (beyond float32's range, so it rounds back to ±inf; x³ stays finite)
_BIG = 1e100


@register
class ErfRule(_SShapedRule):
    """``erf``: S-shaped (see the module docstring); kernels within ``ACTIVATION_ERROR``
    (measured 6.0e-8 for onnxruntime's and torch's)."""

    label = "Erf"
    functions = (torch.erf, torch.special.erf)
    method_names = ("erf",)
    onnx2torch_names = ("OnnxErf",)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)

    def df(self, x: torch.Tensor) -> torch.Tensor:
        return _TWO_OVER_SQRT_PI * torch.exp(-x * x)

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return ERF_LIPSCHITZ


def _ncdf(x: torch.Tensor) -> torch.Tensor:
    # Φ(x) = ½·erfc(−x/√2): accurate for x ≪ 0 (no cancellation), and faster than ndtr
    return 0.5 * torch.erfc(x * -_SQRT_HALF)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return x * _ncdf(x)


def _gelu_d(x: torch.Tensor) -> torch.Tensor:
    return _ncdf(x) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # ½(1 + tanh z) = σ(2z): no cancellation for z ≪ 0
    return x * torch.sigmoid(2.0 * _C2 * (x + _C1 * x * x * x))


def _gelu_tanh_d(x: torch.Tensor) -> torch.Tensor:
    z2 = 2.0 * _C2 * (x + _C1 * x * x * x)
    dz = _C2 * (1.0 + 3.0 * _C1 * x * x)
    s = torch.sigmoid(z2)
    return s + 2.0 * x * dz * s * torch.sigmoid(-z2)


@dataclass(frozen=True)
class Curve:
    """A GELU-like function: concave, convex, concave on the pieces split by ``inflections``,
    decreasing then increasing around a critical point inside ``argmin``."""

    f: Callable[[torch.Tensor], torch.Tensor]
    df: Callable[[torch.Tensor], torch.Tensor]
    inflections: tuple[float, float]
    #: a bracket of the critical point x*
    argmin: tuple[float, float]
    #: a lower bound of f(x*), the global minimum (rounded down)
    fmin: float

    def tables(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per piece, a grid ``x`` (float64) and ``±f'(x)`` made non-decreasing, on which
        ``searchsorted`` brackets the root of ``f' = k``: :data:`_TABLE` points on each of
        ``[−_TABLE_END, p₀]``, ``[p₀, p₁]``, ``[p₁, _TABLE_END]``."""
        key = (id(self), str(device))
        if key not in _TABLES:
            p0, p1 = self.inflections
            out = []
            for (a, b), sign in (((-_TABLE_END, p0), -1.0), ((p0, p1), 1.0), ((p1, _TABLE_END), -1.0)):
                x = torch.linspace(a, b, _TABLE, dtype=torch.float64, device=device)
                out.append((x, sign * self.df(x)))
            _TABLES[key] = out
        return _TABLES[key]


#: grid points per piece of the root tables, and where they end (beyond ±16, |f''| < 1e-50)
_TABLE = 8192
_TABLE_END = 16.0
_TABLES: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}

CURVES = {
    "none": Curve(_gelu, _gelu_d, (-math.sqrt(2.0), math.sqrt(2.0)), (-0.75180, -0.75178), -0.1699712075),
    "tanh": Curve(_gelu_tanh, _gelu_tanh_d, (-1.4185040087908284, 1.4185040087908284), (-0.75247, -0.75245),
                  -0.1700407506),
}


def _extrema(c: Curve, l: torch.Tensor, u: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sound ``(min, max)`` of ``f(x) − k·x`` over ``[l, u]`` (float64; ``l``, ``u`` broadcast
    against the slopes ``k``), by the piecewise convex/concave bounds of the module docstring.

    The points: ``l``, the inflections inside, ``u``, and in each piece a bracket of the root of
    ``f' = k`` from a table of ``f'`` (monotone on the piece, so ``searchsorted`` finds it). Any
    points of ``[l, u]`` give a sound bound; the brackets make it tight (a bracket is at most
    ``3/8192`` wide, where ``|f''|·h²/8 < 2e-8``)."""
    l, u = torch.broadcast_tensors(l, u, k)[:2]
    p0, p1 = c.inflections
    ends = [l, torch.clamp(l.new_tensor(p0), l, u), torch.clamp(l.new_tensor(p1), l, u), u]
    pts: list[torch.Tensor] = [ends[0]]
    with torch.no_grad():  # the roots are critical points of g: no gradient flows through them
        kd = k.detach().contiguous()
        for j, (x, d) in enumerate(c.tables(k.device)):
            idx = torch.searchsorted(d, kd if j == 1 else -kd).clamp_(1, x.numel() - 1)
            lo, hi = ends[j].detach(), ends[j + 1].detach()
            pts += [torch.minimum(torch.maximum(x[idx - 1], lo), hi), torch.minimum(torch.maximum(x[idx], lo), hi)]
            pts.append(ends[j + 1])
    P = torch.stack(pts, -1)  # non-decreasing along the last axis
    kk = k.unsqueeze(-1)
    g, d = c.f(P) - kk * P, c.df(P) - kk
    a, b, ga, gb, da, db = P[..., :-1], P[..., 1:], g[..., :-1], g[..., 1:], d[..., :-1], d[..., 1:]
    convex = (0.5 * (a + b) > p0) & (0.5 * (a + b) < p1)
    den = da - db
    t = (gb - ga + da * a - db * b) / torch.where(den != 0, den, torch.ones_like(den))
    t = torch.minimum(torch.maximum(t, a), b)
    ta, tb = ga + da * (t - a), gb + db * (t - b)
    cvx_min = torch.where(da >= 0, ga, torch.where(db <= 0, gb, torch.minimum(ta, tb)))
    ccv_max = torch.where(da <= 0, ga, torch.where(db >= 0, gb, torch.maximum(ta, tb)))
    seg_min = torch.where(convex, cvx_min, torch.minimum(ga, gb))
    seg_max = torch.where(convex, torch.maximum(ga, gb), ccv_max)
    return seg_min.amin(-1), seg_max.amax(-1)


def relax_curve(c: Curve, l: torch.Tensor, u: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lw, lb, uw, ub)`` with ``lw·x + lb ≤ f(x) ≤ uw·x + ub`` on ``[l, u]``, exact
    arithmetic (float64 in, float64 out); see the module docstring."""
    l, u = l.clamp(-_BIG, _BIG), u.clamp(-_BIG, _BIG)  # an infinite end (overflow upstream): no inf − inf
    m = 0.5 * (l + u)
    w = u - l
    dm = c.df(m)
    chord = torch.where(w > 0, (c.f(u) - c.f(l)) / torch.where(w > 0, w, torch.ones_like(w)), dm)
    k = torch.stack([chord, dm, c.df(l), c.df(u)], -1)
    lo, hi = _extrema(c, l.unsqueeze(-1), u.unsqueeze(-1), k)
    mm = m.unsqueeze(-1)
    il = (k * mm + lo).argmax(-1, keepdim=True)
    iu = (k * mm + hi).argmin(-1, keepdim=True)
    return (k.gather(-1, il).squeeze(-1), lo.gather(-1, il).squeeze(-1),
            k.gather(-1, iu).squeeze(-1), hi.gather(-1, iu).squeeze(-1))


def ibp_curve(c: Curve, l: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(min, max)`` of ``f`` on ``[l, u]`` (float64): ``f`` decreases, then increases."""
    l, u = l.clamp(-_BIG, _BIG), u.clamp(-_BIG, _BIG)
    fl, fu = c.f(l), c.f(u)
    lo = torch.minimum(fl, fu)
    inside = (u >= c.argmin[0]) & (l <= c.argmin[1])
    return torch.where(inside, torch.minimum(lo, lo.new_tensor(c.fmin)), lo), torch.maximum(fl, fu)


@register
class GeluRule(ActivationRule):
    """GELU, ``nn.GELU`` / ``F.gelu`` in both forms (ONNX ``Gelu`` and the exporters'
    decompositions arrive as ``nn.GELU`` through :mod:`certonnx.io.converters`)."""

    label = "Gelu"
    ibp_intermediate = False  # not monotone: IBP of its output is not its exact range
    module_types = (nn.GELU,)
    functions = (F.gelu,)

    def approximate(self) -> str:
        if self.module is not None:
            return str(getattr(self.module, "approximate", "none"))
        args = self.node.args
        return str(args[1] if len(args) > 1 else self.node.kwargs.get("approximate", "none"))

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        if self.approximate() not in CURVES:
            raise UnsupportedOpError(self.label, self.node.name, f"approximate={self.approximate()!r}")

    @property
    def curve(self) -> Curve:
        return CURVES[self.approximate()]

    def kernel_error(self, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per element, the float32 kernels' error ``ABS + REL·max|x|`` plus underflow."""
        a, r = gelu_error()
        return torch.maximum(l.abs(), u.abs()) * r + (a + self.tiny)

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor:
        itv: Interval = vals[0]
        return self.kernel_error(itv.lower, itv.upper)

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        l, u = itv.lower, itv.upper
        lo, hi = (t.to(l.dtype) for t in ibp_curve(self.curve, l.double(), u.double()))
        # float64 → float32 rounds by u·|v| ≤ γ·|v|; then the kernels' own error
        e = self.kernel_error(l, u)
        return Interval(lo - lo.abs() * self.gamma - e, hi + hi.abs() * self.gamma + e)

    def relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lw, lb, uw, ub = (t.to(l.dtype) for t in relax_curve(self.curve, l.double(), u.double()))
        lw, lb, uw, ub = self.outward(lw, lb, uw, ub, l, u)
        e = self.kernel_error(l, u)
        return lw, lb - e, uw, ub + e

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return GELU_LIPSCHITZ
