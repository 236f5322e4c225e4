"""Floating-point rounding: the error terms that make bounds hold for float32 execution.

A certificate is about the model as an inference engine runs it: in float32, with each dot
product summed in an order we do not know, possibly with ops fused (a BatchNorm folded into the
convolution before it, a bias or a residual added inside the accumulation). Exact-arithmetic
bounds can be wrong there: a wide dot product loses ~``n·u`` of its magnitude, which can be far
more than a small output value.

The error model (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1): a float32 sum
of ``n`` terms, in any order, satisfies ``|fl(Σ a_i) − Σ a_i| ≤ γ_n Σ|a_i|`` with
``γ_n = n·u / (1 − n·u)`` and ``u = 2⁻²⁴``, as long as no term underflows. So an affine op
``y = W x + b`` evaluated in float32 satisfies

    |fl(W x + b) − (W x + b)| ≤ γ_n (|W| |x| + |b|)        (n = fan-in + 1),

and the bound engine treats every affine op as ``y = W x + b + e`` with ``e`` in that box. Two
further sources are covered by the same term:

* **the engine's own float32 arithmetic** makes errors of the same form and size: IBP's centre
  ``W c + b`` and radius ``|W| r`` err by ``γ_n (|W||c| + |b|)`` and ``γ_n |W| r``, together
  ``γ_n (|W| max|x| + |b|)``; CROWN's product ``A·W`` and bias ``A·b`` err by
  ``γ_n |A| (|W| max|x| + |b|)`` on the bound. Every rule therefore uses ``2·γ_N``, one ``γ``
  for the model and one for the engine, and the ``FUSION_SLACK`` terms in ``N`` leave room for
  the few further roundings (the error term itself, the centre/radius ↔ lower/upper
  conversions, a folded BatchNorm scale);
* **fusions and any summation order**: the bound holds for any order of the ``n`` terms; an
  addend that an optimiser moves into its producer's accumulation (a bias after a MatMul, a
  residual added inside a convolution's GEMM) is sized with the producer's fan-in, and
  :data:`FUSION_SLACK` extra terms cover the few roundings of a folded BatchNorm scale and of
  the engine's own bookkeeping.

Underflow: products below the smallest normal number (and inputs an engine flushes to zero)
err by an absolute amount, at most :data:`TINY` per term; :func:`absolute_slack` adds that.

Elementwise transcendental functions (sigmoid, tanh, erf) are not correctly rounded in any
engine. :data:`ACTIVATION_ERROR` is the absolute error allowed for them, 6× the largest error
measured for onnxruntime's and torch's CPU kernels over 3·10⁶ float32 inputs in [−30, 30]
(1.7e-7 for sigmoid, 3.3e-7 for tanh; erf: 6.0e-8 over 2·10⁷ inputs, see below).

GELU's error grows with ``|x|`` (its result is about ``x`` for ``x > 0``, so one rounding of it
is ``u·|x|``), so it is allowed :func:`gelu_error`, ``GELU_ERROR_ABS + GELU_ERROR_REL·|x|``.
Measured against float64 over 2.1·10⁷ float32 inputs (a dense grid of [−30, 30] and of [−6, 6],
every 7th float32 of ±[0.25, 6], 10⁶ log-uniform magnitudes up to 10³⁰), for onnxruntime 1.32's
``Gelu`` (opset 20, both forms), ``com.microsoft:Gelu``/``FastGelu``, the decomposed erf and tanh
patterns with and without graph optimisation, and torch's ``F.gelu`` (both forms, vectorised and
small-tensor paths): the largest error is 1.4e-7 for ``|x| < 1`` and ``3.74e-7·|x|`` for
``|x| ≥ 1`` (torch's vectorised ``F.gelu``; onnxruntime: 1.1e-7·|x| erf form, 2.0e-7·|x| tanh
form). The constants are more than 6× those, and also cover what fusing a decomposed GELU whose
constants are within ``τ = 2⁻²²`` of the exact ones changes (``≤ 1.5τ|x| + 0.3τ``, see
:func:`certonnx.io.passes.fuse_gelu`). Inputs beyond ~1.7e38, where ``x·(1 + erf)`` overflows
in the decomposed form, are not modelled (as everywhere, see below).

Numbers beyond float32's range are not modelled: weights beyond ~1e18 are refused at import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: unit roundoff of float32 (round to nearest)
U32 = 2.0**-24
#: extra summation terms allowed for ops fused into an accumulation (bias, BatchNorm, residual)
FUSION_SLACK = 8
#: smallest normal float32: bound on the absolute error of one underflowing / flushed term
TINY = 2.0**-126
#: absolute error allowed for float32 sigmoid / tanh / erf kernels (see the module docstring)
ACTIVATION_ERROR = 2e-6
#: error allowed for float32 GELU kernels: ``GELU_ERROR_ABS + GELU_ERROR_REL·|x|`` (docstring)
GELU_ERROR_ABS = 2e-6
GELU_ERROR_REL = 3e-6
#: unit roundoff of the targets of a Cast (relative error of one rounding to that type)
CAST_UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: U32, torch.float64: 0.0}
#: smallest positive normal number of each type: absolute error bound of a cast near zero
CAST_TINY = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-126, torch.float32: TINY, torch.float64: 0.0}
#: largest finite value of each type: a cast beyond it gives inf
CAST_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.3895e38, torch.float32: 3.4028e38, torch.float64: float("inf")}


_EXACT = False


@contextmanager
def exact_arithmetic() -> Iterator[None]:
    """Bounds for the model in *exact* arithmetic (no rounding terms) inside the block.

    Not sound for any float execution: for measuring what the rounding terms cost
    (``tools/bench/rounding.py``) and for tests of the exact relaxations. Applies to bound
    modules whose first bound pass runs inside the block."""
    global _EXACT
    old, _EXACT = _EXACT, True
    try:
        yield
    finally:
        _EXACT = old


def activation_error() -> float:
    """:data:`ACTIVATION_ERROR`, or 0 inside :func:`exact_arithmetic`."""
    return 0.0 if _EXACT else ACTIVATION_ERROR


def gelu_error() -> tuple[float, float]:
    """``(GELU_ERROR_ABS, GELU_ERROR_REL)``, or zeros inside :func:`exact_arithmetic`."""
    return (0.0, 0.0) if _EXACT else (GELU_ERROR_ABS, GELU_ERROR_REL)


def gamma(n: int) -> float:
    """``γ_n = n·u / (1 − n·u)`` for float32."""
    nu = n * U32
    if nu >= 0.5:
        raise ValueError(f"a sum of {n} float32 terms has no useful error bound")
    return nu / (1.0 - nu)


def engine_gamma(max_fan_in: int) -> float:
    """The error factor of a rule: ``2·γ_N`` with ``N`` the fan-in plus :data:`FUSION_SLACK`
    (see the module docstring for why 2 and why the slack)."""
    if _EXACT:
        return 0.0
    return 2.0 * gamma(max(1, max_fan_in) + FUSION_SLACK)


def absolute_slack(n: int) -> float:
    """Absolute error of ``n`` underflowing (or flushed-to-zero) terms."""
    if _EXACT:
        return 0.0
    return (n + FUSION_SLACK) * TINY


def magnitude(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``max(|l|, |u|)``: the largest absolute value of a tensor bounded by ``[l, u]``."""
    return torch.maximum(lower.abs(), upper.abs())
