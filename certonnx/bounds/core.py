"""Basic objects of the bound engine: intervals, input sets and specifications.

Shapes used throughout the engine:

* a perturbed tensor has shape ``(B, *s)``: batch first, ``s`` the per-sample shape;
* a linear bound on it is a matrix ``A`` of shape ``(B, S, *s)``: ``S`` specification rows
  (e.g. the K-1 margins ``y_true - y_j``) for each of the ``B`` samples.
"""

from __future__ import annotations

import torch

from certonnx.bounds.rounding import U32, absolute_slack, engine_gamma

NORMS = ("linf", "l2", "l1")

#: a bound matrix ``(B, S, *s)``, or ``None`` where that side of the bound is not wanted
AMat = torch.Tensor | None


def per_sample_flat(t: torch.Tensor, lead: int = 1) -> torch.Tensor:
    """``t`` with everything after its first ``lead`` axes in one axis (also for tensors with
    no per-sample axis at all, e.g. a scalar per sample of shape ``(B,)`` or ``(B, S)``)."""
    return t.reshape(*t.shape[:lead], -1)


def box_concretize(Af: torch.Tensor, c: torch.Tensor, r: torch.Tensor, sign: float,
                   x0: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                   ball_norm: str = "l2") -> torch.Tensor:
    """min (sign=-1) / max (sign=+1) of ``Af · v`` over the box ``c ± r`` (and, with ``x0`` and
    ``eps``, also over the ball (``ball_norm`` ``"l2"`` or ``"l1"``) ``‖v − x0‖ ≤ eps``, taking the
    tighter), shape ``(B, S)``. Over a ball the bound is ``Af·x0 ± eps·‖Af‖_*`` with the dual
    norm: L2 for L2, L∞ (the largest |coefficient|, exact in float) for L1.

    ``Af`` is ``(B, S, n)``, ``c``/``r``/``x0`` are ``(B, n, 1)``. Sound in float32: the radius
    is widened by the rounding of the centre/radius conversion, and the result by the rounding
    error of its own dot products (``2·γ_n`` of their absolute value, see
    :mod:`certonnx.bounds.rounding`).
    """
    n = Af.shape[2]
    g = engine_gamma(n)
    if g:
        r = r + 2 * U32 * (c.abs() + r)
    aa = Af.abs()
    cols = [r, c.abs() + r] + ([x0.abs()] if x0 is not None else [])
    mags = torch.bmm(aa, torch.cat(cols, -1))  # (B, S, 2 or 3)
    slack = absolute_slack(n)
    box = torch.bmm(Af, c).squeeze(-1) + sign * (mags[..., 0] + g * mags[..., 1] + slack)
    if x0 is None or eps is None:
        return box
    norm = Af.norm(dim=2) * (1 + g) if ball_norm == "l2" else aa.amax(2)
    e = eps[:, None]
    ball = torch.bmm(Af, x0).squeeze(-1) + sign * (norm * e + g * (mags[..., 2] + norm * e) + slack)
    return torch.maximum(box, ball) if sign < 0 else torch.minimum(box, ball)


#: ``(center, eps (B,), norm)``: an L2 or L1 ball the values of a node lie in (see Interval)
Ball = tuple[torch.Tensor, torch.Tensor, str]


class Interval:
    """Element-wise lower/upper bounds of a perturbed tensor.

    It can be built from ``(lower, upper)`` or, by affine rules, from ``(center, radius)``;
    the other pair is computed on first use and cached. Affine layers consume centre/radius and
    activations consume lower/upper, so a conv → BatchNorm chain never converts back and forth.

    ``ball`` optionally records that the tensor lies in a ball ``(center, eps, norm)`` of the
    *same* shape (eps per sample, shape ``(B,)``; norm ``"l2"`` or ``"l1"``). Shape-only ops and
    scalar affine ops keep it, so the first dense or conv layer after the input can bound the set
    with the dual norm (``eps * ||row||_2`` for L2, ``eps * max|row|`` for L1) instead of the
    much looser enclosing box. (An L1 ball is also an L2 ball of the same radius, so reading an
    L1 ball as L2 would be loose but sound; the reverse never happens: only the input set makes
    an L1 ball.)
    """

    __slots__ = ("_lower", "_upper", "_center", "_radius", "ball")

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor,
                 ball: Ball | None = None) -> None:
        self._lower: torch.Tensor | None = lower
        self._upper: torch.Tensor | None = upper
        self._center: torch.Tensor | None = None
        self._radius: torch.Tensor | None = None
        self.ball = ball

    @staticmethod
    def from_center(center: torch.Tensor, radius: torch.Tensor,
                    ball: Ball | None = None) -> Interval:
        itv = Interval.__new__(Interval)
        itv._lower = itv._upper = None
        itv._center, itv._radius, itv.ball = center, radius, ball
        return itv

    @property
    def lower(self) -> torch.Tensor:
        if self._lower is None:
            assert self._center is not None and self._radius is not None
            self._lower = self._center - self._radius
        return self._lower

    @property
    def upper(self) -> torch.Tensor:
        if self._upper is None:
            assert self._center is not None and self._radius is not None
            self._upper = self._center + self._radius
        return self._upper

    @property
    def center(self) -> torch.Tensor:
        if self._center is None:
            # in place on the fresh sum: one allocation less per conversion (CPU large-tensor
            # allocations are page faults), autograd-safe since add does not save its output
            assert self._upper is not None and self._lower is not None
            self._center = torch.add(self._upper, self._lower).mul_(0.5)
        return self._center

    @property
    def radius(self) -> torch.Tensor:
        if self._radius is None:
            assert self._upper is not None and self._lower is not None
            self._radius = torch.sub(self._upper, self._lower).mul_(0.5)
        return self._radius

    @property
    def shape(self) -> torch.Size:
        """Shape of the bounded tensor (without converting between the two representations)."""
        t = self._lower if self._lower is not None else self._center
        assert t is not None
        return t.shape

    def widen(self, e: torch.Tensor | float) -> Interval:
        """The interval grown by ``e`` (≥ 0) on both sides: room for rounding errors. The ball,
        which describes exact values, is dropped."""
        if self._center is not None and self._radius is not None:
            return Interval.from_center(self._center, self._radius + e)
        return Interval(self.lower - e, self.upper + e)

    def intersect(self, other: Interval) -> Interval:
        """Both are sound, so their intersection is too (and never looser)."""
        return Interval(torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper), self.ball)


class Folded:
    """Value of an affine layer folded into the eval-mode BatchNorm after it: IBP computed no
    bounds of its own, only the pair's ``output`` (the BatchNorm's interval)."""

    __slots__ = ("output",)

    def __init__(self, output: Interval) -> None:
        self.output = output

    def __repr__(self) -> str:
        return "<folded into the next BatchNorm>"


def _per_sample(v: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a ``(B,)`` tensor against ``x`` of shape ``(B, *s)``."""
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"eps must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class InputSet:
    """The perturbation set: a norm ball around ``x`` intersected with the input domain.

    ``domain`` is the box of valid raw inputs (pixels in [0, 1] by default). Intersecting with
    it is sound (the true set is smaller) and makes bounds tighter. For L2 and L1 the
    intersection of a ball and a box has no closed-form linear bound; we take the better of the
    ball bound and the box bound, each of which is valid for the intersection. The box of an
    L2 or L1 ball of radius ε is ``x ± ε`` (every coordinate moves by at most the norm).
    """

    def __init__(
        self,
        x: torch.Tensor,
        eps: float | torch.Tensor,
        norm: str = "linf",
        domain: tuple[float, float] | tuple[torch.Tensor, torch.Tensor] | None = (0.0, 1.0),
    ) -> None:
        norm = norm.lower()
        if norm in ("inf", "l_inf", "linfty"):
            norm = "linf"
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r} (expected one of {NORMS})")
        self.x = x
        self.norm = norm
        self.eps = _per_sample(eps, x)
        if torch.any(self.eps < 0):
            raise ValueError("eps must be non-negative")
        epsb = self.eps.view(-1, *([1] * (x.ndim - 1)))
        # x ± ε in float32 (and ε itself, converted from the user's decimal) round: widen by
        # 2u(|x| + ε) so that every float32 input within ε of x is inside the box
        slack = (x.abs() + epsb) * (2 * U32) if bool((self.eps > 0).any()) else 0.0
        lo, hi = x - epsb - slack, x + epsb + slack
        #: the radius the L2 bounds use: ε widened by its float32 conversion (``eps`` stays the
        #: nominal radius, so a set built from another set's ``eps`` is the same set)
        self.ball_eps = self.eps * (1 + 4 * U32)
        if domain is not None:
            dlo = torch.as_tensor(domain[0], dtype=x.dtype, device=x.device)
            dhi = torch.as_tensor(domain[1], dtype=x.dtype, device=x.device)
            lo, hi = torch.maximum(lo, dlo), torch.minimum(hi, dhi)
            # a point outside the domain (e.g. unnormalized data) still yields a non-empty box
            lo = torch.minimum(lo, x)
            hi = torch.maximum(hi, x)
        self.lower, self.upper = lo, hi

    @classmethod
    def from_box(cls, lower: torch.Tensor, upper: torch.Tensor) -> InputSet:
        """An arbitrary box (VNN-LIB properties, input splitting), treated as an L∞ set."""
        if torch.any(lower > upper):
            raise ValueError("box lower bound exceeds upper bound")
        self = cls.__new__(cls)
        self.x = (lower + upper) / 2
        self.norm = "linf"
        self.eps = ((upper - lower) / 2).flatten(1).amax(1)
        self.ball_eps = self.eps
        self.lower, self.upper = lower, upper
        return self

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def take(self, sl: slice) -> InputSet:
        """The same sets for the samples ``sl`` of the batch (each sample's set is its own)."""
        out = InputSet.__new__(InputSet)
        out.x, out.norm, out.eps, out.ball_eps = self.x[sl], self.norm, self.eps[sl], self.ball_eps[sl]
        out.lower, out.upper = self.lower[sl], self.upper[sl]
        return out

    def interval(self) -> Interval:
        """The enclosing box; for L2 and L1 it also carries the ball for the first layer's dual
        norm."""
        ball = (self.x, self.ball_eps, self.norm) if self.norm in ("l2", "l1") else None
        return Interval(self.lower, self.upper, ball)

    def concretize(self, A: torch.Tensor, sign: float) -> torch.Tensor:
        """min (sign=-1) or max (sign=+1) of ``A · x'`` over the set, shape ``(B, S)``.

        ``A`` has shape ``(B, S, *s)``.
        """
        c = ((self.upper + self.lower) / 2).flatten(1).unsqueeze(-1)
        r = ((self.upper - self.lower) / 2).flatten(1).unsqueeze(-1)
        if self.norm == "linf":
            return box_concretize(per_sample_flat(A, 2), c, r, sign)
        return box_concretize(per_sample_flat(A, 2), c, r, sign, self.x.flatten(1).unsqueeze(-1), self.ball_eps,
                              ball_norm=self.norm)


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Specification rows ``e_y - e_j`` for every ``j != y``: shape ``(B, K-1, K)``.

    The sample is verified when the lower bound of every row is positive.
    """
    eye = torch.eye(num_classes, device=y.device)
    full = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K), row j = e_y - e_j
    keep = torch.arange(num_classes, device=y.device).unsqueeze(0) != y.unsqueeze(1)
    return full[keep].view(y.shape[0], num_classes - 1, num_classes)


def concretize_interval(A: torch.Tensor, itv: Interval, sign: float) -> torch.Tensor:
    """min (sign=-1) / max (sign=+1) of ``A · v`` over the box ``itv``: ``(B, S)``."""
    return box_concretize(per_sample_flat(A, 2), per_sample_flat(itv.center).unsqueeze(-1),
                          per_sample_flat(itv.radius).unsqueeze(-1), sign)


def rounding_term(A: AMat, err: torch.Tensor) -> torch.Tensor | float:
    """``Σ |A| · err`` over the per-sample dims, ``(B, S)``: what a bias term loses to an op's
    rounding error ``err`` (one value per output element, ``(B, *out)`` or broadcastable).

    Computed without gradient: the allowance is ~1e-6 of the bound, its gradient would only
    steer an optimiser (α-CROWN, training) by as little, and its backward pass (through
    ``|A|``, every step's largest tensor) cost a tenth of α-CROWN's time."""
    if A is None:
        return 0.0
    with torch.no_grad():
        return per_sample_flat(A.abs() * err.unsqueeze(1), 2).sum(2)
