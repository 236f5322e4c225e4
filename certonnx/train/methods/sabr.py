"""SABR (Müller et al. 2023): propagate a *small* box instead of the whole ε-ball.

PGD finds a point inside the ball; a box (or L2 ball) of radius ``τ = λ·ε`` around it, shifted
so that it stays inside the ε-ball ∩ domain, is bounded with IBP and trained on with the
robust CE. Smaller regions give less over-regularisation than full IBP (``--sabr-lambda``;
λ = 1 is IBP). ``cert_acc`` during training refers to the small region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from certonnx.bounds import InputSet
from certonnx.train.methods.base import (
    Method,
    accuracy,
    add_regularizer,
    attack,
    bound_margins,
    cert_fraction,
    pgd_steps_option,
    robust_ce,
)
from certonnx.train.methods.options import MethodOptions, option

if TYPE_CHECKING:
    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import ModelFn, Stats, StepContext



def shrink_into_ball(x: torch.Tensor, x_adv: torch.Tensor, eps: float, tau: float, norm: str,
                     domain: tuple[float, float]) -> torch.Tensor:
    """Centre of the small region: ``x_adv`` projected so that the τ-region lies in the ε-ball
    around ``x`` (and, for L∞, in the domain box where it is wide enough)."""
    if norm == "linf":
        r = eps - tau
        c = torch.minimum(torch.maximum(x_adv, x - r), x + r)
        lo, hi = domain[0] + tau, domain[1] - tau
        if lo <= hi:
            c = c.clamp(lo, hi)
        # the domain clamp can only move c towards the box; keep it within the ball of radius r
        return torch.minimum(torch.maximum(c, x - r), x + r)
    r = max(eps - tau, 0.0)
    if norm == "l1":  # the triangle inequality holds for every norm: ‖c - x‖₁ ≤ ε - τ
        from certonnx.attacks.pgd import project_l1

        return x + project_l1(x_adv - x, torch.full((x.shape[0],), r, dtype=x.dtype, device=x.device))
    d = (x_adv - x).flatten(1)
    n = d.norm(dim=1, keepdim=True).clamp(min=1e-12)
    d = d * torch.clamp(r / n, max=1.0)
    return x + d.view_as(x)


class SABR(Method):
    name = "sabr"
    bound_method = "ibp"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        sabr_lambda: float = option(0.4, "radius λ of the propagated region relative to ε (1: IBP)",
                                    flag="--sabr-lambda", gt=0, le=1)
        pgd_steps: int = pgd_steps_option()

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        o = self.opts(ctx)
        tau = o.sabr_lambda * eps
        with torch.no_grad():
            out_clean = model_fn(x).flatten(1)
        if eps > 0:
            x_adv = attack(model_fn, x, y, eps - tau, norm, ctx, o.pgd_steps)
            c = shrink_into_ball(x, x_adv, eps, tau, norm, ctx.domain)
        else:
            c = x
        s = InputSet(c, tau, norm=norm, domain=ctx.domain)
        assert bm is not None  # needs_bounds
        lb, reg = bound_margins(bm, s, y, self.bound_method, ctx)
        loss = robust_ce(lb)
        return add_regularizer(loss, reg, ctx), {"clean_acc": accuracy(out_clean, y), "cert_acc": cert_fraction(lb)}
