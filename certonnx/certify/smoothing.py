"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): a *probabilistic* certificate.

The certificate is about the **smoothed classifier** ``g(x) = argmax_c P(f(x + δ) = c)``,
``δ ~ N(0, σ² I)`` in the model's raw input space, not about the model ``f`` itself: ``g``
is what a deployment must run (a majority vote over noisy copies) for the guarantee to apply.
Per sample, Cohen et al.'s ``CERTIFY`` (their Algorithm 1, Theorem 1):

1. draw ``n0`` noisy copies, take the most frequent class ``ĉ`` (selection);
2. draw ``n`` fresh copies, count ``k`` votes for ``ĉ``; ``p̲ = `` the one-sided
   Clopper–Pearson lower confidence bound of ``P(f(x + δ) = ĉ)`` at level ``1 − α``;
3. ``p̲ < 1/2``: **abstain**; else ``g`` predicts ``ĉ`` and is robust within the L2 radius
   ``R = σ · Φ⁻¹(p̲)``.

With probability at least ``1 − α`` over the noise, a sample that does not abstain has
``g(x') = ĉ`` for every ``‖x' − x‖₂ < R``. Other norms follow from the ball inclusions: an L1
ball of radius ε lies in the L2 ball of radius ε, an L∞ ball of radius ε in the L2 ball of
radius ``ε·√d`` (``d`` input elements). A sample counts as certified at ε when ``ĉ`` is its
label and ``R`` exceeds the norm's L2 equivalent. The input domain is not used: the noise is
not clipped, as in the paper, and ``g`` is defined for any input.

The votes come from onnxruntime on the original file when one is given (the model as it is
deployed, the user's data layout; the noise is i.i.d. per element, so the layout does not
change its law), else from the torch model. The report keeps these numbers apart from the
deterministic ones (``report["smoothing"]``), and a certificate written from it holds them
under ``"probabilistic"`` with empty deterministic fields (docs/metadata.md), so a
deterministic requirement is never met by a probabilistic number.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from certonnx.errors import ConfigError

#: the claim, in words, for reports and certificates
MEANING = ("probabilistic (randomized smoothing, Cohen et al. 2019): with probability at least 1 − α over the "
           "noise, the smoothed classifier (the majority vote of the model over x + N(0, σ²I)) predicts the "
           "certified class everywhere within the radius; it is not a statement about the model alone")


@dataclass(frozen=True)
class SmoothingOptions:
    """Parameters of Cohen et al.'s ``CERTIFY``. Their ImageNet/CIFAR runs used ``n0 = 100``,
    ``n = 100 000``, ``α = 0.001``; the default ``n`` here is 10 000 (a CPU-sized run; the
    largest certifiable radius is then ``σ·Φ⁻¹(α^(1/n)) ≈ 3.2 σ``)."""

    sigma: float = 0.25
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    batch: int = 1_000  # noisy copies per forward pass

    def validate(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"must be a positive noise level, got {self.sigma:g}", "--sigma")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"must be in (0, 1), got {self.alpha:g}", "--alpha")
        if self.n0 < 1:
            raise ConfigError("must be at least 1", "--selection-samples")
        if self.n < 1:
            raise ConfigError("must be at least 1", "--noise-samples")
        if self.batch < 1:
            raise ConfigError("must be at least 1", "--batch-size")


def clopper_pearson_lower(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided ``1 − α`` Clopper–Pearson lower bound of a binomial proportion from ``k``
    successes in ``n`` trials: the ``α`` quantile of Beta(k, n − k + 1); 0 for ``k = 0``."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lo = beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1)
    return np.where(k > 0, lo, 0.0)


def l2_equivalent(norm: str, eps: float, dim: int) -> float:
    """The L2 radius whose ball contains the ``norm`` ball of radius ``eps`` in ``dim`` dimensions."""
    if norm == "l2" or norm == "l1":
        return float(eps)
    if norm == "linf":
        return float(eps) * math.sqrt(dim)
    raise ConfigError(f"randomized smoothing certifies linf, l2 and l1 (through L2), not {norm}", "--norm")


Predict = Callable[[np.ndarray], np.ndarray]  # a batch of inputs -> predicted classes


def _counts(predict: Predict, bases: np.ndarray, num: int, sigma: float, classes: int, batch: int,
            gen: np.random.Generator) -> np.ndarray:
    """Votes per class ``(S, classes)`` of ``predict`` over ``num`` noisy copies of each of the
    ``S`` samples ``bases``, about ``batch`` copies per forward pass (several samples share one
    pass when ``num`` is small)."""
    s = bases.shape[0]
    counts = np.zeros((s, classes), dtype=np.int64)
    per = max(1, batch // s)
    left = num
    while left > 0:
        b = min(per, left)
        noise = gen.standard_normal((s, b, *bases.shape[1:])).astype(np.float32)
        xs = (bases[:, None].astype(np.float32) + np.float32(sigma) * noise).reshape(s * b, *bases.shape[1:])
        pred = np.asarray(predict(xs)).astype(np.int64).reshape(s, b)
        counts += (pred[..., None] == np.arange(classes)).sum(1)
        left -= b
    return counts


def smoothed_certify(predict: Predict, bases: np.ndarray, opts: SmoothingOptions, classes: int,
                     gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen et al.'s ``CERTIFY`` for the samples ``bases`` (``(S, ...)``): per sample the
    class (−1: abstain), the certified L2 radius (0 when abstaining) and ``p̲``."""
    from scipy.stats import norm as normal

    top = _counts(predict, bases, opts.n0, opts.sigma, classes, opts.batch, gen).argmax(1)
    votes = _counts(predict, bases, opts.n, opts.sigma, classes, opts.batch, gen)
    k = votes[np.arange(bases.shape[0]), top]
    p_lo = clopper_pearson_lower(k, opts.n, opts.alpha)
    ok = p_lo >= 0.5
    radius = np.where(ok, opts.sigma * normal.ppf(np.where(ok, p_lo, 0.5)), 0.0)
    return np.where(ok, top, -1), radius, p_lo


def certify_smoothing(model: Any, x: torch.Tensor, y: torch.Tensor, norms: dict[str, float],
                      opts: SmoothingOptions | None = None, *, device: str | torch.device = "cpu", seed: int = 0,
                      onnx_path: str | os.PathLike[str] | None = None,
                      ort_inputs: np.ndarray | torch.Tensor | None = None,
                      progress: bool | Callable[[int], None] = False) -> dict[str, Any]:
    """Randomized-smoothing certificates of ``x, y`` for every ``{norm: eps}`` (module docstring).

    Returns the report of ``certify --method smoothing``: ``n``, ``clean_accuracy`` (the model
    itself, deterministic), ``epsilon``, ``input_space``, ``method = "smoothing"``, and under
    ``smoothing`` everything probabilistic: the parameters, what the claim means, the smoothed
    classifier's accuracy (correct and not abstained), abstentions, ``certified_accuracy`` per
    norm, ``union_certified_accuracy``, mean certified L2 radius and the per-sample radii.
    """
    from certonnx.certify.core import _input_space, _progress, guarded_predictions, prepare_model

    opts = opts or SmoothingOptions()
    opts.validate()
    dims = {k: l2_equivalent(k, e, int(x[0].numel()) if x.shape[0] else 1) for k, e in norms.items()}
    t0 = time.monotonic()
    dev, module, _, _, was_training = prepare_model(model, x, device)
    n = int(x.shape[0])
    gen = np.random.default_rng(seed)
    try:
        with torch.no_grad():
            logits = torch.cat([module(x[i:i + 256].to(dev)).flatten(1).cpu() for i in range(0, n, 256)]) \
                if n else torch.zeros(0, 1)
        classes = int(logits.shape[1])
        runner, bases, engine, clean_check = None, x.numpy(), "torch", None
        if onnx_path is not None:
            from certonnx.certify.ort_check import OrtRunner
            from certonnx.layout import apply_layout, plan_layout

            runner = OrtRunner.for_model(onnx_path, model)
            stored = x if ort_inputs is None else ort_inputs
            stored_np = stored.detach().cpu().numpy() if isinstance(stored, torch.Tensor) else np.asarray(stored)
            clean_check = guarded_predictions(runner, stored_np, logits, source=str(onnx_path)) if n else None
            plan = plan_layout(stored_np.shape[1:], runner.sample_dims) if runner.sample_dims else ([], "")
            bases = apply_layout(stored_np.astype(np.float32), plan[0]) if plan is not None else stored_np
            engine = "onnxruntime"

        def predict(xs: np.ndarray) -> np.ndarray:
            if runner is not None:
                return np.asarray(runner(xs).argmax(1))
            with torch.no_grad():
                return module(torch.from_numpy(xs).to(dev)).flatten(1).argmax(1).cpu().numpy()

        bar, tick = _progress(progress, n)
        pred = np.full(n, -1, dtype=np.int64)
        radius = np.zeros(n)
        p_lower = np.zeros(n)
        group = max(1, opts.batch // min(opts.n, opts.batch))  # samples whose copies share a pass
        try:
            for i in range(0, n, group):
                sl = slice(i, min(i + group, n))
                pred[sl], radius[sl], p_lower[sl] = smoothed_certify(predict, np.asarray(bases[sl]), opts, classes,
                                                                     gen)
                tick(sl.stop - sl.start, "randomized smoothing")
        finally:
            if bar is not None:
                bar.stop()
    finally:
        module.train(was_training)
    labels = y.numpy()
    right = pred == labels
    cert = {k: right & (radius > r2) for k, r2 in dims.items()}
    union = np.stack(list(cert.values())).all(0) if cert else right

    def frac(v: Any) -> float:
        return float(v.mean()) if n else 0.0

    return {
        "n": n,
        "method": "smoothing",
        "clean_accuracy": frac((logits.argmax(1) == y).numpy()),
        "epsilon": {k: float(e) for k, e in norms.items()},
        "input_space": _input_space(model),
        "seconds": round(time.monotonic() - t0, 3),
        "smoothing": {
            "kind": "probabilistic",
            "meaning": MEANING,
            **asdict(opts),
            "votes_from": engine,
            "seed": seed,
            "l2_equivalent": dims,
            "accuracy": frac(right),
            "abstained": int((pred < 0).sum()),
            "certified_accuracy": {k: frac(v) for k, v in cert.items()},
            "union_certified_accuracy": frac(union),
            "mean_radius_l2": float(np.where(right, radius, 0.0).mean()) if n else 0.0,
            "radius_l2": [round(float(r), 6) for r in np.where(right, radius, 0.0)],
            "prediction": [int(p) for p in pred],
            "p_lower": [round(float(p), 6) for p in p_lower],
        },
        **({"ort_clean_check": clean_check} if clean_check is not None else {}),
    }


__all__ = ["MEANING", "SmoothingOptions", "certify_smoothing", "clopper_pearson_lower", "l2_equivalent",
           "smoothed_certify"]
