"""CURE (Jiang, Cheung & Singh 2024, "Towards Universal/Generalized Certified Robustness with
Multi-Norm Training", arXiv:2410.03000): certified training for several norms at once.

Per norm the loss is SABR's (Müller et al. 2023): PGD finds a point in the ε-ball, a small
region of radius ``τ = λ·ε`` around it (an L∞ box for L∞, an L2 ball for L2, kept inside the
ε-ball by :func:`~certonnx.train.methods.sabr.shrink_into_ball`) is bounded with IBP (for L2
the engine bounds the first layer with the dual norm, then intervals), and the robust CE of
the margin lower bounds is the loss. The norms are combined by a *variant*:

* ``joint`` (default): mean of the per-norm losses;
* ``max``: per sample, the loss of the worst norm (then the batch mean);
* ``random``: one norm per batch, drawn with the step's seeded generator.

Two optional terms from the paper:

* **bound alignment** (``cure_align`` > 0): ``KL(p_∞ ‖ p_2)`` between the softmax of the
  worst-case logit vectors under L∞ (target, detached) and L2, on the samples certified under
  L∞ (``cure_align_on=certified``, the paper's choice) or all samples. It pulls the L2 bound
  distribution towards the L∞ one, whose certified samples are the "good" ones.
* **gradient projection** (``cure_gp`` = β < 1): the update is ``β·g_cert + (1-β)·P(g_nat)``
  where ``P`` projects the natural-training gradient (CE on the clean batch) onto the
  certified gradient, per parameter tensor, keeping only the positive part (as in Jiang et
  al.'s FedGP, which CURE's GP follows); with ``cure_gp_project=0`` ``P`` is the identity
  (plain mixing). Implemented by returning a surrogate loss whose value is the certified loss
  and whose gradient is the combined one, so the trainer stays unchanged.

Flags (``--method-opt KEY=VALUE``, declared in :class:`CURE.Options`): ``cure_variant``,
``cure_lambda`` (and per-norm ``cure_lambda_linf`` / ``cure_lambda_l2`` / ``cure_lambda_l1``), ``cure_align``,
``cure_align_on``, ``cure_gp``, ``cure_gp_project``, ``cure_clean_weight``, ``pgd_steps``. See
docs/cure.md. The paper's default radii (``--norm linf,l2``) live in
:mod:`certonnx.train.radii`, since every method can use them; they are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from certonnx.bounds import InputSet
from certonnx.errors import CertonnxError
from certonnx.train.methods.base import (
    Method,
    ModelFn,
    Stats,
    StepContext,
    accuracy,
    add_regularizer,
    attack,
    bound_margins,
    pgd_steps_option,
)
from certonnx.train.methods.options import MethodOptions, option
from certonnx.train.methods.sabr import shrink_into_ball
from certonnx.train.radii import default_norms, parse_norms_with_defaults

if TYPE_CHECKING:
    from certonnx.bounds import BoundedModule


VARIANTS = ("joint", "max", "random")

# -- loss pieces (pure functions, tested directly) -----------------------------------------------

def worst_case_logits(lb: torch.Tensor) -> torch.Tensor:
    """Worst-case logit vector from margin lower bounds (B, K-1): true class in column 0 with
    logit 0, wrong classes ``-lb`` (the padding :func:`robust_ce` uses)."""
    return torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)


def robust_ce_per_sample(lb: torch.Tensor) -> torch.Tensor:
    """Per-sample robust CE (B,); its mean is :func:`base.robust_ce`."""
    z = worst_case_logits(lb)
    return F.cross_entropy(z, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device), reduction="none")


def combine_losses(per_norm: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Scalar loss from per-sample losses (B,) per norm: mean over norms (``joint``) or the
    per-sample maximum over norms (``max``); ``random`` gets a single norm already."""
    stacked = torch.stack(list(per_norm.values()))  # (N, B)
    if variant in ("joint", "random"):
        return stacked.mean()
    if variant == "max":
        return stacked.amax(0).mean()
    raise CertonnxError(f"unknown cure_variant {variant!r} (expected one of {', '.join(VARIANTS)})")


def bound_alignment(lb_inf: torch.Tensor, lb_l2: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p_∞ ‖ p_2)`` per sample, averaged over ``mask`` (all samples when None; 0 if empty).

    ``p_n`` is the softmax of the worst-case logits under norm ``n``; ``p_∞`` is the target
    (detached), so only the L2 bounds are pulled. Zero iff the two vectors agree.
    """
    log_p2 = F.log_softmax(worst_case_logits(lb_l2), dim=1)
    log_pinf = F.log_softmax(worst_case_logits(lb_inf), dim=1).detach()
    kl = (log_pinf.exp() * (log_pinf - log_p2)).sum(1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def project_gradients(g_cert: Sequence[torch.Tensor | None], g_nat: Sequence[torch.Tensor | None], beta: float,
                      project: bool = True) -> list[torch.Tensor | None]:
    """``β·g_cert + (1-β)·P(g_nat)`` per parameter tensor.

    With ``project``, ``P(g_nat)`` is the projection of ``g_nat`` onto ``g_cert`` when their
    inner product is positive and 0 otherwise (the natural gradient only contributes where it
    agrees with the certified one); without, ``P`` is the identity.
    """
    out: list[torch.Tensor | None] = []
    for gc, gn in zip(g_cert, g_nat, strict=True):
        if gc is None and gn is None:
            out.append(None)
            continue
        if gc is None:
            gc = torch.zeros_like(gn)  # type: ignore[arg-type]
        if gn is None:
            gn = torch.zeros_like(gc)
        if project:
            nc = (gc * gc).sum()
            coef = torch.where(nc > 0, (gn * gc).sum().clamp(min=0) / nc.clamp(min=1e-30), torch.zeros_like(nc))
            gn = coef * gc
        out.append(beta * gc + (1.0 - beta) * gn)
    return out


def surrogate_loss(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], value: torch.Tensor
                   ) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params`` is ``grads``."""
    s = value.detach().clone()
    lin = sum(((p * g.detach()).sum() for p, g in zip(params, grads, strict=True) if g is not None),
              torch.zeros((), device=value.device, dtype=value.dtype))
    return s + lin - lin.detach()


# -- the method ----------------------------------------------------------------------------------

class CURE(Method):
    """Multi-norm SABR-style certified training with bound alignment and gradient projection."""

    name = "cure"
    bound_method = "ibp"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        cure_variant: Literal["joint", "max", "random"] = option(
            "joint", "how the norms combine: mean of the losses, per-sample worst norm, one random norm per batch")
        cure_lambda: float = option(0.4, "τ/ε of the propagated region, every norm (1: IBP on the whole ball)",
                                    gt=0, le=1)
        cure_lambda_linf: float | None = option(None, "L∞ override of cure_lambda", gt=0, le=1)
        cure_lambda_l2: float | None = option(None, "L2 override of cure_lambda", gt=0, le=1)
        cure_lambda_l1: float | None = option(None, "L1 override of cure_lambda", gt=0, le=1)
        cure_align: float = option(0.0, "bound-alignment weight η (0: off)", ge=0)
        cure_align_on: Literal["certified", "all"] = option(
            "certified", "samples the alignment uses: the L∞-certified ones or all")
        cure_gp: float = option(1.0, "gradient-projection factor β, weight of the certified gradient (1: off)",
                                ge=0, le=1)
        cure_gp_project: bool = option(True, "project the natural gradient onto the certified one (false: mix)")
        cure_clean_weight: float = option(0.0, "weight of an extra clean CE term", ge=0)
        pgd_steps: int = pgd_steps_option()

        def lam(self, norm: str) -> float:
            """λ of ``norm``: its override, else ``cure_lambda``."""
            own = getattr(self, f"cure_lambda_{norm}", None)
            return self.cure_lambda if own is None else own

    def region_bounds(self, model_fn: ModelFn, bm, x: torch.Tensor, y: torch.Tensor, eps: float,
                      norm: str, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(lb, reg)``: margin lower bounds (B, K-1) over the small SABR region of norm ``norm``,
        and the regulariser of that bound pass (None when the regularisers are off)."""
        o = self.opts(ctx)
        tau = o.lam(norm) * eps
        if eps > 0 and tau < eps:
            x_adv = attack(model_fn, x, y, eps - tau, norm, ctx, o.pgd_steps)
            c = shrink_into_ball(x, x_adv, eps, tau, norm, ctx.domain)
        else:
            c = x
        return bound_margins(bm, InputSet(c, tau, norm=norm, domain=ctx.domain), y, self.bound_method, ctx)

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """Single norm: SABR with CURE's flags (used when only one norm is given)."""
        sub = StepContext(**{**ctx.__dict__, "eps": {norm: eps}})
        return self.loss_multi(model_fn, bm, x, y, sub)

    def loss_multi(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        o = self.opts(ctx)
        variant, align_w, beta, clean_w = o.cure_variant, o.cure_align, o.cure_gp, o.cure_clean_weight
        use_gp = beta < 1.0 and torch.is_grad_enabled()

        norms = dict(ctx.eps)
        if variant == "random" and len(norms) > 1:
            names = list(norms)
            dev = ctx.generator.device if ctx.generator is not None else torch.device("cpu")
            k = int(torch.randint(len(names), (1,), generator=ctx.generator, device=dev))
            norms = {names[k]: norms[names[k]]}

        # one clean pass in training mode first (BatchNorm statistics come from clean data)
        need_clean_grad = clean_w > 0 or use_gp
        with torch.set_grad_enabled(need_clean_grad and torch.is_grad_enabled()):
            out_clean = model_fn(x).flatten(1)
        clean_ce = F.cross_entropy(out_clean, y) if need_clean_grad else None

        lbs: dict[str, torch.Tensor] = {}
        regs: list[torch.Tensor] = []
        for norm, eps in norms.items():
            lbs[norm], r = self.region_bounds(model_fn, bm, x, y, float(eps), norm, ctx)
            if r is not None:
                regs.append(r)

        per_sample = {n: robust_ce_per_sample(lb) for n, lb in lbs.items()}
        cert_loss = combine_losses(per_sample, variant)
        align = None
        if align_w > 0 and "linf" in lbs and "l2" in lbs:
            mask = (lbs["linf"].detach().amin(1) > 0) if o.cure_align_on == "certified" else None
            align = bound_alignment(lbs["linf"], lbs["l2"], mask)
            cert_loss = cert_loss + align_w * align
        cert_loss = add_regularizer(cert_loss, torch.stack(regs).mean() if regs else None, ctx)
        if clean_w > 0 and clean_ce is not None:
            cert_loss = cert_loss + clean_w * clean_ce

        certified = torch.stack([lb.detach().amin(1) > 0 for lb in lbs.values()]).all(0)
        stats: Stats = {"clean_acc": accuracy(out_clean, y), "cert_acc": float(certified.float().mean())}
        if align is not None:
            stats["align"] = float(align.detach())
        if not use_gp:
            return cert_loss, stats

        params = [p for p in ctx.module.parameters() if p.requires_grad]
        if not math.isfinite(float(cert_loss.detach())):
            return cert_loss, stats  # let the trainer report the divergence
        g_cert = torch.autograd.grad(cert_loss, params, allow_unused=True, retain_graph=True)
        g_nat = torch.autograd.grad(clean_ce, params, allow_unused=True)  # type: ignore[arg-type]
        g = project_gradients(g_cert, g_nat, beta, project=o.cure_gp_project)
        return surrogate_loss(params, g, cert_loss), stats


__all__ = ["CURE", "VARIANTS", "bound_alignment", "combine_losses", "default_norms", "parse_norms_with_defaults",
           "project_gradients", "robust_ce_per_sample", "surrogate_loss", "worst_case_logits"]
