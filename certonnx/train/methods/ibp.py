"""IBP training (Gowal et al. 2018): ``κ·CE(clean) + (1-κ)·CE(-lb_IBP)``, κ from 1 to
``kappa_end`` (default 0.5) over the ε ramp."""

from __future__ import annotations

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
    robust_ce,
)


class IBP(Method):
    name = "ibp"
    bound_method = "ibp"

    def robust_lb(self, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        return bound_margins(bm, input_set(x, eps, norm, ctx), y, self.bound_method, ctx)

    def loss(self, model_fn, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        k = kappa(ctx)
        if k > 0:
            out = model_fn(x).flatten(1)
            clean = F.cross_entropy(out, y)
        else:  # pure robust loss: the clean pass only updates BatchNorm statistics and the accuracy
            with torch.no_grad():
                out = model_fn(x).flatten(1)
        lb = self.robust_lb(bm, x, y, eps, norm, ctx)
        loss = robust_ce(lb) if k <= 0 else k * clean + (1 - k) * robust_ce(lb)
        return add_regularizer(loss, ctx), {"clean_acc": accuracy(out, y), "cert_acc": cert_fraction(lb)}
