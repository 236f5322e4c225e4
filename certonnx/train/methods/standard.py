"""Standard training: cross-entropy on clean inputs (no robustness term)."""

from __future__ import annotations

import torch.nn.functional as F

from certonnx.train.methods.base import Method, accuracy


class Standard(Method):
    name = "standard"
    certified = False
    needs_bounds = False

    def loss(self, model_fn, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        out = model_fn(x).flatten(1)
        return F.cross_entropy(out, y), {"clean_acc": accuracy(out, y), "cert_acc": None}

    def loss_multi(self, model_fn, bm, x, y, ctx):  # type: ignore[no-untyped-def]
        # no norm dependence: one clean pass, whatever the norms
        return self.loss(model_fn, bm, x, y, 0.0, "linf", ctx)
