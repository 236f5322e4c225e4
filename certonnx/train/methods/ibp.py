"""IBP training (Gowal et al. 2018): ``κ·CE(clean) + (1-κ)·CE(-lb_IBP)``, κ from 1 to
``kappa_end`` over the ε ramp."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from certonnx.train.methods.base import (
    Method,
    accuracy,
    add_regularizer,
    bound_margins,
    cert_fraction,
    input_set,
    kappa,
    kappa_end_option,
    robust_ce,
)
from certonnx.train.methods.options import MethodOptions

if TYPE_CHECKING:
    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import ModelFn, Stats, StepContext



class IBP(Method):
    name = "ibp"
    bound_method = "ibp"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        kappa_end: float = kappa_end_option()

    def robust_lb(self, bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                  ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(lb, reg)``: margin lower bounds and the regulariser of their bound pass (or None)."""
        return bound_margins(bm, input_set(x, eps, norm, ctx), y, self.bound_method, ctx)

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        k = kappa(ctx, self.opts(ctx).kappa_end)
        if k > 0:
            out = model_fn(x).flatten(1)
            clean = F.cross_entropy(out, y)
        else:  # pure robust loss: the clean pass only updates BatchNorm statistics and the accuracy
            with torch.no_grad():
                out = model_fn(x).flatten(1)
        assert bm is not None  # needs_bounds
        lb, reg = self.robust_lb(bm, x, y, eps, norm, ctx)
        loss = robust_ce(lb) if k <= 0 else k * clean + (1 - k) * robust_ce(lb)
        return add_regularizer(loss, reg, ctx), {"clean_acc": accuracy(out, y), "cert_acc": cert_fraction(lb)}
