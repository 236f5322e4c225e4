"""Standard training: cross-entropy on clean inputs (no robustness term)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F

from certonnx.train.methods.base import Method, accuracy

if TYPE_CHECKING:
    import torch

    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import ModelFn, Stats, StepContext



class Standard(Method):
    name = "standard"
    certified = False
    needs_bounds = False

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        out = model_fn(x).flatten(1)
        return F.cross_entropy(out, y), {"clean_acc": accuracy(out, y), "cert_acc": None}

    def loss_multi(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        # no norm dependence: one clean pass, whatever the norms
        return self.loss(model_fn, bm, x, y, 0.0, "linf", ctx)
