"""PGD adversarial training (Madry et al. 2018): cross-entropy on a PGD point of the ε-ball
(L∞ or L2). Empirically robust, rarely certifiable with cheap bounds; a baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from certonnx.train.methods.base import Method, accuracy, attack, pgd_steps_option
from certonnx.train.methods.options import MethodOptions

if TYPE_CHECKING:
    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import ModelFn, Stats, StepContext



class PGD(Method):
    name = "pgd"
    certified = False
    needs_bounds = False

    @dataclass(frozen=True)
    class Options(MethodOptions):
        pgd_steps: int = pgd_steps_option()

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        x_adv = attack(model_fn, x, y, eps, norm, ctx, self.opts(ctx).pgd_steps)
        with torch.no_grad():
            with_clean = model_fn(x).flatten(1)
        out = model_fn(x_adv).flatten(1)
        return F.cross_entropy(out, y), {"clean_acc": accuracy(with_clean, y), "cert_acc": None,
                                         "adv_acc": accuracy(out, y)}
