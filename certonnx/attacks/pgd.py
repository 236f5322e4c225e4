"""Projected gradient descent attacks: the cheap upper bound on robust accuracy.

A sample the attack breaks is *falsified* (after an independent re-check in onnxruntime), so
PGD both finds counterexamples and tells the user how far certified accuracy is from the best
possible. The attack is batched over samples and restarts never loop in Python over samples.

Objective ("property form"). A counterexample is an input where, for some disjunct ``d``, all
rows ``A_d y <= b_d`` hold. The attack minimises

    loss(x') = min_d max_rows (A_d f(x') - b_d)

and has succeeded when ``loss <= 0``. Classification robustness is the special case with one
single-row disjunct ``f_j - f_y <= 0`` per wrong class ``j``; with a margin matrix ``C`` (rows
``e_y - e_j``) the loss is simply ``min_s (C f(x'))_s`` (the classification margin).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from certonnx.bounds.core import margin_matrix

Fn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["pgd_attack", "attack_loss", "property_tensors", "project_l1", "l1_step"]


def property_tensors(
    disjuncts: list[tuple[torch.Tensor, torch.Tensor]], batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of disjuncts ``(A (m_d, K), b (m_d,))`` into ``A (D, M, K)``, ``b (D, M)``.

    Padding rows get ``A = 0, b = +1e9`` (never the max row), so the padded tensor has exactly
    the meaning of the list. With ``batch`` the result is expanded to ``(B, D, M, K)``.
    """
    D = len(disjuncts)
    M = max(int(a.shape[0]) for a, _ in disjuncts)
    K = int(disjuncts[0][0].shape[1])
    A = torch.zeros(D, M, K, dtype=torch.float32)
    b = torch.full((D, M), 1e9, dtype=torch.float32)
    for i, (a, bb) in enumerate(disjuncts):
        A[i, : a.shape[0]] = torch.as_tensor(a, dtype=torch.float32)
        b[i, : a.shape[0]] = torch.as_tensor(bb, dtype=torch.float32)
    if batch is not None:
        A = A.unsqueeze(0).expand(batch, *A.shape)
        b = b.unsqueeze(0).expand(batch, *b.shape)
    return A, b


def attack_loss(
    out: torch.Tensor,
    y: torch.Tensor | None = None,
    C: torch.Tensor | None = None,
    spec: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-sample loss ``(B,)``; the attack succeeded where it is ``<= 0`` (``< 0`` for margins
    means strictly misclassified; ties count as success only in the property form, as VNN-LIB
    uses ``>=``)."""
    out = out.flatten(1)
    if spec is not None:
        A, b = spec
        if A.ndim == 3:
            A, b = A.unsqueeze(0), b.unsqueeze(0)
        v = torch.einsum("bdmk,bk->bdm", A.to(out.dtype), out) - b.to(out.dtype)
        return v.amax(2).amin(1)
    if C is None:
        if y is None:
            raise ValueError("pgd needs labels y, a margin matrix C or a property spec")
        C = margin_matrix(y, out.shape[1])
    if C.ndim == 2:
        C = C.unsqueeze(0)
    return torch.einsum("bsk,bk->bs", C.to(out.dtype), out).amin(1)


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.ndim - 1)))


#: fraction of the coordinates an L1 step moves (SLIDE's sparsity, Tramèr & Boneh 2019, uses a
#: high percentile of |gradient|; 99 % there, i.e. the top 1 %)
L1_STEP_FRACTION = 0.01


def project_l1(d: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row of ``d`` (B, ...) onto the L1 ball of radius ``eps``
    (B,), batched (Duchi et al. 2008: sort, cumulative sums, soft threshold). Rows inside stay;
    the result is scaled down by a few ulps where rounding would leave it outside the ball (the
    point ``x + d`` then rounds like any float32 input; counterexamples are re-checked as
    points, in onnxruntime)."""
    B = d.shape[0]
    flat = d.reshape(B, -1)
    a = flat.abs()
    inside = a.sum(1) <= eps
    s, _ = a.sort(1, descending=True)
    cs = s.cumsum(1)
    k = torch.arange(1, flat.shape[1] + 1, device=d.device, dtype=d.dtype)
    rho = ((s - (cs - eps[:, None]) / k) > 0).sum(1).clamp(min=1)
    theta = ((cs.gather(1, (rho - 1)[:, None]).squeeze(1) - eps) / rho.to(d.dtype)).clamp(min=0)
    out = torch.where(inside[:, None], flat, flat.sign() * (a - theta[:, None]).clamp(min=0))
    n1 = out.abs().sum(1)
    out = out * torch.where(n1 > eps, eps / n1.clamp_min(1e-30) * (1 - 2.0 ** -20), torch.ones_like(n1))[:, None]
    return out.reshape(d.shape)


def l1_step(g: torch.Tensor, z: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """SLIDE's descent direction for ``-g`` under L1: ``-sign(g)`` on the largest
    :data:`L1_STEP_FRACTION` of |g| among the coordinates that can still move that way (not at
    the domain's bound), normalised to unit L1 norm per sample."""
    B = g.shape[0]
    gf, zf = g.reshape(B, -1), z.reshape(B, -1)
    score = gf.abs()
    if lo is not None and hi is not None:
        stuck = ((zf <= lo.reshape(B, -1)) & (gf > 0)) | ((zf >= hi.reshape(B, -1)) & (gf < 0))
        score = score.masked_fill(stuck, 0.0)
    k = max(1, int(round(L1_STEP_FRACTION * gf.shape[1])))
    thr = score.topk(k, dim=1).values[:, -1:]
    sel = (score >= thr) & (score > 0)
    dirn = -gf.sign() * sel
    return (dirn / dirn.abs().sum(1, keepdim=True).clamp_min(1.0)).reshape(g.shape)


def pgd_attack(
    fn: Fn,
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float | torch.Tensor = 0.0,
    norm: str = "linf",
    domain: tuple[float, float] | tuple[torch.Tensor, torch.Tensor] | None = (0.0, 1.0),
    steps: int = 20,
    restarts: int = 1,
    step_size: float | None = None,
    C: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    spec: tuple[torch.Tensor, torch.Tensor] | None = None,
    box: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_loss: bool = False,
    random_init: bool = False,
    ods_steps: int = 0,
    step_decay: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Search the set (norm ball of radius ``eps`` around ``x`` ∩ ``domain``, or an explicit
    ``box``) for the input with the lowest attack loss; return it per sample.

    Restarts 1.. start at a uniformly random point of the set (restart 0 starts at ``x``,
    which matters for points that are already misclassified; ``random_init`` makes it random
    too); the per-sample best over all
    restarts and steps is kept. ``eps`` may be a ``(B,)`` tensor. With ``return_loss`` the
    loss of the returned points ``(B,)`` is returned too.

    ``ods_steps`` > 0: every random start first climbs ``w · f(z)`` for a random direction
    ``w ∈ U(−1, 1)^K`` of the outputs (Output Diversified Sampling, Tashiro et al. 2020, the
    initialisation of α,β-CROWN's attack), ``ods_steps`` steps that together can cross the
    set: the starts spread over the output space instead of all descending into the basin
    around the centre. ``step_decay`` multiplies the step size after every step (large steps
    first, then refinement).
    """
    norm = norm.lower()
    if norm in ("inf", "l_inf", "linfty"):
        norm = "linf"
    if norm not in ("linf", "l2", "l1"):
        raise ValueError(f"unknown norm {norm!r}")
    x = x.detach()
    B = x.shape[0]
    dev, dt = x.device, x.dtype
    if box is not None:
        lo = box[0].to(dev, dt).expand_as(x)
        hi = box[1].to(dev, dt).expand_as(x)
        norm = "box"
        radius = (hi - lo) / 2
        center = (hi + lo) / 2
        alpha = (radius * (2.5 / max(steps, 1))) if step_size is None else radius * step_size
    else:
        e = torch.as_tensor(eps, dtype=dt, device=dev)
        e = e.expand(B) if e.ndim == 0 else e
        eb = _view(e, x)
        if domain is not None:
            dlo = torch.as_tensor(domain[0], dtype=dt, device=dev)
            dhi = torch.as_tensor(domain[1], dtype=dt, device=dev)
        if norm == "linf":
            lo, hi = x - eb, x + eb
            if domain is not None:
                lo, hi = torch.maximum(lo, dlo), torch.minimum(hi, dhi)
                lo, hi = torch.minimum(lo, x), torch.maximum(hi, x)
        alpha = eb * (2.5 / max(steps, 1)) if step_size is None else eb * 0 + step_size

    # the box an L1 step must not push a coordinate out of (the domain, widened to hold x)
    l1_box: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    if norm == "l1" and domain is not None:
        l1_box = (torch.minimum(dlo.expand_as(x), x), torch.maximum(dhi.expand_as(x), x))

    def project(z: torch.Tensor) -> torch.Tensor:
        if norm in ("linf", "box"):
            return torch.minimum(torch.maximum(z, lo), hi)
        d = z - x
        if norm == "l1":
            d = project_l1(d, e)
        else:
            n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
            d = d * _view(torch.clamp(e / n, max=1.0), x)
        z = x + d
        if domain is not None:
            # clamping towards the box moves every coordinate towards x (x is in the box), so the
            # point stays in the ball: the result lies in ball ∩ domain
            z = torch.minimum(torch.maximum(z, torch.minimum(dlo, x)), torch.maximum(dhi, x))
        return z

    def rand(*shape: int, normal: bool = False) -> torch.Tensor:
        f = torch.randn if normal else torch.rand
        return f(*shape, generator=generator, dtype=dt).to(dev)

    def rand_start() -> torch.Tensor:
        if norm in ("linf", "box"):
            return lo + rand(*x.shape) * (hi - lo)
        g = rand(*x.shape, normal=True)
        if norm == "l1":
            # Laplace-distributed coordinates, scaled to a random L1 radius: spread over the ball
            g = g.sign() * -torch.log(rand(*x.shape).clamp_min(1e-12))
            g = g / _view(g.flatten(1).abs().sum(1).clamp_min(1e-12), x)
        else:
            g = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), x)
        return project(x + g * _view(e * rand(B), x))

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        return attack_loss(fn(z), y, C, spec)

    def descend(z: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """One projected steepest-descent step of size ``a`` for gradient ``g`` in the set's norm."""
        with torch.no_grad():
            if norm in ("linf", "box"):
                z = z - a * g.sign()
            elif norm == "l1":
                z = z + a * l1_step(g, z, *l1_box)
            else:
                gn = g / _view(g.flatten(1).norm(dim=1).clamp_min(1e-12), x)
                z = z - a * gn
            return project(z)

    def diversify(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = rand(B, fn(z[:1]).flatten(1).shape[1]) * 2 - 1
        a = (radius if norm == "box" else eb) * (2.0 / ods_steps)  # together they can cross the set
        for _ in range(ods_steps):
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(-(fn(z).flatten(1) * w).sum(), z)
            z = descend(z, g, a)
        return z.detach()

    start0 = center if box is not None else x
    best_x = project(start0.clone())
    with torch.no_grad():
        best_l = loss_of(best_x)
    for r in range(max(restarts, 1)):
        if r == 0 and not random_init:
            z = project(start0.clone())
        else:
            z = rand_start()
            if ods_steps > 0:
                z = diversify(z)
        a = alpha
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                lz = loss_of(z)
                (g,) = torch.autograd.grad(lz.sum(), z)
            lz = lz.detach()
            better = lz < best_l
            if bool(better.any()):
                best_l = torch.where(better, lz, best_l)
                best_x = torch.where(_view(better, x), z.detach(), best_x)
            z = descend(z, g, a)
            a = a * step_decay
        with torch.no_grad():
            lz = loss_of(z)
            better = lz < best_l
            best_l = torch.where(better, lz, best_l)
            best_x = torch.where(_view(better, x), z, best_x)
    best_x = best_x.detach()
    if return_loss:
        return best_x, best_l
    return best_x
