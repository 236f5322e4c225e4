"""Pooling: average pools (linear) and max pooling (relaxed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from certonnx.bounds.core import AMat, Interval
from certonnx.bounds.rule import BackwardResult, Rule, Value, register
from certonnx.bounds.rules.common import MonotoneLinearRule, window_multiplicity, with_rounding
from certonnx.errors import UnsupportedOpError


def _pair(v: object) -> tuple[int, int]:
    """A pooling parameter (an int or a pair, as an fx node argument) as a pair of ints."""
    if isinstance(v, int):
        return v, v
    assert isinstance(v, Sequence), f"pooling parameter {v!r}"
    return int(v[0]), int(v[1])


@register
class AvgPoolRule(MonotoneLinearRule):
    """AvgPool, GlobalAveragePool, adaptive average pooling, mean over spatial dims."""

    label = "AvgPool"
    module_types = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    functions = (F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean)
    method_names = ("mean",)
    onnx2torch_names = ("OnnxGlobalAveragePool", "OnnxGlobalAveragePoolWithKnownInputShape")

    sums = True

    def fan_in(self, vals: Sequence[Value]) -> int:
        """Elements averaged into one output: the kernel for AvgPool, at most
        ``ceil(in/out) + 1`` per axis for adaptive pooling, ``in/out`` for global means."""
        m = self.module
        ins, out = self.in_shapes[0], self.out_shape
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            k = m.kernel_size
            return math.prod(k) if isinstance(k, (tuple, list)) else int(k) ** (len(ins) - 1)
        if self.node.target is F.avg_pool2d:
            return math.prod(_pair(self.node.kwargs.get("kernel_size", self.node.args[1] if len(self.node.args) > 1 else 1)))
        n_in, n_out = math.prod(ins), max(1, math.prod(out))
        if len(ins) == len(out) and len(ins) > 1:  # adaptive: per spatial axis
            return math.prod(-(-a // max(1, b)) + 1 for a, b in zip(ins[1:], out[1:]))
        return -(-n_in // n_out)

    def _tiles(self) -> tuple[int, int] | None:
        """``(kh, kw)`` when the op is an ``nn.AvgPool2d`` whose windows tile the input (kernel
        = stride, no padding, floor mode, no divisor override): its CROWN step then spreads
        each coefficient evenly over its window, which needs no autograd."""
        m = self.module
        if not isinstance(m, nn.AvgPool2d) or m.divisor_override is not None or m.ceil_mode:
            return None
        k, st, pad = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
        if k != st or pad != (0, 0) or not self.in_shapes or len(self.in_shapes[0]) != 3:
            return None
        return k

    def ibp_stop(self) -> bool:
        """Tiling windows: every input element is in at most one window, with weight 1/k ≥ 0,
        so for any coefficients ``a`` on the outputs ``|a·P| = |a|·P`` elementwise and the
        interval of the pooled output gives exactly the bound of pulling ``a`` through the
        pool (centre ``a·P·c``, radius ``|a|·P·r``): IBP's elision stops here."""
        return self._tiles() is not None

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        """The VJP of tiling windows written out: each output coefficient, divided by the
        window size, on every element of its window (elements the floor mode leaves out get
        0). Same values as the generic VJP (the same division), a few times faster: this is
        the step IBP's elision of an affine tail takes through a pooling layer."""
        tiles = self._tiles()
        if tiles is None:
            return super().backward(lA, uA, vals, alpha)
        kh, kw = tiles
        _, H, W = self.in_shapes[0]

        def spread(A: AMat) -> AMat:
            if A is None:
                return None
            ho, wo = A.shape[-2:]
            a = A / (kh * kw)
            g = a[..., :, None, :, None].expand(*a.shape[:-2], ho, kh, wo, kw).reshape(*a.shape[:-2], ho * kh, wo * kw)
            return g if (ho * kh, wo * kw) == (H, W) else F.pad(g, (0, W - wo * kw, 0, H - ho * kh))

        bl, bu = with_rounding(0.0, 0.0, lA, uA, self.rounding(vals))
        return [(spread(lA), spread(uA))], bl, bu

    # lipschitz: the exact non-negative-map bound of MonotoneLinearRule (partial windows of
    # ceil_mode, count_include_pad=False divisors and upsampling included)


@register
class MaxPoolRule(Rule):
    """2-D max pooling.

    IBP: max pooling is monotone. CROWN: the lower line is the window element with the largest
    lower bound (``max ≥ x_k``); the upper line is that same element where it dominates its
    window (its lower bound exceeds every other upper bound, so max = x_k exactly), and the
    constant ``max u`` elsewhere. Windows are formed with unfold, so overlapping windows and
    padding (by -inf) are handled, and the backward step is a fold (a scatter-add).

    α-CROWN (windows that tile the input): the lower line is any convex combination of the
    window's elements, ``max ≥ Σ λ_i x_i`` with ``λ`` on the simplex — one variable per input
    element, ``λ = α / Σ_window α``, starting from CROWN's element (auto_LiRPA
    ``operators/pooling.py`` optimises the same lines, projecting onto the simplex).
    """

    label = "MaxPool"
    affine = False
    alpha_slopes = 1
    module_types = (nn.MaxPool2d,)
    functions = (F.max_pool2d,)

    def _params(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], bool]:
        m = self.module
        if isinstance(m, nn.MaxPool2d):
            k = _pair(m.kernel_size)
            s = _pair(m.stride if m.stride else m.kernel_size)
            return k, s, _pair(m.padding), _pair(m.dilation), bool(m.ceil_mode or m.return_indices)
        args = list(self.node.args) + [None] * 6
        kw = self.node.kwargs
        k = _pair(kw.get("kernel_size", args[1]))
        st = kw.get("stride", args[2])
        s = _pair(st) if st else k
        p = _pair(kw.get("padding", args[3] if args[3] is not None else 0))
        d = _pair(kw.get("dilation", args[4] if args[4] is not None else 1))
        bad = bool(kw.get("ceil_mode", args[5] or False)) or bool(kw.get("return_indices", args[6] or False))
        return k, s, p, d, bad

    def check(self, gm: fx.GraphModule) -> None:
        if self.pert != [0]:
            raise UnsupportedOpError(self.label, self.node.name, "only one input")
        if self._params()[4]:
            raise UnsupportedOpError(self.label, self.node.name, "ceil_mode / return_indices")

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        lo = self.call_with(vals, {0: itv.lower})
        if bool(torch.isneginf(lo).any()) and bool(torch.isfinite(itv.lower).all()):
            # dilation and padding can put a whole window in the padding: its output is −inf
            # whatever the input, which no finite bound describes
            raise UnsupportedOpError(self.label, self.node.name, "a pooling window lies entirely in the padding")
        return Interval(lo, self.call_with(vals, {0: itv.upper}))

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        # |max_w(a + d) − max_w(a)| ≤ max_w |d|
        return self.call_with(vals, {0: errs[0]})

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, kk, L) windows, padding with -inf."""
        k, s, p, d, _ = self._params()
        N, C = t.shape[:2]
        tp = F.pad(t, (p[1], p[1], p[0], p[0]), value=float("-inf")) if any(p) else t
        w = F.unfold(tp.reshape(N * C, 1, *tp.shape[2:]), k, dilation=d, stride=s)
        return w.reshape(N, C, k[0] * k[1], -1)

    def _tiles(self) -> bool:
        """Whether the windows tile the input (kernel = stride, no padding or dilation): each
        element lies in at most one window, and the CROWN step's fold is a transpose."""
        k, s, p, d, _ = self._params()
        return s == k and d == (1, 1) and p == (0, 0)

    def has_alpha(self) -> bool:
        """Free lower lines only where the windows tile (one variable per input element is
        then one per window element)."""
        return self._tiles()

    def alpha_init(self, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """1 on each window's element with the largest lower bound (CROWN's line), else 0."""
        lw = self._windows(l)
        sel = torch.zeros_like(lw).scatter_(2, lw.argmax(2, keepdim=True), 1.0)
        return self._from_windows(sel.unsqueeze(1), l.shape).squeeze(1)

    def alpha_project(self, alpha: torch.Tensor) -> None:
        """Each window's variables onto the probability simplex (the Euclidean projection,
        Duchi et al. 2008; auto_LiRPA ``project_simplex``), so that Adam's steps move the
        convex combination itself."""
        w = self._to_windows(alpha)
        srt = w.sort(3, descending=True).values
        css = srt.cumsum(3) - 1
        j = torch.arange(1, w.shape[3] + 1, device=w.device, dtype=w.dtype).view(-1, 1)
        rho = ((srt - css / j) > 0).to(w.dtype).mul(j).amax(3, keepdim=True).clamp(min=1)
        theta = css.gather(3, rho.long() - 1) / rho
        alpha.copy_(self._from_windows((w - theta).clamp(min=0), alpha.shape))

    def _from_windows(self, w: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Tiling windows ``(B, S, C, kk, L)`` back to the input ``(B, S, C, H, W)`` (a
        transpose; elements past the last window get 0)."""
        k = self._params()[0]
        B, S, C = w.shape[:3]
        H, W = shape[-2:]
        ho, wo = H // k[0], W // k[1]
        img = w.reshape(B, S, C, k[0], k[1], ho, wo).permute(0, 1, 2, 5, 3, 6, 4).reshape(B, S, C, ho * k[0], wo * k[1])
        return img if (ho * k[0], wo * k[1]) == (H, W) else F.pad(img, (0, W - wo * k[1], 0, H - ho * k[0]))

    def _to_windows(self, a: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_from_windows`: ``(B, S, C, H, W)`` -> ``(B, S, C, kk, L)``."""
        k = self._params()[0]
        B, S, C, H, W = a.shape
        ho, wo = H // k[0], W // k[1]
        a = a[..., : ho * k[0], : wo * k[1]].reshape(B, S, C, ho, k[0], wo, k[1])
        return a.permute(0, 1, 2, 4, 6, 3, 5).reshape(B, S, C, k[0] * k[1], ho * wo)

    def _alpha_lines(self, alpha: torch.Tensor, sel: torch.Tensor, lw: torch.Tensor, uw: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The window weights ``λ (B, S, C, kk, L)`` of α's lower lines and the allowance
        ``(B, S, C, L)`` their float32 sum's distance from 1 costs: ``Σλx = max x + Σλ(x − max x)
        + (Σλ − 1)·max x ≤ max x + |Σλ − 1|·max|x|``. ``|Σλ − 1|`` is the computed sum's
        distance plus that sum's rounding (``γ_kk``) and one rounding of each product ``A·λ``
        (``u``): ``(kk + 1)·γ`` covers both (the rule's ``γ`` is at least ``2u``). A window
        whose variables are all 0 takes CROWN's element."""
        a = self._to_windows(alpha)
        tot = a.sum(3, keepdim=True)
        lam = torch.where(tot > 1e-12, a / tot.clamp(min=1e-12), sel.unsqueeze(1))
        kk = lam.shape[3]
        off = (lam.detach().sum(3) - 1).abs() + (kk + 1) * self.gamma
        mag = torch.maximum(lw.abs(), uw.abs()).amax(2).unsqueeze(1)
        return lam, off * mag + self.tiny

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        itv: Interval = vals[0]
        k, s, p, d, _ = self._params()
        lw, uw = self._windows(itv.lower), self._windows(itv.upper)  # (B, C, kk, L)
        kk = lw.shape[2]
        idx = lw.argmax(2, keepdim=True)  # element with the best lower bound
        sel = torch.zeros_like(lw).scatter_(2, idx, 1.0)
        u_others = uw.masked_fill(sel.bool(), float("-inf")).amax(2)  # (B, C, L)
        l_k = lw.gather(2, idx).squeeze(2)
        dominant = l_k >= u_others
        umax = uw.amax(2)
        C = lw.shape[1]
        H, W = self.in_shapes[0][1:]
        Hp, Wp = H + 2 * p[0], W + 2 * p[1]

        tiles = self._tiles()

        def to_input(A: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            # A: (B, S, C, Ho, Wo); first / second: (B, C, kk, L) or per row (B, S, C, kk, L),
            # the window coefficients of A's non-negative / negative entries -> (B, S, C, H, W)
            Bn, S = A.shape[:2]
            Ar = A.reshape(Bn, S, C, 1, -1)
            first = first if first.ndim == 5 else first.unsqueeze(1)
            second = second if second.ndim == 5 else second.unsqueeze(1)
            # one product per entry is non-zero, so the sum is exact (a select is slower on CPU)
            Aw = Ar.clamp(min=0) * first + Ar.clamp(max=0) * second  # (B, S, C, kk, L)
            if tiles:
                # windows tile the input: the fold is a transpose (each element in one window;
                # rows and columns past the last window get 0)
                return self._from_windows(Aw, (H, W))
            cols = Aw.reshape(Bn * S * C, kk, -1)
            img = F.fold(cols, (Hp, Wp), k, dilation=d, stride=s)  # sums overlapping windows
            img = img.reshape(Bn, S, C, Hp, Wp)
            return img[..., p[0]:p[0] + H, p[1]:p[1] + W]

        nl = nu = None
        bl: torch.Tensor | float = 0.0
        bu: torch.Tensor | float = 0.0
        up_coef = sel * dominant.unsqueeze(2)
        up_const = torch.where(dominant, torch.zeros_like(umax), umax)  # (B, C, L)
        if lA is not None:
            bl = (lA.clamp(max=0).reshape(*lA.shape[:3], -1) * up_const.unsqueeze(1)).flatten(2).sum(2)
            if alpha is not None and tiles:
                lam, slack = self._alpha_lines(alpha, sel, lw, uw)
                nl = to_input(lA, lam, up_coef)
                bl = bl - (lA.clamp(min=0).reshape(*lA.shape[:3], -1) * slack).flatten(2).sum(2)
            else:
                nl = to_input(lA, sel, up_coef)
        if uA is not None:
            nu = to_input(uA, up_coef, sel)
            bu = (uA.clamp(min=0).reshape(*uA.shape[:3], -1) * up_const.unsqueeze(1)).flatten(2).sum(2)
        if window_multiplicity(k, s, d) > 1:
            # overlapping windows: the fold sums coefficients, erring by γ·Σ|A|·(window max |x|)
            mag = self.call_with(vals, {0: itv.center.abs() + itv.radius}) * self.gamma + self.tiny
            bl, bu = with_rounding(bl, bu, lA, uA, mag)
        return [(nl, nu)], bl, bu

    def fan_in(self, vals: Sequence[Value]) -> int:
        k, s, _, d, _ = self._params()
        return window_multiplicity(k, s, d)

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        """L∞: 1. L2: ``‖max_w(x) − max_w(y)‖² ≤ Σ_w max_{i∈w} |x_i − y_i|² ≤ Σ_w Σ_{i∈w} δ_i²
        ≤ mult · ‖δ‖²`` with ``mult`` the most windows sharing one element
        (:func:`window_multiplicity`, dilation included)."""
        k, s, _, d, _ = self._params()
        if norm == "l2":
            return math.sqrt(window_multiplicity(k, s, d))
        return 1.0
