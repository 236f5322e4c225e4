"""When a certified logit margin also certifies the file's softmax output.

A model imported with a final ``Softmax``/``LogSoftmax`` (:mod:`certonnx.io.head`) is
certified on its logits ``z``. Exactly, the softmax keeps their order; in float32 it need not
keep it *strictly*: two logits ``z_y > z_j`` whose gap ``g`` is tiny give equal probabilities,
and onnxruntime's ``ArgMax`` then returns the first index, which may not be ``y``. Measured on
onnxruntime's CPU kernels, ``Softmax`` ties gaps up to ``2^-25`` next to a zero logit (where
``exp(-g)`` rounds to 1) and ``LogSoftmax`` up to half an ulp of ``log Σ exp``
(``2.4e-7`` with 100 classes). So with a head a sample counts as verified only when the
sound lower bound of every margin exceeds

    T = HEAD_ABS + HEAD_REL · M,   HEAD_ABS = 1e-5,   HEAD_REL = 2^-20,

``M`` a sound bound of ``max |z_i|`` over the input set (its IBP bound). Why that suffices
(``u = 2^-24``, exp computed with relative error ``ε_e``, ``K`` classes, ``g ≥ T``):

* ``p_i = fl(e_i / s)`` or ``fl(e_i · fl(1/s))`` with ``e_i = exp(fl(z_i − max z))``
  (onnxruntime, torch): ``z_y`` is the max, a common divisor keeps a strict order when
  ``e_y / e_j ≥ 1 + 4u``, which holds once ``g ≥ 4u + 2ε_e`` (the subtraction errs by
  ``u·g``);
* ``LogSoftmax`` as ``fl(fl(z_i − max z) − L)`` or ``fl(z_i − fl(max z + L))``,
  ``L = log Σ exp ≤ ln K``: strict once ``g ≥ 2u·(L + u·(M + L)) / (1 − u)``;
* an engine that subtracts another constant from the logits, or none, and whose exp errs by
  ``~u·|z|`` for large arguments (its argument reduction): ``g ≥ 4u + 2ε_e + 4u·M``.

With ``ε_e ≤ 2^-20`` (8× the ``2u`` measured for onnxruntime's kernel, division included) and
``K ≤ 2^31``, the absolute parts stay below ``4.7e-6``, and ``HEAD_REL = 16u`` is four times
the ``4u`` of the last case: ``T`` covers each case with a factor 2 or more to spare.
"""

from __future__ import annotations

from typing import Any

import torch

from certonnx.bounds import InputSet

#: absolute part of the margin a sample needs when the file ends in a softmax (module docstring)
HEAD_ABS = 1e-5
#: relative part, times the largest |logit| over the input set
HEAD_REL = 2.0 ** -20


def margin_threshold(magnitude: torch.Tensor) -> torch.Tensor:
    """``T`` for logits bounded by ``magnitude`` in absolute value (per sample)."""
    return HEAD_ABS + HEAD_REL * magnitude


def logit_magnitude(bm: Any, inset: InputSet) -> torch.Tensor:
    """Per sample, a sound bound of ``max_i |z_i|`` over the set (IBP: one interval pass)."""
    with torch.no_grad():
        lo, hi = bm.compute(inset, C=None, method="ibp")
    assert hi is not None
    return torch.maximum(lo.abs(), hi.abs()).flatten(1).amax(1)


def margins_certify(bm: Any, lb_min: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str,
                    domain: tuple[float, float] | None, head: Any) -> torch.Tensor:
    """Which samples are verified, given ``lb_min`` (the smallest margin lower bound, per sample,
    over the set ``x`` ± ``eps``): ``lb_min > 0`` without a head, ``lb_min > T`` with one (the
    logit bound is computed only for samples that can pass)."""
    if head is None:
        return lb_min > 0
    ok = lb_min > HEAD_ABS
    if bool(ok.any()):
        idx = torch.nonzero(ok).flatten()
        e = eps[idx] if isinstance(eps, torch.Tensor) and eps.ndim > 0 else eps
        mag = logit_magnitude(bm, InputSet(x[idx], e, norm=norm, domain=domain))
        ok[idx] = lb_min[idx] > margin_threshold(mag.to(lb_min.dtype))
    return ok


__all__ = ["HEAD_ABS", "HEAD_REL", "logit_magnitude", "margin_threshold", "margins_certify"]
