"""MTL-IBP (De Palma et al. 2024): ``α·CE(adversarial) + (1-α)·CE(-lb_IBP)``, a convex
combination of an adversarial and the IBP loss (``--mtl-alpha``, default 0.5)."""

from __future__ import annotations

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
    robust_ce,
)


class MTLIBP(Method):
    name = "mtl-ibp"

    def loss(self, model_fn, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        alpha = float(ctx.opt("mtl_alpha", 0.5))
        with torch.no_grad():
            out_clean = model_fn(x).flatten(1)
        x_adv = attack(model_fn, x, y, eps, norm, ctx)
        adv = F.cross_entropy(model_fn(x_adv).flatten(1), y)
        lb = bound_margins(bm, input_set(x, eps, norm, ctx), y, "ibp", ctx)
        loss = alpha * adv + (1 - alpha) * robust_ce(lb)
        return add_regularizer(loss, ctx), {"clean_acc": accuracy(out_clean, y), "cert_acc": cert_fraction(lb)}
