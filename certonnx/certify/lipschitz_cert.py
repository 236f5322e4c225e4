"""Dataset certification with the Lipschitz certificate (``certonnx certify --method lipschitz``).

A sample is verified at ε when its Lipschitz radius (:func:`certonnx.bounds.lipschitz.lipschitz_radius`:
the smallest margin divided by a proven bound of that margin's Lipschitz constant) is larger
than ε. The radius is a property of the whole norm ball, ignoring the input domain; the
certified set (ball ∩ domain) is a subset of it, so this is sound. It is usually much looser
than CROWN on ordinary networks and is meant for Lipschitz-controlled ones (e.g. trained with
``sac``); it costs one forward pass plus one SVD per layer, independent of ε.

The report has the keys of :func:`certonnx.certify.core.certify_dataset` plus the mean
certified radius per norm (misclassified samples count 0). Every sample verified here is also
attacked with PGD at the same ε; a verified sample that PGD breaks raises
:class:`~certonnx.certify.core.SoundnessError` (a bug, never a result).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from certonnx.attacks.pgd import pgd_attack
from certonnx.bounds import BoundedModule
from certonnx.bounds.lipschitz import lipschitz_radius
from certonnx.certify.core import SoundnessError, _input_space, prepare_model


def lipschitz_radii(bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, norm: str, batch_size: int = 256,
                    device: torch.device | str = "cpu", *, head: Any = None,
                    domain: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-sample certified radius ``(N,)`` for ``norm`` (0 where the prediction is wrong).

    With a softmax ``head`` set aside at import, the radius within which every margin stays
    above the head's rounding threshold ``T`` (:mod:`certonnx.certify.head`): within distance
    ``ρ ≤ r`` of the point each margin is at least ``L_j·(r_j − ρ) ≥ L_min·(r − ρ)`` (``r_j``
    the radius of margin ``j``, ``r = min r_j``), so ``r − T / L_min`` keeps it above ``T``,
    with ``T`` sized by the logits' bound over the ball of radius ``r`` (∩ ``domain``).
    """
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        r = lipschitz_radius(bm, xb, yb, norm)
        if head is not None:
            r = _head_radius(bm, xb, yb, r, norm, domain)
        out.append(r.detach().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _head_radius(bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, norm: str,
                 domain: tuple[float, float] | None) -> torch.Tensor:
    """``max(r − T / L_min, 0)``, see :func:`lipschitz_radii`."""
    from certonnx.bounds import InputSet
    from certonnx.bounds.lipschitz import lipschitz_margin_constants
    from certonnx.certify.head import logit_magnitude, margin_threshold

    with torch.no_grad():
        K = int(bm.gm(x[:1]).flatten(1).shape[1])
        Lm = lipschitz_margin_constants(bm, y, K, norm).to(r.dtype).clamp_min(1e-12)
        other = torch.arange(K, device=y.device)[None, :] != y[:, None]
        l_min = torch.where(other, Lm, torch.full_like(Lm, float("inf"))).amin(1)
        mag = logit_magnitude(bm, InputSet(x, r, norm=norm, domain=domain)).to(r.dtype)
        return (r - margin_threshold(mag) / l_min).clamp(min=0.0)


def certify_lipschitz(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    norms: dict[str, float],
    batch_size: int = 256,
    *,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    onnx_path: str | os.PathLike[str] | None = None,
    ort_inputs: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Certify ``x, y`` (raw inputs, labels) for every ``{norm: eps}`` with the Lipschitz bound.

    ``model`` is a :class:`~certonnx.graph.model.CertModel` (or a plain module, then the domain
    is [0, 1]). Returns ``n, clean_accuracy, pgd_accuracy{norm}, certified_accuracy{norm},
    union_certified_accuracy, epsilon, input_space, method="lipschitz", seconds`` and
    ``mean_certified_radius{norm}``, and, like ``certify_dataset``, ``status_counts``,
    ``per_method``, ``ort_disagreements`` and ``falsification_check`` (PGD counterexamples and
    misclassified clean points are re-checked on ``onnx_path`` with onnxruntime when given), and
    the same guard on clean predictions (``ort_inputs``: the data as the user stores it).
    """
    t0 = time.monotonic()
    dev, module, sample_shape, domain, was_training = prepare_model(model, x, device)
    n = int(x.shape[0])
    head = getattr(model, "head", None)
    gen = torch.Generator().manual_seed(seed)
    req = [p for p in module.parameters() if p.requires_grad]
    for p in req:
        p.requires_grad_(False)
    try:
        bm = BoundedModule(module, sample_shape)
        with torch.no_grad():
            logits = torch.cat([module(x[i:i + batch_size].to(dev)).flatten(1).cpu()
                                for i in range(0, n, batch_size)]) if n else torch.zeros(0, 1)
        runner = _runner(onnx_path, model)
        clean_check = None
        if runner is not None:
            from certonnx.certify.core import guarded_predictions

            clean_check = guarded_predictions(runner, x if ort_inputs is None else ort_inputs, logits,
                                              source=str(onnx_path))
        correct = logits.argmax(1) == y
        verified: dict[str, torch.Tensor] = {}
        broken: dict[str, torch.Tensor] = {}
        points: dict[str, torch.Tensor] = {}
        radii: dict[str, torch.Tensor] = {}
        for norm, eps in norms.items():
            r = lipschitz_radii(bm, x, y, norm, batch_size, dev, head=head, domain=domain) if n else torch.zeros(0)
            r = torch.where(correct, r, torch.zeros_like(r))
            radii[norm] = r
            ver = correct & (r > eps)
            brk = ~correct.clone()
            pts = x.clone()
            if eps > 0 and bool(correct.any()):
                idx = torch.nonzero(correct).flatten()
                for i in range(0, idx.numel(), batch_size):
                    j = idx[i:i + batch_size]
                    adv = pgd_attack(module, x[j].to(dev), y[j].to(dev), eps, norm, domain, steps=pgd_steps,
                                     restarts=pgd_restarts, generator=gen)
                    assert isinstance(adv, torch.Tensor)  # return_loss=False
                    with torch.no_grad():
                        brk[j] = (module(adv).flatten(1).argmax(1) != y[j].to(dev)).cpu()
                    pts[j] = adv.cpu()
            clash = ver & brk
            if bool(clash.any()):
                k = int(torch.nonzero(clash)[0])
                raise SoundnessError(f"internal error: sample {k} has Lipschitz radius {float(r[k]):.4g} > "
                                     f"{norm} eps={eps} but PGD breaks it; this is a certonnx bug")
            verified[norm], broken[norm], points[norm] = ver, brk, pts
    finally:
        for p in req:
            p.requires_grad_(True)
        module.train(was_training)
    falsified, disagree, engine = _confirm(points, broken, y, runner, batch_size)
    clean = float(correct.double().mean()) if n else 0.0
    return {
        "n": n,
        "clean_accuracy": clean,
        "pgd_accuracy": {k: float((correct & ~b).double().mean()) if n else 0.0 for k, b in broken.items()},
        "certified_accuracy": {k: float(v.double().mean()) if n else 0.0 for k, v in verified.items()},
        "union_certified_accuracy": float(torch.stack(list(verified.values())).all(0).double().mean())
        if verified and n else 0.0,
        "epsilon": {k: float(e) for k, e in norms.items()},
        "input_space": _input_space(model),
        "method": "lipschitz",
        "head": head.describe() if head is not None else None,
        "seconds": round(time.monotonic() - t0, 3),
        "mean_certified_radius": {k: float(r.double().mean()) if n else 0.0 for k, r in radii.items()},
        "pgd": {"steps": pgd_steps, "restarts": pgd_restarts, "seed": seed},
        "per_method": {k: {"lipschitz": int(v.sum())} for k, v in verified.items()},
        "status_counts": {k: {"verified": int(v.sum()), "falsified": int(falsified[k].sum()),
                              "unknown": n - int(v.sum()) - int(falsified[k].sum())} for k, v in verified.items()},
        "ort_disagreements": disagree,
        "falsification_check": engine,
        **({"ort_clean_check": clean_check} if clean_check is not None else {}),
    }


def _runner(onnx_path: str | os.PathLike[str] | None, model: Any) -> Any:
    """onnxruntime on the original file, with the user's declared normalization; None without a file."""
    if onnx_path is None:
        return None
    from certonnx.certify.ort_check import OrtRunner

    return OrtRunner.for_model(onnx_path, model)


def _confirm(points: dict[str, torch.Tensor], broken: dict[str, torch.Tensor], y: torch.Tensor, runner: Any,
             batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """Counterexamples confirmed by onnxruntime on the original file (torch when none is given)."""
    if runner is None:
        return broken, {k: 0 for k in broken}, "torch (no ONNX file given)"
    from certonnx.certify.ort_check import margin_violated

    falsified, disagree = {}, {}
    for k, b in broken.items():
        cand = torch.nonzero(b).flatten()
        ok = torch.zeros_like(b)
        if cand.numel():
            out = np.concatenate([runner(points[k][cand[i:i + batch_size]].numpy().astype(np.float32))
                                  for i in range(0, cand.numel(), batch_size)])
            ok[cand] = torch.as_tensor(margin_violated(out, y[cand].numpy()))
        falsified[k], disagree[k] = ok, int(cand.numel() - int(ok.sum()))
    return falsified, disagree, "onnxruntime"


__all__ = ["certify_lipschitz", "lipschitz_radii"]
