"""MTL-IBP (De Palma et al. 2024): ``α·CE(adversarial) + (1-α)·CE(-lb_IBP)``, a convex
combination of an adversarial and the IBP loss (``--mtl-alpha``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from certonnx.train.methods.base import (
    Method,
    accuracy,
    add_regularizer,
    attack,
    bound_margins,
    cert_fraction,
    input_set,
    pgd_steps_option,
    robust_ce,
)
from certonnx.train.methods.options import MethodOptions, option

if TYPE_CHECKING:
    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import ModelFn, Stats, StepContext



class MTLIBP(Method):
    name = "mtl-ibp"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        mtl_alpha: float = option(0.5, "weight α of the adversarial loss", flag="--mtl-alpha", ge=0, le=1)
        pgd_steps: int = pgd_steps_option()

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        o = self.opts(ctx)
        alpha = o.mtl_alpha
        with torch.no_grad():
            out_clean = model_fn(x).flatten(1)
        x_adv = attack(model_fn, x, y, eps, norm, ctx, o.pgd_steps)
        adv = F.cross_entropy(model_fn(x_adv).flatten(1), y)
        assert bm is not None  # needs_bounds
        lb, reg = bound_margins(bm, input_set(x, eps, norm, ctx), y, "ibp", ctx)
        loss = alpha * adv + (1 - alpha) * robust_ce(lb)
        return add_regularizer(loss, reg, ctx), {"clean_acc": accuracy(out_clean, y), "cert_acc": cert_fraction(lb)}
