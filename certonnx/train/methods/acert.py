"""ACERT: adaptive certified training (Nurlanov, Schmidt & Bernard, ECML-PKDD 2024).

Fixed-ε certified training (IBP, CROWN-IBP, ...) asks *every* sample to be robust at the same
ε, which over-regularises samples near the decision boundary and costs clean accuracy. ACERT
instead trains each sample at its *own* certified radius:

1. **Per-sample radius** (no gradient): ε_i ∈ [0, ε_max] is the root of
   ``g_i(ε) = -min_j lb_ij(ε)``, the negated lower bound of the margins ``f_y - f_j`` over the
   ε-ball, i.e. the largest ε the bound still certifies. Misclassified samples get ε_i = 0,
   samples certified at ε_max get ε_max. The root is found for the whole minibatch at once by
   batched bisection (:func:`certonnx.certify.radius.certified_radius`): every pass is one
   bound computation with a per-sample ε tensor. IBP bounds are monotone in ε, so bisection
   brackets the root; the value returned is the lower end of the bracket, which *is* certified.
2. **Adaptive loss** (with gradient) at the found radii:
   ``(1-κ) · CE(-lb(ε_i)) + κ · CE(f(x), y)``. At ε_i = 0 the margin bounds are the clean
   margins, so a misclassified sample's robust term is its clean cross-entropy (as in the
   authors' code). Bounds are IBP as in the paper (``--method-opt acert_bounds=crown-ibp`` is
   possible). During the ε ramp the Shi et al. regularisers apply (when the trainer enables
   them), and the radii are clipped from below at ``acert_min_eps`` so that every sample
   contributes non-degenerate intervals to them (the authors' ``min_eps_for_regularizers``).
3. ε_max follows the trainer's ε schedule (``ctx.eps``: warm-up at 0, then the ramp to the
   ``--norm`` target); before the ramp starts the loss is the clean cross-entropy.

Flags (``--method-opt KEY=VALUE``, declared in :class:`ACERT.Options`): ``acert_kappa`` (κ,
0 as in the authors' configs; the paper's trade-off curves sweep it), ``acert_bounds`` (ibp |
crown-ibp), ``acert_iters`` (bisection passes after the ε_max check, resolution
ε_max/2^iters), ``acert_min_eps``, ``acert_eps_max`` (optional cap on the radius search,
scaled by the ramp like ε; default: the ``--norm`` target).

Deviation from the paper: the authors use Brent's method with a tolerance; we use a fixed
number of bisection passes (predictable cost: 1 + ``acert_iters`` bound passes per step) and
take the certified end of the bracket. ``cert_acc`` during training is the fraction certified
at the current ε_max (free: those are the samples whose radius is ε_max).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from certonnx.bounds import BoundedModule
from certonnx.certify.radius import certified_radius
from certonnx.train.methods.base import (
    Method,
    StepContext,
    accuracy,
    add_regularizer,
    bound_margins,
    input_set,
    robust_ce,
)
from certonnx.train.methods.options import MethodOptions, option

if TYPE_CHECKING:
    from certonnx.train.methods.base import ModelFn, Stats


BOUNDS = ("ibp", "crown-ibp")
# newer radius.py versions accept the known correctness (no extra forward pass, which in training
# mode would also update BatchNorm running statistics once more per step)
_TAKES_CORRECT = "correct" in inspect.signature(certified_radius).parameters


def adaptive_radii(bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, eps_max: float, norm: str,
                   *, method: str = "ibp", iters: int = 8, domain: tuple[float, float] = (0.0, 1.0),
                   num_classes: int | None = None, correct: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample certified radii ``(B,)`` in ``[0, eps_max]`` on the device of ``x``, no gradient.

    One bound pass at ``eps_max`` plus at most ``iters`` bisection passes, the whole batch at
    once (the search itself lives in :mod:`certonnx.certify.radius`, shared with
    ``certonnx certify --radius``). 0 for misclassified samples; ``correct`` (B,) bool may give
    the clean correctness when the caller has the logits already.
    """
    if eps_max <= 0:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    kw = {"correct": correct} if (correct is not None and _TAKES_CORRECT) else {}
    with torch.no_grad():
        r = certified_radius(bm, x.detach(), y, norm, float(eps_max), method, iters=int(iters), domain=domain,
                             batch_size=max(int(x.shape[0]), 1), num_classes=num_classes, **kw)
    return r.to(device=x.device, dtype=x.dtype)


class ACERT(Method):
    """Adaptive certified training: robust CE at each sample's own certified radius."""

    name = "acert"
    eval_radius_default = True  # the point of the method is the radius: report the ACR

    @dataclass(frozen=True)
    class Options(MethodOptions):
        acert_kappa: float = option(0.0, "weight κ of the clean CE (the authors' configs use 0; sweep it for a "
                                    "trade-off curve)", ge=0, le=1)
        acert_bounds: Literal["ibp", "crown-ibp"] = option("ibp", "bounds for the radius search and the loss",
                                                           flag="--relaxation")
        acert_iters: int = option(8, "bisection passes after the ε_max check (resolution ε_max/2^iters)", ge=1)
        acert_min_eps: float = option(1e-6, "lower clip of the radii while the regularisers are active", ge=0)
        acert_eps_max: float | None = option(None, "cap of the radius search, scaled by the ramp like ε "
                                             "[default: the --norm target]", gt=0)

    def eps_max(self, eps: float, norm: str, ctx: StepContext) -> float:
        cap = self.opts(ctx).acert_eps_max
        if cap is None:
            return float(eps)
        return float(cap) * float(ctx.progress)

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        o = self.opts(ctx)  # parsed (and so checked) at the first step, warm-up included
        method, iters, kap = o.acert_bounds, o.acert_iters, o.acert_kappa
        out = model_fn(x).flatten(1)
        clean = F.cross_entropy(out, y)
        e_max = self.eps_max(eps, norm, ctx)
        if e_max <= 0:  # warm-up: clean training (the authors' "standard" epochs)
            return clean, {"clean_acc": accuracy(out, y), "cert_acc": None, "mean_radius": 0.0}
        assert bm is not None  # needs_bounds
        radii = adaptive_radii(bm, x, y, e_max, norm, method=method, iters=iters, domain=ctx.domain,
                               num_classes=ctx.num_classes, correct=out.detach().argmax(1) == y)
        cert = float((radii >= e_max).float().mean())
        mean_r = float(radii.mean())
        if ctx.regularize:
            radii = radii.clamp(min=o.acert_min_eps)
        lb, reg = bound_margins(bm, input_set(x, radii, norm, ctx), y, method, ctx)
        loss = (1.0 - kap) * robust_ce(lb) + kap * clean
        return add_regularizer(loss, reg, ctx), {"clean_acc": accuracy(out, y), "cert_acc": cert,
                                            "mean_radius": mean_r}
