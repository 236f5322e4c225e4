"""Gaussian Loss Smoothing (GLS) for certified training (Balauca, Müller, Mao, Baader, Fischer,
Vechev 2024, "Gaussian Loss Smoothing Enables Certified Training with Tight Convex Relaxations").

Why: tight relaxations (CROWN-IBP, CROWN, DeepPoly) give *worse* networks than IBP when trained
on directly, because their certified loss is discontinuous, non-smooth and sensitive to small
weight changes (a ReLU flipping between relaxation branches changes the bound abruptly). The
paper shows that optimising the Gaussian-smoothed loss ``L_σ(θ) = E_{ε~N(0,σ²)} L(θ + ε)``
removes these problems, so the tighter relaxation can pay off. Two estimators of ``∇L_σ``:

* **PGPE** (zeroth order, ``--method-opt gls_estimator=pgpe``): antithetic pairs ``θ ± ε_k``, only loss
  values are used: ``g = Σ_k (L(θ+ε_k) − L(θ−ε_k)) ε_k / (2 h σ²)`` over ``h = pop/2`` pairs
  (element-wise σ). Unbiased for ``∇L_σ`` (exact in expectation for quadratics), works with
  relaxations that are not differentiable (α-CROWN here), but its variance grows with the
  number of parameters: only tiny networks train well with it.
* **RGS** (randomized gradient smoothing, ``--method-opt gls_estimator=rgs``): the mean of first-order
  gradients at ``K`` perturbed copies; implemented as the mean *loss* of the copies ``θ + ε_k``
  (ε detached), whose autograd gradient w.r.t. θ is exactly that mean of gradients.

The population is evaluated **batched**: ``torch.func.vmap`` over ``functional_call`` of a tiny
wrapper whose forward runs :meth:`BoundedModule.compute`. That works for ``ibp`` and
``crown-ibp``; ``crown`` selects unstable neurons with ``nonzero`` (dynamic shapes, not
vmappable) and ``alpha-crown`` runs its own optimiser, so they fall back to a loop over members
(detected once per relaxation, with a warning). See docs/gls.md for flags and costs.

The trainer calls ``loss.backward()``; for PGPE the returned loss is the surrogate
``Σ_p ⟨p, g_p⟩ − (same).detach() + L̂_σ``: its gradient is the estimate ``g`` and its value the
population mean ``L̂_σ`` (the smoothed loss), so logs show a real loss.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from certonnx.errors import CertonnxError
from certonnx.train.methods.base import (
    Method,
    Stats,
    StepContext,
    accuracy,
    cert_fraction,
    kappa,
    kappa_end_option,
    robust_ce,
)
from certonnx.train.methods.options import MethodOptionError, MethodOptions, option

if TYPE_CHECKING:
    from certonnx.train.methods.base import ModelFn


ESTIMATORS = ("pgpe", "rgs")
RELAXATIONS = ("ibp", "crown-ibp", "crown", "alpha-crown")
#: relaxations whose bound pass is vmappable in this engine (others loop over members)
_VMAPPABLE = ("ibp", "crown-ibp")


@dataclass(frozen=True)
class GLSOptions(MethodOptions):
    """GLS's flags (documented in docs/gls.md)."""

    gls_estimator: Literal["pgpe", "rgs"] = option("pgpe", "gradient estimator: pgpe (zeroth order) or rgs "
                                                   "(first order)", flag="--gls-estimator")
    gls_relaxation: Literal["ibp", "crown-ibp", "crown", "alpha-crown"] = option(
        "crown-ibp", "relaxation the loss is computed with (alpha-crown: pgpe only)", flag="--relaxation")
    gls_sigma: float = option(0.05, "noise scale σ", gt=0)
    gls_sigma_mode: Literal["rel", "abs"] = option("rel", "rel: σ = gls_sigma × RMS of each parameter tensor; "
                                                   "abs: σ = gls_sigma")
    gls_pop: int = option(32, "members per step (pgpe: 2 × antithetic pairs, rounded up to even; rgs: K)", ge=2)
    gls_mix: float = option(0.0, "weight of the plain (unsmoothed) gradient; 1 = no smoothing", ge=0, le=1)
    gls_antithetic: bool = option(True, "rgs: use ±ε pairs too (pgpe always does)")
    gls_shaping: Literal["none", "rank"] = option("none", "pgpe fitness shaping")
    gls_sigma_lr: float = option(0.0, "pgpe σ adaptation rate (0: fixed σ)", ge=0)
    gls_chunk: int = option(0, "members per vmapped call (0: all at once)", ge=0)
    gls_batched: Literal["auto", "vmap", "loop"] = option("auto", "how the population is evaluated")
    kappa_end: float = kappa_end_option()
    alpha_steps: int = option(20, "α-CROWN optimisation steps per bound (gls_relaxation=alpha-crown)", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gls_estimator == "pgpe" and self.gls_pop % 2:
            object.__setattr__(self, "gls_pop", self.gls_pop + 1)  # antithetic pairs
        if self.gls_estimator == "rgs" and self.gls_relaxation == "alpha-crown":
            raise MethodOptionError("gls_estimator=rgs needs gradients of the bound, but alpha-crown bounds are "
                                    "detached from the parameters in this engine; use gls_estimator=pgpe or "
                                    "gls_relaxation=crown")


#: the defaults, as a plain dict (derived from GLSOptions, so they are written once)
DEFAULTS: dict[str, Any] = GLSOptions().to_dict()


def _prefer_vmap(relaxation: str, device: torch.device) -> bool:
    """Whether ``gls_batched=auto`` vmaps the population. Measured on CPU (MLP 784-32-32-10,
    batch 100): IBP 2.5x faster vmapped; CROWN-IBP ~20 % *slower* vmapped than a loop (its
    batched bound matrices are memory-bound), so it loops on CPU. On CUDA both are vmapped
    (fewer, larger kernels; not measured here)."""
    if relaxation not in _VMAPPABLE:
        return False
    return relaxation == "ibp" or device.type == "cuda"


class _BoundLoss(nn.Module):
    """The certified training loss of one network as a module, so ``functional_call`` can swap
    the weights (the engine's rules read ``module.weight`` at call time) and ``vmap`` can batch
    over a population of weights."""

    def __init__(self, bm: BoundedModule) -> None:
        super().__init__()
        self.gm = bm.gm
        self.bm: BoundedModule
        object.__setattr__(self, "bm", bm)  # not a submodule: its parameters are gm's
        self.cfg: dict[str, Any] = {}

    def setup(self, eps: dict[str, float], k: float, relaxation: str, domain: tuple[float, float],
              alpha_steps: int) -> None:
        self.cfg = {"eps": eps, "k": k, "relaxation": relaxation, "domain": domain, "alpha_steps": alpha_steps}

    def terms(self, x: torch.Tensor, y: torch.Tensor, C: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(loss, clean logits, margin lower bounds per norm)."""
        c = self.cfg
        out = self.gm(x).flatten(1)
        clean = F.cross_entropy(out, y)
        k = c["k"]
        lbs: list[torch.Tensor] = []
        if k >= 1.0:
            return clean, out, lbs
        rob = []
        for norm, eps in c["eps"].items():
            s = InputSet(x, eps, norm=norm, domain=c["domain"])
            lb, _ = self.bm.compute(s, C=C, method=c["relaxation"], upper=False, alpha_steps=c["alpha_steps"])
            lbs.append(lb)
            rob.append(robust_ce(lb))
        loss = k * clean + (1 - k) * torch.stack(rob).mean()
        return loss, out, lbs

    def forward(self, x: torch.Tensor, y: torch.Tensor, C: torch.Tensor, full: bool = False) -> Any:
        t = self.terms(x, y, C)
        return t if full else t[0]


@contextlib.contextmanager
def _population_mode(bm: BoundedModule) -> Iterator[None]:
    """State changes needed while perturbed members are evaluated.

    * BatchNorm in training mode normalises with batch statistics but must not update its
      running statistics once per member (the centre's clean pass does that once).

    (The affine rules compute |W| on every call, so vmapped or freshly allocated member weights
    need nothing here.)
    """
    bns = [m for m in bm.gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def _centered_ranks(v: torch.Tensor) -> torch.Tensor:
    """Linearly spaced ranks in [-0.5, 0.5] (Salimans et al. 2017 fitness shaping)."""
    n = v.numel()
    r = torch.empty_like(v)
    r[v.argsort()] = torch.arange(n, dtype=v.dtype, device=v.device)
    return r / max(n - 1, 1) - 0.5


def pgpe_gradient(losses: torch.Tensor, noise: dict[str, torch.Tensor], sigma: dict[str, torch.Tensor],
                  shaping: str = "none") -> dict[str, torch.Tensor]:
    """PGPE / antithetic ES estimate of ``∇ E[L(θ+ε)]`` from the losses of ``θ ± ε_k``.

    ``losses``: (2h,) with members ``θ+ε_k`` first, then ``θ−ε_k``; ``noise[name]``: (h, *shape)
    the ``ε_k``; ``sigma[name]``: σ broadcastable to the parameter. With ``shaping="rank"`` the
    losses are replaced by centred ranks, rescaled so the differences keep the raw differences'
    spread (the estimate stays on the gradient's scale for LR and clipping).
    """
    h = losses.shape[0] // 2
    diff = losses[:h] - losses[h:]
    if shaping == "rank":
        u = _centered_ranks(losses)
        du = u[:h] - u[h:]
        sd = du.std() if h > 1 else du.abs().max()
        diff = du * (diff.std() / sd.clamp(min=1e-12)) if h > 1 else du * diff.abs().max() / sd.clamp(min=1e-12)
    elif shaping != "none":
        raise CertonnxError(f"unknown gls_shaping {shaping!r} (expected none or rank)")
    out = {}
    for name, e in noise.items():
        g = torch.tensordot(diff, e, dims=([0], [0]))
        out[name] = g / (2 * h * sigma[name] ** 2)
    return out


class GLS(Method):
    """Certified training on the Gaussian-smoothed loss (PGPE or RGS estimator)."""

    name = "gls"
    Options = GLSOptions

    def __init__(self) -> None:
        self._sigma_state: dict[str, torch.Tensor] | None = None  # PGPE σ adaptation (per coordinate)
        self._vmap_ok: dict[str, bool] = {}
        self._wrapper: _BoundLoss | None = None
        self.calls = {"batched": 0, "looped": 0}  # population evaluations (for tests/benchmarks)

    # -- pieces --------------------------------------------------------------------------------
    def _params(self, bm: BoundedModule) -> dict[str, nn.Parameter]:
        return {n: p for n, p in bm.gm.named_parameters() if p.requires_grad}

    def _sigma(self, params: dict[str, nn.Parameter], o: GLSOptions) -> dict[str, torch.Tensor]:
        """σ per parameter tensor (a 0-d tensor) or, with σ adaptation, per coordinate."""
        if o.gls_sigma_lr > 0 and self._sigma_state is not None \
                and self._sigma_state.keys() == params.keys() \
                and all(self._sigma_state[n].shape == p.shape for n, p in params.items()):
            return self._sigma_state
        with torch.no_grad():
            if o.gls_sigma_mode == "abs":
                sig = {n: torch.tensor(o.gls_sigma, dtype=p.dtype, device=p.device) for n, p in params.items()}
            else:
                rms = {n: p.detach().pow(2).mean().sqrt() for n, p in params.items()}
                tot = sum(float(p.detach().pow(2).sum()) for p in params.values())
                glob = math.sqrt(tot / max(sum(p.numel() for p in params.values()), 1)) or 1.0
                # a zero-initialised tensor (biases) takes the global scale, else it is never explored
                sig = {n: o.gls_sigma * (r if float(r) > 1e-12 else torch.tensor(glob, dtype=r.dtype, device=r.device))
                       for n, r in rms.items()}
        if o.gls_sigma_lr > 0:
            self._sigma_state = {n: s.expand_as(params[n]).clone() for n, s in sig.items()}
            self._sigma0 = {n: s.clone() for n, s in self._sigma_state.items()}
            return self._sigma_state
        return sig

    def _noise(self, params: dict[str, nn.Parameter], sigma: dict[str, torch.Tensor], n: int,
               ctx: StepContext) -> dict[str, torch.Tensor]:
        g = ctx.generator
        return {name: torch.randn((n, *p.shape), generator=g, device=p.device, dtype=p.dtype) * sigma[name]
                for name, p in params.items()}

    def _evaluate(self, wrapper: _BoundLoss, members: dict[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, C: torch.Tensor, relaxation: str, chunk: int, mode: str = "auto") -> torch.Tensor:
        """Losses (P,) of the population ``members`` (``{"gm.<name>": (P, *shape)}``)."""
        P = next(iter(members.values())).shape[0]
        bm = wrapper.bm
        ok = mode == "vmap" or (mode == "auto" and self._vmap_ok.get(relaxation, _prefer_vmap(relaxation, x.device)))
        if ok:
            try:
                with _population_mode(bm):
                    fn = vmap(lambda pr: functional_call(wrapper, pr, (x, y, C)))
                    step = chunk if chunk > 0 else P
                    out = torch.cat([fn({k: v[s:s + step] for k, v in members.items()}) for s in range(0, P, step)])
                self._vmap_ok[relaxation] = True
                self.calls["batched"] += 1
                return out
            except RuntimeError as e:  # an op of this relaxation is not vmappable
                warnings.warn(f"GLS: the {relaxation} bound pass cannot be vmapped ({str(e).splitlines()[0][:120]}); "
                              "evaluating the population member by member", stacklevel=3)
                self._vmap_ok[relaxation] = False
        with _population_mode(bm):
            out = torch.stack([functional_call(wrapper, {k: v[i] for k, v in members.items()}, (x, y, C))
                               for i in range(P)])
        self.calls["looped"] += 1
        return out

    def _adapt_sigma(self, losses: torch.Tensor, noise: dict[str, torch.Tensor], lr: float) -> None:
        """PGPE σ update (Sehnke et al. 2010, symmetric sampling): coordinates whose larger
        perturbations gave lower loss get a larger σ. Rewards are normalised and the relative
        change is clipped to ±20 % per step, σ kept within [0.1, 10]× its initial value."""
        if self._sigma_state is None:
            return
        h = losses.shape[0] // 2
        r = (losses[:h] + losses[h:]) / 2 - losses.mean()
        r = r / r.std().clamp(min=1e-12) if h > 1 else torch.sign(r)
        with torch.no_grad():
            for n, s in self._sigma_state.items():
                e = noise[n]
                z = (e / s) ** 2 - 1  # (h, *shape)
                delta = (-lr * torch.tensordot(r, z, dims=([0], [0])) / h).clamp(-0.2, 0.2)
                s.mul_(1 + delta)
                s0 = self._sigma0[n]
                torch.maximum(torch.minimum(s, 10 * s0), 0.1 * s0, out=s)

    # -- the method ----------------------------------------------------------------------------
    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        return self._smoothed(bm, x, y, {norm: eps}, ctx)

    def loss_multi(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        # one population evaluation covers all norms (the loss is their mean)
        return self._smoothed(bm, x, y, dict(ctx.eps), ctx)

    def _smoothed(self, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor, eps: dict[str, float],
                  ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        if bm is None:
            raise CertonnxError("the gls method needs a BoundedModule")
        o: GLSOptions = self.opts(ctx)
        if self._wrapper is None or self._wrapper.gm is not bm.gm:
            self._wrapper = _BoundLoss(bm)
            self._vmap_ok = {}
        w = self._wrapper
        k = kappa(ctx, o.kappa_end) if any(e > 0 for e in eps.values()) else 1.0
        w.setup(eps, k, o.gls_relaxation, tuple(ctx.domain), o.alpha_steps)  # type: ignore[arg-type]
        C = margin_matrix(y, ctx.num_classes).to(x.dtype)
        params = self._params(bm)
        if not params:
            raise CertonnxError("the model has no trainable parameters")
        sigma = self._sigma(params, o)
        mix = o.gls_mix
        P = o.gls_pop

        # the unperturbed network: statistics, BatchNorm running stats, the optional plain gradient
        if o.gls_relaxation == "alpha-crown":
            # α-CROWN backpropagates its own objective inside compute(): with the real parameters
            # that would accumulate into their .grad, so evaluate on detached copies; its bound is
            # detached anyway, the plain gradient (gls_mix) is then that of the clean term only
            with torch.no_grad():
                _, out, lbs = functional_call(w, {f"gm.{n}": p.detach() for n, p in params.items()},
                                              (x, y, C), {"full": True})
            center_loss = k * F.cross_entropy(bm.gm(x).flatten(1), y) if mix > 0 else out.new_zeros(())
        else:
            with torch.set_grad_enabled(mix > 0 and torch.is_grad_enabled()):
                center_loss, out, lbs = w.terms(x, y, C)
        stats: Stats = {"clean_acc": accuracy(out, y),
                        "cert_acc": min(cert_fraction(lb) for lb in lbs) if lbs else None}

        if mix >= 1.0:  # plain gradient of the same loss (the unsmoothed baseline)
            return center_loss, stats
        if o.gls_estimator == "pgpe":
            h = P // 2
            with torch.no_grad():
                noise = self._noise(params, sigma, h, ctx)
                members = {f"gm.{n}": torch.cat([p.detach().unsqueeze(0) + noise[n], p.detach().unsqueeze(0) - noise[n]])
                           for n, p in params.items()}
                losses = self._evaluate(w, members, x, y, C, o.gls_relaxation, o.gls_chunk, o.gls_batched)
                grads = pgpe_gradient(losses, noise, sigma, o.gls_shaping)
                if o.gls_sigma_lr > 0:
                    self._adapt_sigma(losses, noise, o.gls_sigma_lr)
            value = losses.mean()
            s = torch.stack([(p * grads[n]).sum() for n, p in params.items()]).sum()
            smoothed = s - s.detach() + value
        else:  # rgs
            n_draw = (P + 1) // 2 if o.gls_antithetic else P  # pairs: rounded up to even
            with torch.no_grad():
                noise = self._noise(params, sigma, n_draw, ctx)
                if o.gls_antithetic:
                    noise = {n: torch.cat([e, -e]) for n, e in noise.items()}
            # θ + ε with ε constant: d/dθ of the mean loss is the mean of the members' gradients
            members = {f"gm.{n}": p.unsqueeze(0) + noise[n] for n, p in params.items()}
            losses = self._evaluate(w, members, x, y, C, o.gls_relaxation, o.gls_chunk, o.gls_batched)
            smoothed = losses.mean()
        total = (1 - mix) * smoothed + mix * center_loss if mix > 0 else smoothed
        return total, stats


__all__ = ["DEFAULTS", "ESTIMATORS", "GLS", "GLSOptions", "RELAXATIONS", "pgpe_gradient"]
