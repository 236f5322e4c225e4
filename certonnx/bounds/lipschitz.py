"""A sound Lipschitz certificate.

The Lipschitz constant of the whole graph is bounded by composing each op's constant from the
registry (``Rule.lipschitz``) along the graph: a chain multiplies, a residual sum adds, a
concatenation takes ``sqrt(La² + Lb²)`` (L2) or ``max`` (L∞). Every per-op constant is a proven
upper bound, never an estimate: exact SVD for dense layers; for convolutions
``||W_mat||_2 · sqrt(prod ceil(k/s))`` (the unfold operator of a convolution repeats each input at
most that many times, so its norm is at most the square root of that), never power iteration,
which under-estimates.

The certificate is margin based. With ``L`` the constant of the map from the input to the last
affine layer's input ``h`` and ``w_j`` the difference of the last layer's rows for classes ``y``
and ``j``, the margin ``m_j(x) = (w_j · h) + (b_y - b_j)`` changes by at most
``||w_j||_* · L · ||δ||`` (``*`` the dual norm of the hidden-space norm), so the prediction cannot
change within radius ``min_j m_j(x) / (||w_j||_* · L)``. For L2 this is at least as tight as the
classic ``margin / (sqrt(2) · L_total)``.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from certonnx.bounds.core import InputSet, Interval
from certonnx.bounds.engine import BoundedModule
from certonnx.bounds.rule import AffineLayer


def node_constants(bm: BoundedModule, norm: str) -> dict[fx.Node, float]:
    """Upper bounds of ``||v(x) - v(x')|| / ||x - x'||`` for every perturbed node ``v``
    (same norm on input and node)."""
    if norm not in ("l2", "linf"):
        from certonnx.errors import CertonnxError

        raise CertonnxError(f"the Lipschitz certificate supports linf and l2, not {norm} (use a bound method, "
                            "e.g. --method crown)")
    shape = bm.sample_shape
    if shape is None:
        raise ValueError("BoundedModule needs sample_shape for the Lipschitz certificate")
    p = next(bm.gm.parameters(), None)
    # a batch of two: every bound pass checks that each node keeps the batch axis, so a model
    # that mixes samples (x[0:1].expand_as(x)) is refused here too, not only by the bound methods
    x = torch.zeros(2, *shape, device=p.device if p is not None else "cpu")
    with torch.no_grad():
        ctx = bm.ibp_pass(InputSet(x, 0.0, "linf", None))
    consts: dict[fx.Node, float] = {bm.input_node: 1.0}
    for node in bm.pert:
        if node is bm.input_node:
            continue
        rule = bm.rules[node]
        ins = [consts[rule.leaves[i]] for i in rule.pert]
        vals = bm._resolve(rule, ctx.values)
        with torch.no_grad():
            lip = rule.compose_lipschitz(vals, norm, ins)
        if lip is None:
            raise ValueError(f"no Lipschitz constant for {rule.describe()}")
        consts[node] = float(lip)
    return consts


def last_affine(bm: BoundedModule) -> fx.Node | None:
    """The output node when it is a dense layer (its rows give per-margin constants)."""
    r = bm.rules.get(bm.output_node)
    return bm.output_node if isinstance(r, AffineLayer) and r.dense else None


def lipschitz_margin_constants(bm: BoundedModule, y: torch.Tensor, num_classes: int, norm: str) -> torch.Tensor:
    """Per sample and class ``j``: a bound on the Lipschitz constant of the margin
    ``f_y - f_j`` w.r.t. the input, shape ``(B, K)`` (entry ``y`` is irrelevant)."""
    consts = node_constants(bm, norm)
    out = bm.output_node
    node = last_affine(bm)
    B = y.shape[0]
    if node is not None:
        rule = bm.rules[node]
        src = rule.leaves[rule.pert[0]]
        L_h = consts[src]
        p = next(bm.gm.parameters(), None)
        assert bm.sample_shape is not None and isinstance(rule, AffineLayer)
        x = torch.zeros(1, *bm.sample_shape, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            ctx = bm.ibp_pass(InputSet(x, 0.0, "linf", None))
            W = rule.dense_matrix(bm._resolve(rule, ctx.values))  # (K, n)
            diff = W[y].unsqueeze(1) - W.unsqueeze(0)  # (B, K, n)
            dual = diff.norm(dim=2) if norm == "l2" else diff.abs().sum(2)
        return dual * L_h
    L = consts[out]
    factor = math.sqrt(2.0) if norm == "l2" else 2.0
    return torch.full((B, num_classes), factor * L)


def lipschitz_radius(bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """Largest radius (in input space) certified by the Lipschitz bound, per sample; 0 where
    the clean prediction is wrong.

    The constants bound the *exact* model ``f``; the certificate is about the float32 model
    ``f̂`` (:mod:`certonnx.bounds.rounding`). So the clean margin is the engine's lower bound at
    the point (valid for both), and the radius ``r`` must satisfy
    ``lb₀ − L·r − err ≥ 0`` with ``err`` bounding ``|m̂ − m|`` over the ball: first
    ``r₀ = lb₀ / L``, then ``err`` over the box of half-width ``r₀`` (which holds the ball of
    any norm with that radius), then ``r = (lb₀ − err) / L ≤ r₀``.
    """
    from certonnx.bounds.core import margin_matrix

    with torch.no_grad():
        logits = bm.gm(x)
        K = logits.shape[1]
        Lm = lipschitz_margin_constants(bm, y, K, norm)
        other = torch.arange(K, device=y.device)[None, :] != y[:, None]
        lb_rows, _ = bm.compute(InputSet(x, 0.0, "linf", None), margin_matrix(y, K), "ibp", upper=False)
        lb0 = torch.full_like(logits, float("inf"))
        lb0[other] = lb_rows.reshape(-1)
        L = Lm.clamp_min(1e-12)
        r0 = torch.where(other, lb0 / L, torch.full_like(lb0, float("inf"))).amin(1).clamp(0.0, 1e3)
        err = bm.error_bound(InputSet(x, r0, "linf", None)).flatten(1)  # (B, K)
        m_err = err.gather(1, y[:, None]) + err
        r = torch.where(other, (lb0 - m_err) / L, torch.full_like(lb0, float("inf")))
        radius = r.amin(1).clamp(min=0.0)
        radius = torch.minimum(radius, r0)
    return torch.where(logits.argmax(1) == y, radius, torch.zeros_like(radius))


__all__ = ["Interval", "lipschitz_margin_constants", "lipschitz_radius", "node_constants"]
