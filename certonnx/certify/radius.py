"""Certified radius per sample (batched bisection), average certified radius and ε curves.

The radius of a sample is the largest ε (up to ``eps_max``, to bisection resolution) at which
the bound method verifies it; 0 for misclassified samples. Each bisection step bounds every
sample at once with a per-sample ε tensor. The radius reported is always one that *was*
verified (the lower end of the bisection interval), and robustness at ε implies robustness at
every smaller ε, so the certified-accuracy curve derived from it is sound.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from certonnx.bounds import InputSet, margin_matrix


def _verified(bm: Any, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str, method: str,
              domain: tuple[float, float], K: int, head: Any = None) -> torch.Tensor:
    from certonnx.certify.head import margins_certify

    s = InputSet(x, eps, norm=norm, domain=domain)
    with torch.no_grad():
        lb, _ = bm.compute(s, C=margin_matrix(y, K), method=method, upper=False)
    return margins_certify(bm, lb.detach().amin(1), x, eps, norm, domain, head)


def certified_radius(
    bm: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps_max: float,
    method: str = "crown",
    iters: int = 10,
    *,
    domain: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 256,
    num_classes: int | None = None,
    correct: torch.Tensor | None = None,
    head: Any = None,
) -> torch.Tensor:
    """Per-sample certified radius ``(N,)`` (on the device of ``x``) by bisection on ``[0, eps_max]``.

    ``method="auto"`` uses CROWN. Resolution is ``eps_max / 2**iters``. ``correct`` (N,) bool:
    which samples the model classifies correctly, when the caller already knows (training:
    from the clean logits, sparing a forward pass that would update BatchNorm statistics).
    ``head``: the model's softmax set aside at import; margins must then exceed its rounding
    threshold (:mod:`certonnx.certify.head`).
    """
    if method == "auto":
        method = "crown"
    out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        K = num_classes or int(bm(x[:1]).flatten(1).shape[1])
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        B = xb.shape[0]
        if correct is None:
            with torch.no_grad():
                ok_b = bm(xb).flatten(1).argmax(1) == yb
        else:
            ok_b = correct[start:start + B].to(xb.device)
        lo = torch.zeros(B, dtype=xb.dtype, device=xb.device)
        hi = torch.full((B,), float(eps_max), dtype=xb.dtype, device=xb.device)
        # samples verified at eps_max are done at once
        top = _verified(bm, xb, yb, hi, norm, method, domain, K, head) & ok_b
        lo = torch.where(top, hi, lo)
        active = ok_b & ~top
        for _ in range(iters):
            if not bool(active.any()):
                break
            idx = torch.nonzero(active).flatten()
            mid = (lo[idx] + hi[idx]) / 2
            ok = _verified(bm, xb[idx], yb[idx], mid, norm, method, domain, K, head)
            lo[idx] = torch.where(ok, mid, lo[idx])
            hi[idx] = torch.where(ok, hi[idx], mid)
        out[start:start + B] = torch.where(ok_b, lo, torch.zeros_like(lo))
    return out


def radius_summary(radii: torch.Tensor, eps_max: float, points: int = 21,
                   correct: torch.Tensor | None = None) -> dict[str, Any]:
    """Average certified radius (ACR, misclassified samples count 0) and the
    certified-accuracy-vs-ε curve (at ε = 0: the clean accuracy when ``correct`` is given)."""
    eps = np.linspace(0.0, float(eps_max), points)
    r = radii.double().numpy()
    acc = [float(np.mean(r >= e)) if e > 0 else float(np.mean(r > 0)) for e in eps]
    if correct is not None and r.size:
        acc[0] = float(correct.double().mean())
    return {"acr": float(r.mean()) if r.size else 0.0, "curve": {"eps": [float(e) for e in eps], "accuracy": acc}}


def pgd_accuracy_curve(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: list[float],
                       domain: tuple[float, float], *, steps: int = 20, restarts: int = 1, seed: int = 0,
                       batch_size: int = 128, device: torch.device | str = "cpu") -> list[float]:
    """PGD accuracy at each ε of ``eps`` (at 0: clean accuracy): an upper bound of the true
    robust accuracy, drawn beside the certified curve (a lower bound) so the gap shows."""
    from certonnx.attacks.pgd import pgd_attack

    gen = torch.Generator().manual_seed(seed)
    acc = []
    for e in eps:
        hits = 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            adv = xb if e <= 0 else pgd_attack(module, xb, yb, e, norm, domain, steps=steps, restarts=restarts,
                                               generator=gen)
            assert isinstance(adv, torch.Tensor)  # return_loss=False
            with torch.no_grad():
                hits += int((module(adv).flatten(1).argmax(1) == yb).sum())
        acc.append(hits / max(1, x.shape[0]))
    return acc


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike[str],
                title: str = "certified accuracy", *, pgd: dict[str, tuple[list[float], list[float]]] | None = None,
                marks: dict[str, float] | None = None) -> None:
    """PNG of certified accuracy vs ε, one panel per norm (written atomically); ``pgd`` adds the
    PGD accuracy curve, ``marks`` a vertical line at the ε the user asked for."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from certonnx.utils import atomic_write_bytes

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (norm, (eps, acc)) in zip(axes[0], curves.items()):
        ax.plot(eps, acc, marker="o", markersize=3, label="certified")
        if pgd and norm in pgd:
            ax.plot(*pgd[norm], marker="s", markersize=3, linestyle="--", label="PGD (upper bound)")
        if marks and norm in marks:
            ax.axvline(marks[norm], color="grey", linewidth=0.8, linestyle=":", label=f"ε = {marks[norm]:g}")
        ax.legend(fontsize=7)
        ax.set_xlabel(f"ε ({norm}, raw input space)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(norm)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
