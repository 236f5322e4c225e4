"""auto_LiRPA as an optional second bound engine, on the graph certonnx imported.

``certonnx certify --backend auto_lirpa`` bounds the margins with auto_LiRPA instead of
certonnx's engine (an independent implementation of the same relaxations), and
``--cross-check`` runs both and fails when certonnx claims a tighter bound than every bound
auto_LiRPA proves for the same set. auto_LiRPA is not a dependency: it supports torch < 2.9 only
(its repository; the 0.3 release on PyPI does not install), so this module imports it lazily
and says how to get it when it is missing.

What differs, and why the cross-check is one-sided:

* auto_LiRPA computes in float32 without rounding terms: its bounds hold for exact arithmetic
  on the float32 weights, not for the model as onnxruntime executes it. certonnx's bounds add
  the allowances of docs/bounds.md ("The soundness guarantee"), so certonnx is normally a little
  *looser*; a certificate from ``--backend auto_lirpa`` does not carry certonnx's guarantee.
* certonnx is legitimately tighter in a few places: its IBP composes chains of affine ops
  before concretizing (the last layer is folded into the margin matrix), and it keeps the
  better of the CROWN and IBP bound of the output. The reference of the cross-check is hence
  the best of several auto_LiRPA methods (:data:`REFERENCES`), each a valid bound.
* L2 and L1: auto_LiRPA bounds the ball alone; certonnx also intersects it with the input
  domain. The cross-check therefore compares certonnx on the same ball without the domain.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from certonnx.bounds.core import InputSet
from certonnx.errors import CertonnxError

#: certonnx bound method -> auto_LiRPA's ``compute_bounds(method=...)``
METHOD_NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}

#: auto_LiRPA methods whose best bound is the cross-check's reference for a certonnx method
REFERENCES = {
    "ibp": ("ibp", "crown-ibp"),
    "crown-ibp": ("crown-ibp", "ibp"),
    "crown": ("crown", "ibp"),
    "alpha-crown": ("alpha-crown", "crown", "ibp"),
}

#: tolerance of the cross-check, × (1 + |reference|): auto_LiRPA's float32 sums over thousands
#: of terms, in another order, without rounding allowances (seen: 1.6e-5 on a margin of 0.1)
CROSS_CHECK_RTOL = 1e-4

#: where certonnx is tighter than the references, auto_LiRPA's α-CROWN is asked as well before
#: the cross-check fails: the two engines relax some ops differently (max pooling's upper line),
#: so a CROWN bound can legitimately beat the other engine's CROWN, rarely its optimised one
ESCALATE = "alpha-crown"

#: methods compared but never failed on: α-CROWN's bound is the outcome of an optimisation
#: (certonnx: final-layer slopes, 20 Adam steps; auto_LiRPA: every slope, early stopping), and
#: every slope in [0, 1] gives a valid bound, so a tighter certonnx α-CROWN is no evidence of a
#: bug (seen: +0.019 on a channels-last CNN where auto_LiRPA stopped after 10 steps)
INFORMATIONAL = frozenset({"alpha-crown"})

#: norms compared but never failed on: auto_LiRPA 0.7.1 bounds an L1 ball loosely on conv nets
#: (the quick-start CNN at L1 1.0: its CROWN margin bound -85, certonnx's -21, the smallest margin
#: sampling and PGD find +5.5), so certonnx is legitimately tighter there by tens
INFORMATIONAL_NORMS = frozenset({"l1"})


def informational(method: str, norm: str) -> bool:
    """Whether a tighter certonnx bound for ``method`` / ``norm`` is reported but not failed on."""
    return method in INFORMATIONAL or norm in INFORMATIONAL_NORMS

INSTALL_HINT = ("auto_LiRPA is not installed: it needs torch < 2.9; install it from its repository "
                "(pip install git+https://github.com/Verified-Intelligence/auto_LiRPA) into an environment "
                "with such a torch")


class CrossCheckError(CertonnxError):
    """certonnx claimed a tighter bound than auto_LiRPA proves: a possible soundness bug, so it
    exits like the soundness guard (1), not like a user error."""

    exit_code = 1


def available() -> str | None:
    """auto_LiRPA's version when it can be imported, else None."""
    try:
        import auto_LiRPA
    except Exception:  # ImportError, or its own import failing against this torch
        return None
    return str(getattr(auto_LiRPA, "__version__", "unknown"))


class AutoLirpaBounds:
    """auto_LiRPA's ``BoundedModule`` on ``module`` (the torch graph certonnx imported), with
    the interface of :meth:`certonnx.bounds.engine.BoundedModule.compute` for L∞, L2 and L1 sets."""

    def __init__(self, module: nn.Module, sample_shape: Sequence[int], device: torch.device | str = "cpu") -> None:
        try:
            from auto_LiRPA import BoundedModule as LirpaModule
        except Exception as e:
            raise CertonnxError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from None
        self.version = available() or "unknown"
        example = torch.zeros(1, *sample_shape, device=device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its tracer's warnings about onnx2torch's shape ops
                self.lirpa = LirpaModule(module, example, device=str(device), verbose=0)
        except Exception as e:  # its graph import: an op it does not parse
            raise CertonnxError(f"auto_LiRPA could not import this model's graph ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def compute(self, inset: InputSet, C: torch.Tensor, method: str, *, alpha_steps: int = 20,
                ball_only: bool = True) -> torch.Tensor:
        """Lower bounds ``(B, S)`` of ``C @ f(x')`` over the set (L2, L1: over the ball alone)."""
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        if inset.norm == "linf":
            ptb = PerturbationLpNorm(norm=math.inf, x_L=inset.lower, x_U=inset.upper)
        elif inset.norm in ("l2", "l1"):
            e = inset.ball_eps
            # one radius as a number; per-sample radii as (B, 1), which broadcasts against the
            # (B, S) dual norms of its concretization
            ptb = PerturbationLpNorm(norm=2 if inset.norm == "l2" else 1,
                                     eps=float(e.max()) if bool((e == e.max()).all()) else e.view(-1, 1))
        else:
            raise CertonnxError(f"--backend auto_lirpa supports linf, l2 and l1, not {inset.norm}")
        name = METHOD_NAMES[method]
        if method == "alpha-crown":
            self.lirpa.set_bound_opts({"optimize_bound_args": {"iteration": alpha_steps}})
        bx = BoundedTensor(inset.x, ptb)
        try:
            # its optimiser prints progress ("Early stop at ...") on stdout, where --json - goes
            with contextlib.redirect_stdout(io.StringIO()), \
                    (torch.enable_grad() if method == "alpha-crown" else torch.no_grad()):
                lb, _ = self.lirpa.compute_bounds(x=(bx,), C=C, method=name, bound_upper=False)
        except Exception as e:  # an op or a combination its bound rules do not handle
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise CertonnxError(f"auto_LiRPA failed to compute {method} bounds ({type(e).__name__}: {msg})") from None
        return lb.detach()


def cross_check(certonnx_lb: torch.Tensor, references: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Compare certonnx's lower bounds with the best of auto_LiRPA's: ``tighter`` is the
    largest amount by which certonnx's exceeds it beyond tolerance (0 when never), ``looser``
    the largest amount below. A positive ``tighter`` is a disagreement."""
    ref = torch.stack(list(references.values())).amax(0)
    tol = CROSS_CHECK_RTOL * (1 + ref.abs())
    diff = certonnx_lb - ref
    over = diff - tol
    return {"tighter": float(over.clamp(min=0).max()) if over.numel() else 0.0,
            "looser": float((-diff).clamp(min=0).max()) if diff.numel() else 0.0,
            "disagreements": int((over > 0).sum()), "pairs": int(diff.numel())}


__all__ = ["AutoLirpaBounds", "CrossCheckError", "INSTALL_HINT", "METHOD_NAMES", "ESCALATE", "INFORMATIONAL", "INFORMATIONAL_NORMS", "REFERENCES", "available",
           "cross_check", "informational"]
