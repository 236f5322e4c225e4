"""Element-wise activations: each supplies a linear relaxation on [l, u].

``relax(l, u)`` returns ``(lw, lb, uw, ub)`` with ``lw·x + lb <= f(x) <= uw·x + ub`` for every
``x`` in ``[l, u]``. The CROWN step is the same for all of them (``ActivationRule.backward``):
positive coefficients take the lower line, negative ones the upper line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from certonnx.bounds.core import AMat, Interval, per_sample_flat
from certonnx.bounds.rounding import activation_error
from certonnx.bounds.rule import BackwardResult, Rule, Value, register
from certonnx.errors import UnsupportedOpError

_TINY = 1e-12


class ActivationRule(Rule):
    """Rounding: the relaxation lines are computed in float32, so a line meant to pass through
    ``(u, f(u))`` may pass an ulp below it, and the CROWN step's products ``A·w`` round too.
    :meth:`outward` moves each line outward by ``γ (|b| + |w| max|x|)`` (plus the function's
    own implementation error), which covers both."""

    affine = False
    ibp_intermediate = True  # elementwise and monotone (GELU, which is not, opts out)

    @property
    def impl_error(self) -> float:
        """Absolute error of the op's float32 implementations (0: exact, like max(x, 0))."""
        return 0.0

    def fan_in(self, vals: Sequence[Value]) -> int:
        return 4

    def outward(self, lw: torch.Tensor, lb: torch.Tensor, uw: torch.Tensor, ub: torch.Tensor,
                l: torch.Tensor, u: torch.Tensor, exact: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lines moved outward for float rounding; ``exact`` marks neurons whose lines are exact
        in float (a stable ReLU: ``x`` or ``0``), which keep them."""
        m = torch.maximum(l.abs(), u.abs())
        sl = (lb.abs() + lw.abs() * m) * self.gamma + (self.tiny + self.impl_error)
        su = (ub.abs() + uw.abs() * m) * self.gamma + (self.tiny + self.impl_error)
        if exact is not None:
            sl = torch.where(exact, torch.zeros_like(sl), sl)
            su = torch.where(exact, torch.zeros_like(su), su)
        return lw, lb - sl, uw, ub + su

    def check(self, gm: fx.GraphModule) -> None:
        if self.pert != [0]:
            raise UnsupportedOpError(self.label, self.node.name, "parameters must not depend on the input")

    def fn(self, x: torch.Tensor, vals: Sequence[Value]) -> torch.Tensor:
        return self.call_with(vals, {0: x})

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor | float:
        return self.impl_error

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        # element-wise: the largest slope bounds how far an input error moves the output
        return errs[0] * float(self.lipschitz(vals, "linf") or 0.0)

    def ibp(self, vals: Sequence[Value]) -> Interval:
        # every activation here is monotone non-decreasing; the values are computed by torch,
        # the model's by another engine: both within impl_error of the exact function
        itv: Interval = vals[0]
        out = Interval(self.fn(itv.lower, vals), self.fn(itv.upper, vals))
        return out.widen(self.impl_error) if self.impl_error else out

    def relax(
        self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def alpha_lower(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor,
                    lw: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lower line (slope, intercept; moved outward) for the slopes ``alpha`` (one per
        row and neuron), given the α-free lines ``lw, lb`` of :meth:`relax`. α-CROWN calls this
        once per row set and step, so rules may override it with a cheaper form."""
        llw, llb, _, _ = self.relax(l, u, vals, alpha)
        return llw, llb

    def alpha_init(self, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """α-CROWN's starting variables for input bounds ``(B, *shape)``: ``(B, *shape)`` for
        one variable per neuron (ReLU-like: CROWN's adaptive slope, 1 where ``u > -l``), or
        ``(B, alpha_slopes, *shape)`` for several; every value in [0, 1] must be sound."""
        return (u > -l).to(l.dtype)

    def alpha_relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor
                    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``((lw, lb, uw, ub) of relax, (lower line, upper line) for a *lower* bound pass with
        the variables ``alpha``)``: positive coefficients take the first, negative ones the
        second. ReLU-like rules free only the lower line (the triangle's upper line is optimal)."""
        lw, lb, uw, ub = self.relax(l, u, vals)
        llw, llb = self.alpha_lower(l, u, vals, alpha, lw, lb)
        return (lw, lb, uw, ub), (llw, llb, uw, ub)

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        itv: Interval = vals[0]
        l, u = itv.lower.unsqueeze(1), itv.upper.unsqueeze(1)
        if alpha is not None and lA is not None:
            (lw, lb, uw, ub), (llw, llb, luw, lub) = self.alpha_relax(l, u, vals, alpha)
        else:
            lw, lb, uw, ub = self.relax(l, u, vals)
            llw, llb, luw, lub = lw, lb, uw, ub
        nl = nu = None
        bl: torch.Tensor | float = 0.0
        bu: torch.Tensor | float = 0.0
        if lA is not None:
            pos, neg = lA.clamp(min=0), lA.clamp(max=0)
            nl = pos * llw + neg * luw
            bl = per_sample_flat(pos * llb + neg * lub, 2).sum(2)
        if uA is not None:
            pos, neg = uA.clamp(min=0), uA.clamp(max=0)
            nu = pos * uw + neg * lw
            bu = per_sample_flat(pos * ub + neg * lb, 2).sum(2)
        return [(nl, nu)], bl, bu

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float | None:
        return 1.0


def _relu_relax(l: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor | None,
                slope_neg: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triangle relaxation of max(a·x, x) (a = slope_neg ≤ 1) on [l, u]."""
    a = slope_neg
    active = l >= 0
    dead = u <= 0
    unstable = ~(active | dead)
    den = torch.where(unstable, u - l, torch.ones_like(u))
    uw_unst = (u - a * l) / den
    uw = torch.where(active, torch.ones_like(u), torch.where(dead, torch.full_like(u, a), uw_unst))
    ub = torch.where(unstable, (a - uw_unst) * l, torch.zeros_like(u))
    if alpha is None:
        # CROWN's adaptive choice: slope 1 when the positive part dominates
        lw_unst = torch.where(u > -l, torch.ones_like(u), torch.full_like(u, a))
    else:
        lw_unst = a + (1 - a) * alpha
    lw = torch.where(active, torch.ones_like(u), torch.where(dead, torch.full_like(u, a), lw_unst))
    lb = torch.zeros_like(lw)
    return lw, lb, uw, ub


def _relu_alpha_lower(rule: ActivationRule, l: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor,
                      lw: torch.Tensor, lb: torch.Tensor, slope_neg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`ActivationRule.alpha_lower` of max(a·x, x): only unstable neurons have a free
    slope ``a + (1 − a)·α`` with intercept 0, moved outward exactly as :meth:`outward` does (an
    unstable neuron's line is never exact: ``(|0| + |w|·max|x|)·γ + tiny + impl_error``); the
    other neurons keep ``lw, lb``. Only the ``(B, S, n)`` tensors that depend on α are built."""
    unstable = (l < 0) & (u > 0)
    m = torch.maximum(l.abs(), u.abs())
    w = slope_neg + (1 - slope_neg) * alpha  # ≥ 0
    b = -(w * (m * rule.gamma) + (rule.tiny + rule.impl_error))
    return torch.where(unstable, w, lw), torch.where(unstable, b, lb)


def _relu_exact(l: torch.Tensor, u: torch.Tensor, slope_neg: float) -> torch.Tensor:
    """Neurons whose ReLU lines are exact in float: active (``x``), or dead with slope 0."""
    return (l >= 0) | ((u <= 0) if slope_neg == 0.0 else torch.zeros_like(l, dtype=torch.bool))


@register
class ReLURule(ActivationRule):
    label = "Relu"
    alpha_capable = True
    alpha_slopes = 1
    module_types = (nn.ReLU,)
    functions = (torch.relu, F.relu)
    method_names = ("relu",)

    def relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.outward(*_relu_relax(l, u, alpha), l, u, _relu_exact(l, u, 0.0))

    def alpha_lower(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor,
                    lw: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _relu_alpha_lower(self, l, u, alpha, lw, lb, 0.0)

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        if itv._lower is not None or itv._center is None:
            return Interval(itv.lower.clamp(min=0), itv.upper.clamp(min=0))
        # from centre/radius (an affine layer's output): clamp the fresh c ∓ r in place instead
        # of allocating twice; the input's own lower/upper are derived again if CROWN needs them
        c, r = itv.center, itv.radius
        return Interval(torch.sub(c, r).relu_(), torch.add(c, r).relu_())  # relu_: vmap has a batching rule


@register
class LeakyReLURule(ActivationRule):
    label = "LeakyRelu"
    alpha_capable = True
    alpha_slopes = 1
    module_types = (nn.LeakyReLU,)
    functions = (F.leaky_relu,)

    def slope(self) -> float:
        if self.module is not None:
            return float(getattr(self.module, "negative_slope"))  # noqa: B009 - nn.LeakyReLU's
        args = self.node.args
        v = args[1] if len(args) > 1 else self.node.kwargs.get("negative_slope", 0.01)
        assert isinstance(v, (int, float)), f"negative_slope {v!r}"
        return float(v)

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        if not 0.0 <= self.slope() <= 1.0:
            raise UnsupportedOpError(self.label, self.node.name, "negative_slope must be in [0, 1]")

    def relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.slope()
        return self.outward(*_relu_relax(l, u, alpha, a), l, u, _relu_exact(l, u, a))

    def alpha_lower(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor,
                    lw: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _relu_alpha_lower(self, l, u, alpha, lw, lb, self.slope())

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor:
        itv: Interval = vals[0]
        return (itv.center.abs() + itv.radius) * max(1.0, abs(self.slope())) * self.gamma

    def ibp(self, vals: Sequence[Value]) -> Interval:
        # a·x rounds (one multiplication): widen by γ·|value|
        itv: Interval = vals[0]
        lo, hi = self.fn(itv.lower, vals), self.fn(itv.upper, vals)
        return Interval(lo - lo.abs() * self.gamma, hi + hi.abs() * self.gamma)

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return max(1.0, abs(self.slope()))


#: bisection steps for the tangent points of an S-shaped relaxation (the interval shrinks 2^-k)
_TANGENT_STEPS = 24


class _TangentRanges(NamedTuple):
    """Where an S-shaped relaxation's lower (upper) line is a tangent whose point may be
    anywhere in ``[lower_lo, lower_hi]`` (``[upper_lo, upper_hi]``) and stay sound."""

    lower_free: torch.Tensor
    lower_lo: torch.Tensor
    lower_hi: torch.Tensor
    upper_free: torch.Tensor
    upper_lo: torch.Tensor
    upper_hi: torch.Tensor


def _position(d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``d``'s place in ``[lo, hi]`` as a fraction in [0, 1] (0.5 for an empty range)."""
    w = hi - lo
    ok = w > 0
    return torch.where(ok, ((d - lo) / torch.where(ok, w, torch.ones_like(w))).clamp(0, 1), torch.full_like(w, 0.5))


class _SShapedRule(ActivationRule):
    """Sigmoid and tanh: convex for x ≤ 0, concave for x ≥ 0, derivative unimodal.

    * entirely in the concave part: chord below, tangent at the midpoint above;
    * entirely in the convex part: tangent below, chord above;
    * across 0 (CROWN, Zhang et al. 2018, as auto_LiRPA): the upper line is the tangent at the
      point ``d ∈ [0, u]`` whose tangent passes through ``(l, f(l))`` (above f on [l, d] by
      convexity-then-concavity, above on [d, u] by concavity), or the chord when no such
      ``d ≤ u`` exists (the chord then lies above f); the lower line mirrors it with
      ``d ∈ [l, 0]`` through ``(u, f(u))``. ``d`` is found by bisection keeping the side whose
      tangent clears the endpoint (``_TANGENT_STEPS`` halvings), so the line is valid even
      where the bisection stops short; a flatter tangent beyond the exact point is still
      above (below) f, so where the point is short of the midpoint the midpoint's tangent is
      used instead (as auto_LiRPA does).
    """

    @property
    def impl_error(self) -> float:
        return activation_error()

    def f(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def df(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    alpha_slopes = 2

    def relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._lines(l, u)[0]

    def _lines(self, l: torch.Tensor, u: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], _TangentRanges]:
        """CROWN's lines (moved outward) and, for α-CROWN, where each line is a tangent whose
        point may move: see :class:`_TangentRanges`."""
        fl, fu = self.f(l), self.f(u)
        width = u - l
        narrow = width < 1e-6
        chord = torch.where(narrow, self.df(l), (fu - fl) / torch.where(narrow, torch.ones_like(width), width))
        m = (l + u) / 2
        fm, dm = self.f(m), self.df(m)
        concave = l >= 0
        convex = u <= 0
        cross = ~(concave | convex)
        (cuw, cub), (clw, clb), (du, dl, chord_u, chord_l) = self._cross_lines(l, u, fl, fu, chord, cross)
        # lower line
        lw = torch.where(concave, chord, torch.where(convex, dm, clw))
        lb = torch.where(concave, fl - chord * l, torch.where(convex, fm - dm * m, clb))
        # upper line
        uw = torch.where(concave, dm, torch.where(convex, chord, cuw))
        ub = torch.where(concave, fm - dm * m, torch.where(convex, fu - chord * u, cub))
        # α-CROWN's tangent ranges: below f, any tangent point in the convex part left of the
        # point whose tangent meets (u, f(u)) (all of [l, u] when u <= 0); above f, mirrored
        ranges = _TangentRanges(
            lower_free=(convex | (cross & ~chord_l)) & ~narrow, lower_lo=l, lower_hi=torch.where(convex, u, dl),
            upper_free=(concave | (cross & ~chord_u)) & ~narrow, upper_lo=torch.where(concave, l, du), upper_hi=u)
        # rounding of the chord/tangent and the kernels' own error: see ActivationRule.outward
        return self.outward(lw, lb, uw, ub, l, u), ranges

    def alpha_init(self, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Two variables per neuron, the positions of the lower and the upper tangent point in
        their ranges, started at CROWN's points (the midpoint, or the exact point where that
        is past the midpoint), as auto_LiRPA starts ``tp_neg``/``tp_pos``/``tp_both_*``
        (``operators/s_shaped.py``, ``_init_opt_parameters_impl``)."""
        with torch.no_grad():
            _, r = self._lines(l, u)
            m = (l + u) / 2
            a_lo = _position(torch.minimum(m, r.lower_hi), r.lower_lo, r.lower_hi)
            a_hi = _position(torch.maximum(m, r.upper_lo), r.upper_lo, r.upper_hi)
        return torch.stack([a_lo, a_hi], 1)

    def alpha_relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor
                    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Tangent-point optimisation (α-CROWN for S-shaped functions, auto_LiRPA
        ``operators/s_shaped.py`` ``bound_relax_impl``: the tangent points are the variables,
        clamped to where the tangent stays on its side of f). Here a variable ``a`` in [0, 1]
        places the point at ``lo + a·(hi − lo)`` of its range, so every ``a`` is sound and the
        projection is the one clamp all α share. Chords (no freedom) and stable ends keep
        CROWN's lines. Returns ``(relax's lines, (lower, upper) lines for a lower pass)``."""
        lines, r = self._lines(l, u)
        lw, lb, uw, ub = lines
        d_lo = r.lower_lo + alpha[:, :, 0] * (r.lower_hi - r.lower_lo)
        d_hi = r.upper_lo + alpha[:, :, 1] * (r.upper_hi - r.upper_lo)
        tlw, tuw = self.df(d_lo), self.df(d_hi)
        tlw, tlb, tuw, tub = self.outward(tlw, self.f(d_lo) - tlw * d_lo, tuw, self.f(d_hi) - tuw * d_hi, l, u)
        return lines, (torch.where(r.lower_free, tlw, lw), torch.where(r.lower_free, tlb, lb),
                       torch.where(r.upper_free, tuw, uw), torch.where(r.upper_free, tub, ub))

    def _tangent_through(self, p: torch.Tensor, fp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                         upper: bool) -> torch.Tensor:
        """The tangent point ``d ∈ [lo, hi]`` whose tangent passes through ``(p, f(p))``,
        bisected on the side whose tangent clears ``f(p)`` (at or above it for the upper
        line, at or below for the lower)."""
        def clears(d: torch.Tensor) -> torch.Tensor:
            gap = self.f(d) + self.df(d) * (p - d) - fp
            return gap >= 0 if upper else gap <= 0

        # upper: the tangent point moves towards +inf as it clears more; lower: towards -inf
        good, bad = (hi, lo) if upper else (lo, hi)
        for _ in range(_TANGENT_STEPS):
            mid = (good + bad) / 2
            ok = clears(mid)
            good, bad = torch.where(ok, mid, good), torch.where(ok, bad, mid)
        return good

    def _cross_lines(self, l: torch.Tensor, u: torch.Tensor, fl: torch.Tensor, fu: torch.Tensor,
                     chord: torch.Tensor, cross: torch.Tensor
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor],
                                tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``((upper slope, intercept), (lower slope, intercept), (upper tangent point's least
        valid position, lower's greatest, upper is the chord, lower is the chord))`` for
        intervals across 0 (see the class docstring); other entries are computed on a harmless
        placeholder interval."""
        one = torch.ones_like(l)
        lc, uc = torch.where(cross, l, -one), torch.where(cross, u, one)
        flc, fuc = torch.where(cross, fl, self.f(-one)), torch.where(cross, fu, self.f(one))
        chc = torch.where(cross, chord, (self.f(one) - self.f(-one)) / 2)
        zero = torch.zeros_like(l)
        mid = (lc + uc) / 2
        # upper: tangent at d in [0, u] through (l, f(l)); if even d = u does not clear f(l),
        # the chord is above f on [l, u]. Any tangent point right of d is valid too: where d
        # is left of the midpoint, the midpoint's tangent is the more balanced line (auto_LiRPA's
        # "smoothness enhancement", s_shaped.py)
        du_exact = self._tangent_through(lc, flc, zero, uc, upper=True)
        du = torch.maximum(du_exact, mid)
        use_chord_u = (self.f(uc) + self.df(uc) * (lc - uc) - flc) < 0
        uw = torch.where(use_chord_u, chc, self.df(du))
        ub = torch.where(use_chord_u, fuc - chc * uc, self.f(du) - self.df(du) * du)
        # lower: mirrored, tangent at d in [l, 0] through (u, f(u)); any point left of it is valid
        dl_exact = self._tangent_through(uc, fuc, lc, zero, upper=False)
        dl = torch.minimum(dl_exact, mid)
        use_chord_l = (self.f(lc) + self.df(lc) * (uc - lc) - fuc) > 0
        lw = torch.where(use_chord_l, chc, self.df(dl))
        lb = torch.where(use_chord_l, flc - chc * lc, self.f(dl) - self.df(dl) * dl)
        return (uw, ub), (lw, lb), (du_exact, dl_exact, use_chord_u, use_chord_l)


@register
class SigmoidRule(_SShapedRule):
    label = "Sigmoid"
    module_types = (nn.Sigmoid,)
    functions = (torch.sigmoid, F.sigmoid)
    method_names = ("sigmoid",)

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def df(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x)
        return s * (1 - s)

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        return 0.25


@register
class TanhRule(_SShapedRule):
    label = "Tanh"
    module_types = (nn.Tanh,)
    functions = (torch.tanh, F.tanh)
    method_names = ("tanh",)
    # onnx2torch imports ONNX Tanh as its generic elementwise OnnxFunction(torch.tanh)
    onnx2torch_names = ("OnnxFunction",)

    @classmethod
    def matches(cls, node: fx.Node, gm: fx.GraphModule) -> bool:
        if node.op == "call_module" and type(gm.get_submodule(str(node.target))).__name__ == "OnnxFunction":
            return getattr(gm.get_submodule(str(node.target)), "function", None) is torch.tanh
        return True

    def f(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def df(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - torch.tanh(x) ** 2


def _clip_exact(l: torch.Tensor, u: torch.Tensor, a: float | None, b: float | None) -> torch.Tensor:
    """Neurons whose clip lines are exact: entirely inside ``[a, b]`` (the line ``x``)."""
    inside = torch.ones_like(l, dtype=torch.bool)
    if a is not None:
        inside = inside & (l >= a)
    if b is not None:
        inside = inside & (u <= b)
    return inside


@register
class ClipRule(ActivationRule):
    """clamp(x, a, b) = a + relu(x - a) - relu(x - b): relaxed as that sum of two ReLUs."""

    label = "Clip"
    module_types = (nn.Hardtanh, nn.ReLU6)
    functions = (torch.clamp, torch.clip, F.hardtanh, F.relu6)
    method_names = ("clamp", "clip")
    onnx2torch_names = ("OnnxClip",)

    def limits(self) -> tuple[float | None, float | None]:
        m = self.module
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh
            return float(m.min_val), float(m.max_val)
        if self.node.target is F.relu6:
            return 0.0, 6.0
        if m is not None:
            lo, hi = getattr(m, "min_val"), getattr(m, "max_val")  # noqa: B009 - onnx2torch's clip
        else:
            args = list(self.node.args[1:]) + [None, None]
            lo = self.node.kwargs.get("min", args[0])
            hi = self.node.kwargs.get("max", args[1])
            if self.node.target is F.hardtanh:
                lo = -1.0 if lo is None else lo
                hi = 1.0 if hi is None else hi
        def num(v: object, none_at: float) -> float | None:
            if v is None:
                return None
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise UnsupportedOpError(self.label, self.node.name, "only scalar limits are supported")
                v = float(v)
            if not isinstance(v, (int, float)):
                raise UnsupportedOpError(self.label, self.node.name, "limits must be constants")
            v = float(v)
            if v == none_at:  # min = −inf / max = +inf clip nothing (exporters write them for "none")
                return None
            if math.isinf(v) or math.isnan(v):
                raise UnsupportedOpError(self.label, self.node.name, f"limit {v} (an infinite or NaN clip value)")
            return v
        return num(lo, -math.inf), num(hi, math.inf)

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        self.limits()

    def constant(self) -> float | None:
        """``min > max``: ONNX Clip (and torch.clamp) return ``max`` everywhere."""
        a, b = self.limits()
        return b if a is not None and b is not None and a > b else None

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        return errs[0] * (0.0 if self.constant() is not None else 1.0)

    def ibp(self, vals: Sequence[Value]) -> Interval:
        k = self.constant()
        if k is None:
            return super().ibp(vals)
        itv: Interval = vals[0]
        v = torch.full_like(itv.lower, k)
        return Interval(v, v.clone())

    def relax(self, l: torch.Tensor, u: torch.Tensor, vals: Sequence[Value], alpha: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.constant()
        if k is not None:
            z = torch.zeros_like(l)
            return z, z + k, z, z + k
        a, b = self.limits()
        lw = torch.ones_like(l)
        uw = torch.ones_like(l)
        lb = torch.zeros_like(l)
        ub = torch.zeros_like(l)
        if a is not None:  # x -> max(x, a) = a + relu(x - a)
            w1l, b1l, w1u, b1u = _relu_relax(l - a, u - a, None)
            lw, lb = w1l, b1l - w1l * a + a
            uw, ub = w1u, b1u - w1u * a + a
        if b is not None:  # then subtract relu(x - b)
            w2l, b2l, w2u, b2u = _relu_relax(l - b, u - b, None)
            # lower of (g - r) = lower(g) - upper(r); upper = upper(g) - lower(r)
            lw, lb = lw - w2u, lb - (b2u - w2u * b)
            uw, ub = uw - w2l, ub - (b2l - w2l * b)
        return self.outward(lw, lb, uw, ub, l, u, _clip_exact(l, u, a, b))
