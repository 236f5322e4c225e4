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

Flags (``--opt KEY=VALUE``): ``cure_variant``, ``cure_lambda`` (and per-norm
``cure_lambda_linf`` / ``cure_lambda_l2``), ``cure_align``, ``cure_align_on``, ``cure_gp``,
``cure_gp_project``, ``cure_clean_weight``, ``pgd_steps``. See docs/cure.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
)
from certonnx.train.methods.sabr import shrink_into_ball

VARIANTS = ("joint", "max", "random")

# (L∞, L2) radii used in the CURE paper's experiments, per input shape and setting.
_DEFAULTS: dict[tuple[int, ...], dict[str, dict[str, float]]] = {
    (1, 28, 28): {"small": {"linf": 0.1, "l2": 0.75}, "large": {"linf": 0.3, "l2": 1.0}},
    (3, 32, 32): {"small": {"linf": 2 / 255, "l2": 0.25}, "large": {"linf": 8 / 255, "l2": 0.5}},
}


# -- radii ---------------------------------------------------------------------------------------

def default_norms(sample_shape: Sequence[int], setting: str = "small") -> dict[str, float]:
    """The paper's radii for MNIST-shaped (1x28x28 or 784) and CIFAR-shaped (3x32x32) inputs.

    ``setting`` is ``small`` (MNIST L∞ 0.1 / L2 0.75, CIFAR 2/255 / 0.25) or ``large``
    (MNIST 0.3 / 1.0, CIFAR 8/255 / 0.5). Other shapes have no sensible default: the user
    must give radii, so this raises a :class:`CertonnxError` saying so.
    """
    shape = tuple(int(d) for d in sample_shape)
    # channel-last (Keras/TF exports) and flat layouts of the same images
    if shape in ((784,), (28, 28), (1, 784), (784, 1), (28, 28, 1)):
        shape = (1, 28, 28)
    if shape in ((3072,), (32, 32, 3)):
        shape = (3, 32, 32)
    if setting not in ("small", "large"):
        raise CertonnxError(f"unknown radius setting {setting!r} (expected small or large)")
    if shape not in _DEFAULTS:
        raise CertonnxError(f"no default radii for inputs of shape {list(shape)}: give them explicitly, "
                            "e.g. --norm linf:0.1,l2:0.5")
    return dict(_DEFAULTS[shape][setting])


def parse_norms_with_defaults(text: str, sample_shape: Sequence[int], setting: str = "small"
                              ) -> dict[str, float]:
    """``'linf,l2'`` -> the default radii for the data's shape; ``'linf:0.2,l2'`` mixes explicit
    and default radii. Raises ValueError (one line) on bad input, like ``parse_norms``."""
    from certonnx.certify.core import canonical_norm, parse_norms

    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise ValueError("expected NORM[:EPS][,NORM[:EPS]], e.g. linf,l2 or linf:0.1,l2:0.5")
    explicit = parse_norms(",".join(p for p in parts if ":" in p)) if any(":" in p for p in parts) else {}
    out: dict[str, float] = {}
    defaults: dict[str, float] | None = None
    for p in parts:
        norm = canonical_norm(p.split(":", 1)[0])
        if norm in out:
            raise ValueError(f"norm {norm} given twice")
        if ":" in p:
            out[norm] = explicit[norm]
            continue
        if defaults is None:
            try:
                defaults = default_norms(sample_shape, setting)
            except CertonnxError as e:
                raise ValueError(str(e)) from None
        out[norm] = defaults[norm]
    return out


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


def _flag(v: object) -> bool:
    """A boolean flag from ``--opt KEY=VALUE`` (strings like ``0``/``false``/``no`` are False)."""
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("0", "false", "no", "off", ""):
            return False
        if t in ("1", "true", "yes", "on"):
            return True
        raise CertonnxError(f"expected a boolean (0/1/true/false), got {v!r}")
    return bool(v)


# -- the method ----------------------------------------------------------------------------------

class CURE(Method):
    """Multi-norm SABR-style certified training with bound alignment and gradient projection."""

    name = "cure"
    bound_method = "ibp"

    def region_bounds(self, model_fn: ModelFn, bm, x: torch.Tensor, y: torch.Tensor, eps: float,  # type: ignore[no-untyped-def]
                      norm: str, ctx: StepContext) -> torch.Tensor:
        """Margin lower bounds (B, K-1) over the small SABR region of norm ``norm``."""
        lam = float(ctx.opt(f"cure_lambda_{norm}", ctx.opt("cure_lambda", 0.4)))
        if not 0.0 < lam <= 1.0:
            raise CertonnxError(f"cure_lambda must be in (0, 1], got {lam}")
        tau = lam * eps
        if eps > 0 and tau < eps:
            x_adv = attack(model_fn, x, y, eps - tau, norm, ctx)
            c = shrink_into_ball(x, x_adv, eps, tau, norm, ctx.domain)
        else:
            c = x
        lb = bound_margins(bm, InputSet(c, tau, norm=norm, domain=ctx.domain), y, self.bound_method, ctx)
        return lb

    def loss(self, model_fn, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        """Single norm: SABR with CURE's flags (used when only one norm is given)."""
        sub = StepContext(**{**ctx.__dict__, "eps": {norm: eps}})
        return self.loss_multi(model_fn, bm, x, y, sub)

    def loss_multi(self, model_fn, bm, x, y, ctx):  # type: ignore[no-untyped-def]
        variant = str(ctx.opt("cure_variant", "joint")).lower()
        if variant not in VARIANTS:
            raise CertonnxError(f"unknown cure_variant {variant!r} (expected one of {', '.join(VARIANTS)})")
        align_w = float(ctx.opt("cure_align", 0.0))
        align_on = str(ctx.opt("cure_align_on", "certified")).lower()
        if align_on not in ("certified", "all"):
            raise CertonnxError(f"unknown cure_align_on {align_on!r} (expected certified or all)")
        beta = float(ctx.opt("cure_gp", 1.0))
        if not 0.0 <= beta <= 1.0:
            raise CertonnxError(f"cure_gp (β) must be in [0, 1], got {beta}")
        clean_w = float(ctx.opt("cure_clean_weight", 0.0))
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
            lbs[norm] = self.region_bounds(model_fn, bm, x, y, float(eps), norm, ctx)
            r = ctx.options.pop("_reg_loss", None)
            if r is not None:
                regs.append(r)
        if regs:
            ctx.options["_reg_loss"] = torch.stack(regs).mean()

        per_sample = {n: robust_ce_per_sample(lb) for n, lb in lbs.items()}
        cert_loss = combine_losses(per_sample, variant)
        align = None
        if align_w > 0 and "linf" in lbs and "l2" in lbs:
            mask = (lbs["linf"].detach().amin(1) > 0) if align_on == "certified" else None
            align = bound_alignment(lbs["linf"], lbs["l2"], mask)
            cert_loss = cert_loss + align_w * align
        cert_loss = add_regularizer(cert_loss, ctx)
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
        g = project_gradients(g_cert, g_nat, beta, project=_flag(ctx.opt("cure_gp_project", True)))
        return surrogate_loss(params, g, cert_loss), stats
