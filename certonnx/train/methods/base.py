"""Shared pieces of certified-training methods.

A method is a small class with ``loss(model_fn, bm, x, y, eps, norm, ctx) -> (loss, stats)``
for one norm; :meth:`Method.loss_multi` combines norms (default: the mean of the per-norm
losses, so ``--norm linf:0.1,l2:0.5`` trains for both). Methods that need all norms at once
(later: CURE, ACERT, ...) override ``loss_multi`` instead. Everything a method may need that
is not the batch (current ε, ramp progress, the module, a seeded generator, flags) comes in
the :class:`StepContext`, so the trainer stays method-agnostic.

``stats`` are per-batch fractions (``clean_acc``, ``cert_acc``; ``None`` when a method does
not measure it); the trainer averages them weighted by batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certonnx.bounds import BoundedModule, InputSet, margin_matrix

ModelFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepContext:
    """What a method may know about the current step besides the batch."""

    module: nn.Module
    epoch: int
    step: int
    eps: dict[str, float]  # current ε per norm (after the schedule)
    eps_target: dict[str, float]  # final ε per norm
    progress: float  # 0 during warm-up, rising to 1 at the end of the ramp (ε-schedule fraction)
    domain: tuple[float, float] = (0.0, 1.0)
    num_classes: int = 10
    generator: torch.Generator | None = None
    options: dict[str, Any] = field(default_factory=dict)  # method flags (kappa_end, sabr_lambda, ...)
    regularize: bool = False  # Shi et al. regularisers active this step
    reg_lambda: float = 0.5

    def opt(self, name: str, default: Any) -> Any:
        v = self.options.get(name)
        return default if v is None else v


Stats = dict[str, float | None]


class Method:
    """Base class: override :meth:`loss` (one norm) or :meth:`loss_multi` (all norms)."""

    name = "base"
    certified = True  # produces bounds (cert_acc) during training
    needs_bounds = True  # whether the trainer must build a BoundedModule

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def loss_multi(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """Mean over norms of :meth:`loss`; ``cert_acc`` is the fraction certified for every norm."""
        losses, stats = [], []
        for norm, eps in ctx.eps.items():
            loss_, st = self.loss(model_fn, bm, x, y, eps, norm, ctx)
            losses.append(loss_)
            stats.append(st)
        total = torch.stack(losses).mean()
        out: Stats = dict(stats[0])
        certs = [s.get("cert_acc") for s in stats]
        out["cert_acc"] = None if any(c is None for c in certs) else min(certs)  # type: ignore[type-var]
        return total, out

    def on_step(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Called after each optimizer step (e.g. for methods with their own state)."""

    def setup(self, module: nn.Module, options: dict[str, Any]) -> list[nn.Parameter]:
        """Called once before the optimizer is built. Returns parameters the method owns and
        optimises itself (e.g. SaC's shrinkage factors), which the trainer's optimizer skips."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in checkpoints (own optimizers, adapted σ, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict` when resuming."""

    def finalize(self, module: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called after training, before certification and export (e.g. fold reparametrisations)."""


# -- helpers -----------------------------------------------------------------------------------

def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.detach().flatten(1).argmax(1) == y).float().mean())


def robust_ce(lb: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on worst-case logits from margin lower bounds (CTBench form).

    ``lb`` (B, K-1) bounds ``f_y - f_j``; the worst-case logits are ``-lb`` for the wrong
    classes and 0 for the true one, so the loss is CE with the true class in column 0.
    """
    z = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
    return F.cross_entropy(z, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device))


def cert_fraction(lb: torch.Tensor) -> float:
    return float((lb.detach().amin(1) > 0).float().mean())


def input_set(x: torch.Tensor, eps: float | torch.Tensor, norm: str, ctx: StepContext) -> InputSet:
    return InputSet(x, eps, norm=norm, domain=ctx.domain)


def bound_margins(bm: BoundedModule, inset: InputSet, y: torch.Tensor, method: str, ctx: StepContext
                  ) -> torch.Tensor:
    """Lower bounds of the margins ``f_y - f_j`` (B, K-1) over ``inset``; registers the ReLU
    input intervals for the Shi et al. regularisers when they are active (IBP only)."""
    C = margin_matrix(y, ctx.num_classes)
    if method == "ibp" and ctx.regularize:
        ibp_ctx = bm.ibp_pass(inset)
        lb, _ = bm.backward(ibp_ctx, bm.output_node, C.to(inset.x.dtype), None, stop=bm._is_stop_for_ibp)
        ctx.options["_reg_loss"] = shi_regularizer(bm, ibp_ctx, inset)
        return lb
    lb, _ = bm.compute(inset, C=C, method=method, upper=False)
    return lb


def shi_regularizer(bm: BoundedModule, ibp_ctx: Any, inset: InputSet, tol: float = 0.5) -> torch.Tensor:
    """Shi et al. (2021) tightness + ReLU-balance regularisers over every ReLU's input interval.

    Tightness keeps interval widths from growing through the layers (relative to the input's);
    ReLU balance keeps active and inactive neurons balanced in mean and variance, so that IBP
    bounds do not blow up early in the ramp. Same form as auto_LiRPA's reference code.
    """
    x_itv = ibp_ctx.values[bm.input_node]
    tight0 = ((x_itv.upper - x_itv.lower) / 2).mean()
    loss_t = torch.zeros((), device=inset.x.device)
    loss_r = torch.zeros((), device=inset.x.device)
    cnt = 0
    for rule in bm.rules.values():
        if getattr(rule, "label", "") != "Relu":
            continue
        itv = ibp_ctx.values.get(rule.leaves[rule.pert[0]])
        if itv is None or not hasattr(itv, "lower"):
            continue
        lo, up = itv.lower, itv.upper
        center, diff = (up + lo) / 2, (up - lo) / 2
        loss_t = loss_t + F.relu(tol - tight0 / diff.mean().clamp(min=1e-12)) / tol
        act, inact = (lo > 0).float(), (up < 0).float()
        mean_ = center.mean()
        mean_act, mean_inact = (center * act).mean(), (center * inact).mean()
        delta = (center - mean_) ** 2
        var_act, var_inact = (delta * act).sum(), (delta * inact).sum()
        mean_ratio = mean_act / -mean_inact
        var_ratio = var_act / var_inact
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        lr_ = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(lr_):
            loss_r = loss_r + lr_
        cnt += 1
    if cnt == 0:
        return loss_t
    return (loss_t + loss_r) / cnt


def add_regularizer(loss: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """Add the Shi et al. term, weighted by ``reg_lambda · (1 - ε/ε_target)`` (fades with the ramp)."""
    reg = ctx.options.pop("_reg_loss", None)
    if reg is None or not ctx.regularize:
        return loss
    return loss + ctx.reg_lambda * (1.0 - ctx.progress) * reg


def kappa(ctx: StepContext) -> float:
    """Weight of the clean loss (Gowal et al. 2018): 1 during warm-up, linearly to ``kappa_end``
    at the end of the ramp."""
    end = float(ctx.opt("kappa_end", 0.5))
    return 1.0 - (1.0 - end) * ctx.progress


def attack(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str,
           ctx: StepContext, steps: int | None = None, step_size: float | None = None) -> torch.Tensor:
    """PGD inside the ε-ball ∩ domain with the module in eval mode (BatchNorm statistics are
    not polluted by adversarial inputs); the result is detached."""
    from certonnx.attacks import pgd_attack

    if isinstance(eps, float) and eps <= 0:
        return x.detach()
    was = ctx.module.training
    ctx.module.eval()
    req = [p for p in ctx.module.parameters() if p.requires_grad]
    for p in req:
        p.requires_grad_(False)
    try:
        steps = int(steps if steps is not None else ctx.opt("pgd_steps", 10))
        x_adv = pgd_attack(model_fn, x.detach(), y, eps, norm=norm, domain=ctx.domain, steps=steps,
                           restarts=1, step_size=step_size, generator=ctx.generator, random_init=True)
    finally:
        for p in req:
            p.requires_grad_(True)
        ctx.module.train(was)
    return x_adv.detach()
