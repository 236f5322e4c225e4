"""Shared pieces of certified-training methods.

A method is a small class with ``loss(model_fn, bm, x, y, eps, norm, ctx) -> (loss, stats)``
for one norm; :meth:`Method.loss_multi` combines norms (default: the mean of the per-norm
losses, so ``--norm linf:0.1,l2:0.5`` trains for both). Methods that need all norms at once
(later: CURE, ACERT, ...) override ``loss_multi`` instead. Everything a method may need that
is not the batch (current ε, ramp progress, the module, a seeded generator, flags) comes in
the :class:`StepContext`, so the trainer stays method-agnostic.

``stats`` are per-batch fractions (``clean_acc``, ``cert_acc``; ``None`` when a method does
not measure it); the trainer averages them weighted by batch size.

A method's flags are a frozen dataclass registered as ``Options`` on its class (see
:mod:`certonnx.train.methods.options`): typed fields with defaults and help, validated once.
The trainer parses ``TrainConfig.options`` into it and hands the instance to every step in
``StepContext.options``; :meth:`Method.opts` gives it back typed (and parses a plain dict, for
callers that build a ``StepContext`` themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from certonnx.train.methods.options import MethodOptions, option

ModelFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepContext:
    """What a method may know about the current step besides the batch."""

    module: nn.Module
    epoch: int
    step: int
    eps: dict[str, float]  # current ε per norm (after the schedule)
    eps_target: dict[str, float]  # final ε per norm
    progress: float  # 0 during warm-up, rising to 1 at the end of the ramp (ε-schedule fraction)
    domain: tuple[float, float] = (0.0, 1.0)
    num_classes: int = 10
    generator: torch.Generator | None = None
    # the method's flags: its ``Options`` instance (the trainer's) or a plain dict parsed on use
    options: MethodOptions | Mapping[str, Any] = field(default_factory=dict)
    regularize: bool = False  # Shi et al. regularisers active this step
    reg_lambda: float = 0.5


Stats = dict[str, float | None]


# options several methods share: one declaration each, so their defaults cannot drift apart
def pgd_steps_option() -> Any:
    return option(10, "PGD steps of the training attack", flag="--pgd-steps", ge=1)


def kappa_end_option() -> Any:
    return option(0.5, "final weight κ of the clean loss (κ goes 1 → this over the ε ramp)", flag="--kappa-end",
                  ge=0, le=1)


class Method:
    """Base class: override :meth:`loss` (one norm) or :meth:`loss_multi` (all norms)."""

    name = "base"
    certified = True  # produces bounds (cert_acc) during training
    needs_bounds = True  # whether the trainer must build a BoundedModule
    #: whether ``certonnx finetune`` computes certified radii (ACR) after training by default
    eval_radius_default = False
    #: the method's options (a frozen dataclass deriving from MethodOptions); none by default
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: every method class defined so far, by name (filled by ``__init_subclass__``; the
    #: package's REGISTRY decides which are offered)
    _defined: ClassVar[dict[str, type[Method]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name != Method.name:
            Method._defined.setdefault(cls.name, cls)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | MethodOptions | None, *,
                      strict: bool = True) -> MethodOptions:
        """``options`` as this method's ``Options`` (MethodOptionError on a bad key or value).

        ``strict=False`` drops keys that belong to *other* registered methods instead of
        failing: a ``TrainConfig`` shared by a sweep over methods (``tools/bench/train.py``
        passes ``pgd_steps`` to every method) stays valid. A key no method has is an error
        either way, so a typo never passes silently.
        """
        ignore: frozenset[str] = frozenset()
        if not strict:
            ignore = frozenset(k for m in Method._defined.values() for k in m.Options.keys())
        return cls.Options.from_mapping(options, method=cls.name, ignore=ignore)

    def opts(self, ctx: StepContext) -> Any:
        """The typed options of this step (``Any``: each method reads its own subclass' fields)."""
        o = ctx.options
        return o if isinstance(o, self.Options) else self.parse_options(o, strict=False)

    def loss(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
             eps: float, norm: str, ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    def loss_multi(self, model_fn: ModelFn, bm: BoundedModule | None, x: torch.Tensor, y: torch.Tensor,
                   ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """Mean over norms of :meth:`loss`; ``cert_acc`` is the fraction certified for every norm."""
        losses, stats = [], []
        for norm, eps in ctx.eps.items():
            loss_, st = self.loss(model_fn, bm, x, y, eps, norm, ctx)
            losses.append(loss_)
            stats.append(st)
        total = torch.stack(losses).mean()
        out: Stats = dict(stats[0])
        certs = [s.get("cert_acc") for s in stats]
        out["cert_acc"] = None if any(c is None for c in certs) else min(certs)  # type: ignore[type-var]
        return total, out

    def on_step(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Called after each optimizer step (e.g. for methods with their own state)."""

    def wants_epoch_start(self, epoch: int, options: Any, ramp_end: int) -> bool:
        """Whether :meth:`after_epoch` needs the state of epoch ``epoch`` (0-based) at its start;
        ``ramp_end`` is the number of epochs of warm-up and ε ramp. Default: no."""
        return False

    def after_epoch(self, run: EpochRun) -> None:  # noqa: B027 - optional hook
        """Called after an epoch for which :meth:`wants_epoch_start` was true (CURE's
        per-epoch gradient projection)."""

    def setup(self, module: nn.Module, options: MethodOptions | Mapping[str, Any] | None) -> list[nn.Parameter]:
        """Called once before the optimizer is built. Returns parameters the method owns and
        optimises itself (e.g. SaC's shrinkage factors), which the trainer's optimizer skips."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in checkpoints (own optimizers, adapted σ, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict` when resuming."""

    def finalize(self, module: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called after training, before certification and export (e.g. fold reparametrisations)."""


@dataclass
class EpochRun:
    """What :meth:`Method.after_epoch` gets: the trained module, its state and the optimizer's at
    the start of the epoch, the options, and ``natural_epoch(module, optimizer_state)``, which
    trains a module for one epoch of plain cross-entropy on the same batches (the epoch's data
    order) starting from that optimizer state."""

    module: nn.Module
    start_state: dict[str, torch.Tensor]
    start_optimizer: dict[str, Any]
    options: Any
    epoch: int
    natural_epoch: Callable[[nn.Module, dict[str, Any]], None]


# -- helpers -----------------------------------------------------------------------------------

def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.detach().flatten(1).argmax(1) == y).float().mean())


def robust_ce(lb: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on worst-case logits from margin lower bounds (CTBench form).

    ``lb`` (B, K-1) bounds ``f_y - f_j``; the worst-case logits are ``-lb`` for the wrong
    classes and 0 for the true one, so the loss is CE with the true class in column 0.
    """
    z = torch.cat([torch.zeros_like(lb[:, :1]), -lb], dim=1)
    return F.cross_entropy(z, torch.zeros(lb.shape[0], dtype=torch.long, device=lb.device))


def cert_fraction(lb: torch.Tensor) -> float:
    return float((lb.detach().amin(1) > 0).float().mean())


def input_set(x: torch.Tensor, eps: float | torch.Tensor, norm: str, ctx: StepContext) -> InputSet:
    return InputSet(x, eps, norm=norm, domain=ctx.domain)


def bound_margins(bm: BoundedModule, inset: InputSet, y: torch.Tensor, method: str, ctx: StepContext
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lb, reg)``: lower bounds of the margins ``f_y - f_j`` (B, K-1) over ``inset``, and the
    Shi et al. regulariser of this bound pass when the regularisers are active (IBP passes
    only; else None). The regulariser comes back with the bounds, so each method adds it to
    its loss explicitly (:func:`add_regularizer`) instead of through shared state."""
    C = margin_matrix(y, ctx.num_classes)
    if method == "ibp" and ctx.regularize:
        ibp_ctx = bm.ibp_pass(inset)
        lb, _ = bm.backward(ibp_ctx, bm.output_node, C.to(inset.x.dtype), None, stop=bm._is_stop_for_ibp)
        assert lb is not None
        return lb, shi_regularizer(bm, ibp_ctx, inset)
    lb, _ = bm.compute(inset, C=C, method=method, upper=False)
    return lb, None


def shi_regularizer(bm: BoundedModule, ibp_ctx: Any, inset: InputSet, tol: float = 0.5) -> torch.Tensor:
    """Shi et al. (2021) tightness + ReLU-balance regularisers over the input interval of every
    ReLU-like op (ReLU, LeakyReLU: the rules with a free lower slope).

    Tightness keeps interval widths from growing through the layers (relative to the input's);
    ReLU balance keeps active and inactive neurons balanced in mean and variance, so that IBP
    bounds do not blow up early in the ramp. Same form as auto_LiRPA's reference code.
    """
    x_itv = ibp_ctx.values[bm.input_node]
    tight0 = ((x_itv.upper - x_itv.lower) / 2).mean()
    loss_t = torch.zeros((), device=inset.x.device)
    loss_r = torch.zeros((), device=inset.x.device)
    cnt = 0
    for rule in bm.rules.values():
        if not rule.alpha_capable:  # the ReLU-like rules: a kink at 0 whose balance matters
            continue
        itv = ibp_ctx.values.get(rule.leaves[rule.pert[0]])
        if itv is None or not hasattr(itv, "lower"):
            continue
        lo, up = itv.lower, itv.upper
        center, diff = (up + lo) / 2, (up - lo) / 2
        loss_t = loss_t + F.relu(tol - tight0 / diff.mean().clamp(min=1e-12)) / tol
        act, inact = (lo > 0).float(), (up < 0).float()
        mean_ = center.mean()
        mean_act, mean_inact = (center * act).mean(), (center * inact).mean()
        delta = (center - mean_) ** 2
        var_act, var_inact = (delta * act).sum(), (delta * inact).sum()
        mean_ratio = mean_act / -mean_inact
        var_ratio = var_act / var_inact
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        lr_ = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(lr_):
            loss_r = loss_r + lr_
        cnt += 1
    if cnt == 0:
        return loss_t
    return (loss_t + loss_r) / cnt


def add_regularizer(loss: torch.Tensor, reg: torch.Tensor | None, ctx: StepContext) -> torch.Tensor:
    """Add the Shi et al. term ``reg`` (from :func:`bound_margins`), weighted by
    ``reg_lambda · (1 - ε/ε_target)`` (fades with the ramp)."""
    if reg is None or not ctx.regularize:
        return loss
    return loss + ctx.reg_lambda * (1.0 - ctx.progress) * reg


def kappa(ctx: StepContext, end: float) -> float:
    """Weight of the clean loss (Gowal et al. 2018): 1 during warm-up, linearly to ``end``
    (the method's ``kappa_end``) at the end of the ramp."""
    return 1.0 - (1.0 - float(end)) * ctx.progress


def attack(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str,
           ctx: StepContext, steps: int, step_size: float | None = None) -> torch.Tensor:
    """PGD inside the ε-ball ∩ domain with the module in eval mode (BatchNorm statistics are
    not polluted by adversarial inputs); the result is detached."""
    from certonnx.attacks import pgd_attack

    if isinstance(eps, float) and eps <= 0:
        return x.detach()
    was = ctx.module.training
    ctx.module.eval()
    req = [p for p in ctx.module.parameters() if p.requires_grad]
    for p in req:
        p.requires_grad_(False)
    try:
        x_adv = pgd_attack(model_fn, x.detach(), y, eps, norm=norm, domain=ctx.domain, steps=int(steps),
                           restarts=1, step_size=step_size, generator=ctx.generator, random_init=True)
    finally:
        for p in req:
            p.requires_grad_(True)
        ctx.module.train(was)
    assert isinstance(x_adv, torch.Tensor)
    return x_adv.detach()
