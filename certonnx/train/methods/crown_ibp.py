"""CROWN-IBP (Zhang et al. 2020): robust CE on ``β·lb_CROWN-IBP + (1-β)·lb_IBP``, β from 1 to
0 over the ε ramp (tight bounds early, cheap IBP at the end), with the same κ mix as IBP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from certonnx.train.methods.base import bound_margins, input_set
from certonnx.train.methods.ibp import IBP
from certonnx.train.methods.options import option

if TYPE_CHECKING:
    import torch

    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import StepContext



class CrownIBP(IBP):
    name = "crown-ibp"

    @dataclass(frozen=True)
    class Options(IBP.Options):
        beta_end: float = option(0.0, "final weight β of the CROWN-IBP bound (β goes 1 → this over the ramp)",
                                 ge=0, le=1)

    def robust_lb(self, bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                  ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = input_set(x, eps, norm, ctx)
        lb_ibp, reg = bound_margins(bm, s, y, "ibp", ctx)  # the regulariser comes from the IBP pass
        end = self.opts(ctx).beta_end
        beta = end + (1.0 - end) * (1.0 - ctx.progress)
        if beta <= 0 or eps <= 0:  # at ε = 0 (warm-up) both bounds are the clean margins
            return lb_ibp, reg
        lb_crown, _ = bound_margins(bm, s, y, "crown-ibp", ctx)
        return beta * lb_crown + (1 - beta) * lb_ibp, reg
