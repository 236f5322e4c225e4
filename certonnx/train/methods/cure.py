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

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from certonnx.bounds import InputSet
from certonnx.errors import CertonnxError
from certonnx.train.methods.base import (
    EpochRun,
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


def bound_alignment(lb_inf: torch.Tensor, lb_l2: torch.Tensor, mask: torch.Tensor | None = None, *,
                    detach_target: bool = True) -> torch.Tensor:
    """``KL(p_t ‖ p_o)`` per sample for target bounds ``lb_inf`` (t) and the other ``lb_l2`` (o),
    averaged over ``mask`` (all samples when None; 0 if empty). The names are those of the
    reverse direction; the official default calls it with the L2 bounds as the target.

    ``p_n`` is the softmax of the worst-case logits under norm ``n``; with ``detach_target`` the
    target is detached, so only the other bounds are pulled (the official code detaches
    neither). Zero iff the two vectors agree.
    """
    log_p2 = F.log_softmax(worst_case_logits(lb_l2), dim=1)
    log_pinf = F.log_softmax(worst_case_logits(lb_inf), dim=1)
    if detach_target:
        log_pinf = log_pinf.detach()
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


#: λ₂ of the official L2 term: every official script passes 1e-5 (scripts/*/joint.sh, ours.sh)
OFFICIAL_LAMBDA_L2 = 1e-5

#: ``cure_preset`` -> option values, from the official MNIST-small scripts: ``ours.sh`` (CURE-Scratch:
#: ``--max --lp --gp --lbd 2.0 --beta 0.8 --lambda_ratio 0.4 --lambda_ratio_L2 0.00001``) and
#: ``finetune_linf.sh`` (CURE-Finetune: ``--max --lp --lbd 0.5``, no ``--gp``). The schedule flags
#: (epochs, learning rate, ε ramp) are the trainer's: docs/cure.md gives the command lines.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "scratch": {"cure_variant": "max", "cure_align": 2.0, "cure_align_dir": "l2", "cure_gp_epoch": 0.8,
                "cure_l2_region": "official", "cure_lambda": 0.4},
    "finetune": {"cure_variant": "max", "cure_align": 0.5, "cure_align_dir": "l2", "cure_l2_region": "official",
                 "cure_lambda": 0.4},
}


def gradient_projection(start: dict[str, torch.Tensor], cert: dict[str, torch.Tensor],
                        natural: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """CURE's per-epoch gradient projection (src/main.py ``gp``): per floating tensor,
    ``θ₀ + β·max(cos(Δ_cert, Δ_nat), 0)·Δ_nat + (1 − β)·Δ_cert`` with the updates ``Δ`` of the
    certified epoch and of a natural epoch from the same start ``θ₀``; other entries (integer
    counters) take the certified state, as the official code does for 0-d entries."""
    out: dict[str, torch.Tensor] = {}
    for k, t0 in start.items():
        if not t0.is_floating_point() or t0.ndim == 0:
            out[k] = cert[k]
            continue
        d_cert, d_nat = cert[k] - t0, natural[k] - t0
        cos = F.cosine_similarity(d_cert.reshape(1, -1).double(), d_nat.reshape(1, -1).double(), eps=1e-12)
        w = float(cos.clamp(min=0))
        out[k] = t0 + beta * w * d_nat + (1 - beta) * d_cert
    return out


# -- the method ----------------------------------------------------------------------------------

class CURE(Method):
    """Multi-norm SABR-style certified training with bound alignment and gradient projection."""

    name = "cure"
    bound_method = "ibp"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        cure_preset: Literal["none", "scratch", "finetune"] = option(
            "none", "the paper's configurations (scripts/*/ours.sh, finetune_linf.sh): scratch = max, "
            "alignment 2.0, per-epoch projection β 0.8; finetune = max, alignment 0.5; both with the official "
            "L2 term and λ 0.4. Keys given explicitly override the preset")
        cure_variant: Literal["joint", "max", "random"] = option(
            "joint", "how the norms combine: mean of the losses, per-sample worst norm, one random norm per batch")
        cure_lambda: float = option(0.4, "τ/ε of the propagated region, every norm (1: IBP on the whole ball)",
                                    gt=0, le=1)
        cure_lambda_linf: float | None = option(None, "L∞ override of cure_lambda", gt=0, le=1)
        cure_lambda_l2: float | None = option(None, "L2 override of cure_lambda", gt=0, le=1)
        cure_lambda_l1: float | None = option(None, "L1 override of cure_lambda", gt=0, le=1)
        cure_l2_region: Literal["official", "ball"] = option(
            "official", "the L2 term: official = L2-PGD point, then a tiny L∞ box of radius λ₂·ε₂ (λ₂ = "
            "cure_lambda_l2, default 1e-5 as in every official script); ball = an L2 ball of radius λ·ε₂")
        cure_align: float = option(0.0, "bound-alignment weight η (0: off; official 2.0, 0.5 for MNIST large)", ge=0)
        cure_align_dir: Literal["l2", "linf"] = option(
            "l2", "alignment direction: l2 = KL(p₂‖p∞) on the samples whose L2 worst-case logits are correct "
            "(official default, MNIST); linf = KL(p∞‖p₂) on the L∞-correct ones (official --reverse, CIFAR)")
        cure_align_on: Literal["certified", "all"] = option(
            "certified", "samples the alignment uses: the correct ones of cure_align_dir's norm, or all")
        cure_gp_epoch: float = option(
            0.0, "official gradient projection, once per epoch after the ε ramp: β, the weight of the natural "
            "update (0: off; official 0.8)", ge=0, le=1)
        cure_gp: float = option(1.0, "gradient-projection factor β, weight of the certified gradient (1: off)",
                                ge=0, le=1)
        cure_gp_project: bool = option(True, "project the natural gradient onto the certified one (false: mix)")
        cure_clean_weight: float = option(0.0, "weight of an extra clean CE term", ge=0)
        pgd_steps: int = pgd_steps_option()

        def lam(self, norm: str) -> float:
            """λ of ``norm``: its override, else ``cure_lambda`` (the official L2 region: 1e-5)."""
            own = getattr(self, f"cure_lambda_{norm}", None)
            if own is None and norm == "l2" and self.cure_l2_region == "official":
                return OFFICIAL_LAMBDA_L2
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
        # the official L2 term bounds an L∞ box of radius τ around the L2 attack point
        # (src/train.py get_propagation_region_joint -> adv_whitebox_L2's box): L2 adversarial
        # training of the SABR kind; the box lies in the L2 ε-ball only when τ·√d ≤ ε - |c - x|,
        # which the official λ₂ = 1e-5 makes true for MNIST and CIFAR
        region = "linf" if norm == "l2" and o.cure_l2_region == "official" else norm
        return bound_margins(bm, InputSet(c, tau, norm=region, domain=ctx.domain), y, self.bound_method, ctx)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | MethodOptions | None, *,
                      strict: bool = True) -> MethodOptions:
        """As :meth:`Method.parse_options`, with ``cure_preset``'s values under the keys given."""
        if isinstance(options, Mapping):
            given = {str(k).strip().replace("-", "_"): v for k, v in options.items()}
            preset = str(given.get("cure_preset", "none")).strip().lower()
            if preset not in PRESETS:
                raise CertonnxError(f"unknown cure_preset {preset!r} (expected one of none, {', '.join(PRESETS)})")
            options = {**PRESETS[preset], **given} if preset != "none" else given
        return super().parse_options(options, strict=strict)

    def wants_epoch_start(self, epoch: int, options: Any, ramp_end: int) -> bool:
        """The official projection runs after the ε ramp (main.py: ``epoch > end_epoch_eps``)."""
        o: Any = options if isinstance(options, self.Options) else self.parse_options(options, strict=False)
        return o.cure_gp_epoch > 0 and epoch >= ramp_end

    def after_epoch(self, run: EpochRun) -> None:
        """Train a copy of the start-of-epoch model one natural epoch and combine the two
        updates with :func:`gradient_projection`."""
        o: Any = run.options if isinstance(run.options, self.Options) else self.parse_options(run.options, strict=False)
        clone = copy.deepcopy(run.module)
        clone.load_state_dict(run.start_state)
        run.natural_epoch(clone, run.start_optimizer)
        cert = {k: v.detach() for k, v in run.module.state_dict().items()}
        nat = {k: v.detach() for k, v in clone.state_dict().items()}
        new = gradient_projection(run.start_state, cert, nat, o.cure_gp_epoch)
        run.module.load_state_dict(new)

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
            by = o.cure_align_dir
            mask = (lbs[by].detach().amin(1) > 0) if o.cure_align_on == "certified" else None
            if by == "l2":  # official default: KL(p₂ ‖ p∞), gradients into both (src/train.py, args.lp)
                align = bound_alignment(lbs["l2"], lbs["linf"], mask, detach_target=False)
            else:
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
