"""Shrink & Cert (SaC; Gupta & Verma, ICML 2023 AdvML-Frontiers workshop): learned weight
shrinkage by bi-level optimisation, certified with the Lipschitz certificate.

Every trainable ``nn.Linear``/``nn.Conv{1,2,3}d`` weight ``W`` of the model is used as
``W ⊙ clamp(|s|, 0, α)`` with a learned shrinkage ``s`` (per weight or per output channel). The
factor is at most ``α``, so each layer's Lipschitz constant (and hence the product bound the
certificate composes) is at most ``α`` times that of the stored weight; the bi-level problem
decides where the shrinkage costs least accuracy:

* lower level: ``W`` minimises the training objective on the *train part* of the batch (the
  trainer's optimizer, with ``s`` held fixed);
* upper level: ``s`` minimises the same objective on the *held-out part* of the batch at the
  weights one virtual SGD step ahead, ``W' = W - ξ ∇_W L_train(W, s)``; the hypergradient
  ``d/ds L_val(W'(s), s)`` is the one-step unrolled approximation of the implicit gradient,
  computed exactly through the virtual step (``sac_hypergrad=unrolled``, a Hessian-vector
  product by double backward) or with ``∇_W L_train`` treated as a constant
  (``sac_hypergrad=first``). ``s`` has its own Adam (the upper-level optimizer) and is projected
  back into ``[0, α]`` after every step. As in the authors' code the clamp passes gradients
  straight through, so a shrinkage sitting at the cap ``α`` can still move down.

The held-out split: each incoming batch (already randomly permuted by the trainer) is split,
the last ``sac_val_frac`` of it (default 0.5, the authors zip two loaders of equal batch size)
is the upper level's data for this step and is not used for ``W`` in this step. Across epochs
every sample serves both levels; there is no fixed validation set, which keeps the method
stateless apart from ``s`` and its optimizer (resume-safe).

Setup: :func:`add_shrinkage` registers ``torch.nn.utils.parametrize`` parametrizations on the
modules, so ``module.weight`` is the shrunk weight everywhere (forward, the bound engine, the
Lipschitz certificate) and ``certonnx.export`` bakes it into plain weights. The stored weight
is divided by the initial factor ``α`` so that setup leaves the function unchanged. Note this
scales the effective learning rate of ``W`` by ``α``.

Objectives (``sac_loss``): ``ce`` (cross-entropy, the paper's) or ``lmt`` (Lipschitz-margin
CE, Tsuzuku et al. 2018: ``ε·c·L`` added to every wrong logit with ``L`` the product of the
layer constants, ``c = √2`` for L2 and 2 for L∞, at the current ε of the schedule). Optional
``sac_lip_weight·Σ log L_layer`` penalty on both levels, computed differentiably (exact
spectral norm through ``torch.linalg.matrix_norm(·, 2)`` for L2, max row sums for L∞).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from certonnx.errors import CertonnxError
from certonnx.train.methods.base import Method, StepContext, accuracy
from certonnx.train.methods.options import MethodOptions, option

if TYPE_CHECKING:
    from certonnx.bounds import BoundedModule
    from certonnx.train.methods.base import ModelFn, Stats


SHRINK_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Shrink(nn.Module):
    """Parametrization ``W -> W ⊙ clamp(|s|, 0, α)`` (straight-through gradient in the clamp)."""

    def __init__(self, shape: tuple[int, ...], alpha: float, init: float, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.s = nn.Parameter(torch.full(shape, float(init), device=device, dtype=dtype))
        self.hold = False  # while True the factor is a constant (lower level: only W learns)

    def factor(self) -> torch.Tensor:
        a = self.s.abs()
        m = a.clamp(0.0, self.alpha)
        m = m.detach() + (a - a.detach())  # value clamp(|s|), gradient of |s| (straight through)
        return m.detach() if self.hold else m

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.factor()


def shrink_modules(module: nn.Module) -> list[tuple[str, nn.Module, Shrink]]:
    """``(name, submodule, parametrization)`` for every shrunk weight, in module order."""
    out = []
    for name, sub in module.named_modules():
        if parametrize.is_parametrized(sub, "weight"):
            for p in sub.parametrizations["weight"]:
                if isinstance(p, Shrink):
                    out.append((name, sub, p))
    return out


def add_shrinkage(module: nn.Module, alpha: float = 0.2, granularity: str = "weight") -> list[nn.Parameter]:
    """Register the shrinkage on every trainable Linear/Conv weight of ``module`` (idempotent);
    returns the shrinkage parameters ``s``.

    The factor starts at ``α`` and the stored weight is divided by ``α`` first, so the model
    computes exactly what it computed before (up to rounding).
    """
    if not 0 < alpha <= 1e6 or not math.isfinite(alpha):
        raise CertonnxError(f"sac_alpha must be a positive number, got {alpha!r}")
    if granularity not in ("weight", "channel"):
        raise CertonnxError(f"sac_granularity must be 'weight' or 'channel', got {granularity!r}")
    done = shrink_modules(module)
    if done:
        return [p.s for _, _, p in done]
    params = []
    for sub in list(module.modules()):
        if not isinstance(sub, SHRINK_TYPES) or parametrize.is_parametrized(sub):
            continue
        w = sub.weight
        if not isinstance(w, nn.Parameter) or not w.requires_grad:
            continue
        shape = tuple(w.shape) if granularity == "weight" else (w.shape[0],) + (1,) * (w.ndim - 1)
        p = Shrink(shape, alpha, alpha, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            w.div_(alpha)
        parametrize.register_parametrization(sub, "weight", p)
        params.append(p.s)
    if not params:
        raise CertonnxError("sac: the model has no trainable Linear/Conv weights to shrink "
                            "(MatMul by a constant initializer is not supported)")
    return params


def bake_shrinkage(module: nn.Module) -> None:
    """Replace the parametrizations by plain weights ``W ⊙ factor`` in place (after training)."""
    for _, sub, _ in shrink_modules(module):
        parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)


def layer_constant(sub: nn.Module, w: torch.Tensor, norm: str) -> torch.Tensor:
    """A differentiable Lipschitz constant of one layer with effective weight ``w`` (same bounds
    as the registry's: exact spectral norm / max row sum; conv times ``sqrt(prod ceil(k/s))``)."""
    if isinstance(sub, nn.Linear):
        if norm == "l2":
            return torch.linalg.matrix_norm(w, 2)
        return w.abs().sum(1).max()
    if norm != "l2":
        return w.flatten(1).abs().sum(1).max()
    groups = int(getattr(sub, "groups", 1))
    co = w.shape[0] // groups
    blocks = torch.stack([torch.linalg.matrix_norm(w[g * co:(g + 1) * co].flatten(1), 2) for g in range(groups)])
    mult = math.prod(math.ceil(k / s) for k, s in zip(w.shape[2:], sub.stride))  # type: ignore[arg-type]
    return blocks.max() * math.sqrt(mult)


def log_lipschitz(module: nn.Module, norm: str, originals: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``Σ log L_layer`` over the shrunk layers (log of the product bound of a plain chain).

    ``originals`` (name -> stored weight) replaces the stored weights (virtual step)."""
    total = torch.zeros(())
    for name, sub, p in shrink_modules(module):
        if originals is not None:
            w = p(originals[name])
        else:
            w = sub.weight
        total = total.to(w.device) + torch.log(layer_constant(sub, w, norm).clamp_min(1e-12))
    return total


class SaC(Method):
    """Shrink & Cert; flags (``--method-opt KEY=VALUE``) in :class:`SaC.Options`."""

    name = "sac"
    certified = True  # reports the Lipschitz-certified fraction of the batch
    needs_bounds = True  # the BoundedModule gives the Lipschitz certificate for the stats

    @dataclass(frozen=True)
    class Options(MethodOptions):
        sac_alpha: float = option(0.2, "cap α of the shrinkage factor (the authors use 0.1-0.25)", gt=0, le=1e6)
        sac_granularity: Literal["weight", "channel"] = option("weight", "one s per weight or per output channel")
        sac_lr: float = option(1e-3, "Adam learning rate of s (0 freezes s)", ge=0)
        sac_xi: float = option(1e-3, "virtual step size ξ of the unrolled hypergradient", ge=0)
        sac_hypergrad: Literal["unrolled", "first", "none"] = option("unrolled", "hypergradient of the upper level")
        sac_val_frac: float = option(0.5, "fraction of each batch used by the upper level", ge=0, lt=1)
        sac_every: int = option(1, "upper-level step every N batches", ge=1)
        sac_loss: Literal["ce", "lmt"] = option("ce", "objective: cross-entropy or Lipschitz-margin CE")
        sac_lip_weight: float = option(0.0, "weight of the Σ log L_layer penalty", ge=0)
        sac_lip_norm: Literal["linf", "l2"] | None = option(None, "norm of that penalty [default: the first "
                                                           "training norm]")
        sac_cert_stats: bool = option(True, "report the Lipschitz-certified fraction per batch")

    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []
        self.opt_s: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._lr = 1e-3

    # -- setup / state -----------------------------------------------------------------------
    def setup(self, module: nn.Module, options: MethodOptions | Mapping[str, Any] | None = None
              ) -> list[nn.Parameter]:
        """Register the shrinkage (idempotent) and create the upper-level optimizer; returns the
        parameters this method owns (the trainer must keep them out of its optimizer).

        Call before loading a checkpoint: the parametrized ``state_dict`` has the keys
        ``<layer>.parametrizations.weight.original`` and ``<layer>.parametrizations.weight.0.s``.
        """
        o = options if isinstance(options, self.Options) else self.parse_options(options, strict=False)
        assert isinstance(o, SaC.Options)
        params = add_shrinkage(module, o.sac_alpha, o.sac_granularity)
        if self.opt_s is None or [id(p) for p in self.params] != [id(p) for p in params]:
            self.params = params
            self._lr = o.sac_lr
            self.opt_s = torch.optim.Adam(self.params, lr=self._lr)
            if self._pending_state is not None:
                self.opt_s.load_state_dict(self._pending_state)
                self._pending_state = None
        return list(self.params)

    def state_dict(self) -> dict[str, Any]:
        """The upper-level optimizer's state (``s`` itself lives in the module's state_dict)."""
        return {"opt_s": self.opt_s.state_dict()} if self.opt_s is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        st = state.get("opt_s")
        if st is None:
            return
        if self.opt_s is not None:
            self.opt_s.load_state_dict(st)
        else:
            self._pending_state = st

    # -- objective -----------------------------------------------------------------------------
    def _objective(self, out: torch.Tensor, y: torch.Tensor, module: nn.Module, ctx: StepContext,
                   originals: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        o = self.opts(ctx)
        kind, lipw = o.sac_loss, o.sac_lip_weight
        out = out.flatten(1)
        logs: dict[str, torch.Tensor] = {}

        def log_l(norm: str) -> torch.Tensor:
            if norm not in logs:
                logs[norm] = log_lipschitz(module, norm, originals)
            return logs[norm]

        if kind == "ce":
            loss = F.cross_entropy(out, y)
        elif kind == "lmt":
            add = torch.zeros((), device=out.device)
            for norm, eps in ctx.eps.items():
                if eps > 0:
                    c = math.sqrt(2.0) if norm == "l2" else 2.0
                    add = torch.maximum(add, eps * c * torch.exp(log_l(norm)))
            onehot = F.one_hot(y, out.shape[1]).to(out.dtype)
            loss = F.cross_entropy(out + add * (1 - onehot), y)
        else:  # (the Options type admits no other value)
            raise CertonnxError(f"sac_loss must be 'ce' or 'lmt', got {kind!r}")
        if lipw > 0:
            norm = o.sac_lip_norm or next(iter(ctx.eps), "l2")
            loss = loss + lipw * log_l(norm)
        return loss

    # -- upper level ----------------------------------------------------------------------------
    def upper_step(self, module: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, x_val: torch.Tensor,
                   y_val: torch.Tensor, ctx: StepContext) -> float:
        """One projected Adam step on ``s`` with the one-step unrolled hypergradient; returns the
        upper-level loss. Its extra forward passes leave BatchNorm running statistics alone."""
        bns = [m for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        for m in bns:
            m.track_running_stats = False  # training mode: batch statistics, no running update
        try:
            return self._upper_step(module, x_tr, y_tr, x_val, y_val, ctx)
        finally:
            for m in bns:
                m.track_running_stats = True

    def _upper_step(self, module: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, x_val: torch.Tensor,
                    y_val: torch.Tensor, ctx: StepContext) -> float:
        from torch.func import functional_call

        assert self.opt_s is not None
        o = self.opts(ctx)
        mode, xi = o.sac_hypergrad, o.sac_xi
        layers = shrink_modules(module)
        names = [f"{n}.parametrizations.weight.original" if n else "parametrizations.weight.original"
                 for n, _, _ in layers]
        Ws = [sub.parametrizations["weight"].original for _, sub, _ in layers]  # type: ignore[union-attr,index]
        if mode == "none" or xi == 0:
            new = list(Ws)
        else:
            l_tr = self._objective(module(x_tr), y_tr, module, ctx)
            grads = torch.autograd.grad(l_tr, Ws, create_graph=(mode == "unrolled"), allow_unused=True)
            new = [W - xi * (g if mode == "unrolled" else g.detach()) if g is not None else W
                   for W, g in zip(Ws, grads)]
            if mode == "first":
                new = [w.detach() for w in new]
        repl = dict(zip(names, new))
        out = functional_call(module, repl, (x_val,))
        origs = {n: w for (n, _, _), w in zip(layers, new)}
        l_val = self._objective(out, y_val, module, ctx, originals=origs)
        g_s = torch.autograd.grad(l_val, self.params, allow_unused=True)
        for p, g in zip(self.params, g_s):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        from certonnx.train import distributed as D

        if D.active():  # data-parallel: every rank steps s with the mean hypergradient
            import torch.distributed as dist

            D.all_reduce_grads(self.params)
            for p in self.params:
                p.grad.div_(dist.get_world_size())  # type: ignore[union-attr]
        self.opt_s.step()
        self.opt_s.zero_grad(set_to_none=True)
        with torch.no_grad():
            for (_, _, sh), p in zip(layers, self.params):
                p.clamp_(0.0, sh.alpha)
        return float(l_val.detach())

    # -- the trainer's entry point ----------------------------------------------------------
    def loss_multi(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        module = ctx.module
        o = self.opts(ctx)
        self.setup(module, o)
        B = int(x.shape[0])
        nv = min(int(round(B * o.sac_val_frac)), B - 1)
        x_tr, y_tr, x_val, y_val = x[:B - nv], y[:B - nv], x[B - nv:], y[B - nv:]
        every = o.sac_every
        stats: dict[str, float | None] = {}
        if nv > 0 and ctx.step % every == 0:
            stats["upper_loss"] = self.upper_step(module, x_tr, y_tr, x_val, y_val, ctx)
        layers = shrink_modules(module)
        for _, _, sh in layers:
            sh.hold = True
        try:
            out = model_fn(x_tr).flatten(1)
            loss = self._objective(out, y_tr, module, ctx)
        finally:
            for _, _, sh in layers:
                sh.hold = False
        stats["clean_acc"] = accuracy(out, y_tr)
        stats["cert_acc"] = None
        if bm is not None and o.sac_cert_stats and ctx.eps:
            stats["cert_acc"] = self._cert_fraction(bm, x_tr, y_tr, ctx)
        with torch.no_grad():
            stats["shrink_mean"] = float(torch.cat([sh.factor().flatten() for _, _, sh in layers]).mean())
        return loss, stats

    def _cert_fraction(self, bm, x, y, ctx: StepContext) -> float:
        """Fraction of the batch the sound Lipschitz certificate proves at the current ε (every norm)."""
        from certonnx.bounds.lipschitz import lipschitz_radius

        ok = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        was = ctx.module.training
        ctx.module.eval()
        try:
            for norm, eps in ctx.eps.items():
                r = lipschitz_radius(bm, x.detach(), y, norm)
                ok &= r > eps
        finally:
            ctx.module.train(was)
        return float(ok.float().mean())

    def finalize(self, module: nn.Module) -> None:
        """Bake the learned shrinkage into plain weights (the model is an ordinary one again)."""
        bake_shrinkage(module)


__all__ = ["SaC", "Shrink", "add_shrinkage", "bake_shrinkage", "layer_constant", "log_lipschitz", "shrink_modules"]
