"""Shared checks for bound soundness: sampling the input set and PGD towards each bound.

The documented float tolerance is ``TOL = 1e-5`` (relative to the output scale): bounds are
computed in float32, and a sampled value may exceed a bound by rounding alone.
"""

from __future__ import annotations

import torch

from certonnx.bounds import InputSet

TOL = 1e-5


def sample_set(inset: InputSet, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points per sample from the set (corners and interior for L∞; sphere and interior
    for L2; for L1 vertices ``x ± ε·e_i``, where a linear function takes its extremes, and
    Laplace-spread points of the ball), shape ``(B, n, *s)``, all inside the domain."""
    x = inset.x
    B = x.shape[0]
    shape = x.shape[1:]
    lo, hi = inset.lower.unsqueeze(1), inset.upper.unsqueeze(1)
    if inset.norm == "linf":
        u = torch.rand((B, n, *shape), generator=gen)
        corners = torch.rand((B, n // 2, *shape), generator=gen).round()
        u[:, : n // 2] = corners
        return torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)  # the sum may round past hi
    if inset.norm == "l1":
        m = int(torch.tensor(shape).prod())
        lap = torch.randn((B, n, m), generator=gen).sign() * -torch.log(torch.rand((B, n, m), generator=gen))
        lap = lap / lap.abs().sum(2, keepdim=True)
        verts = torch.zeros(B, n // 2, m)
        idx = torch.randint(0, m, (B, n // 2, 1), generator=gen)
        sgn = torch.randint(0, 2, (B, n // 2, 1), generator=gen).float() * 2 - 1
        verts.scatter_(2, idx, sgn)
        lap[:, : n // 2] = verts
        r = torch.rand((B, n, 1), generator=gen)
        r[:, : n // 2] = 1.0
        pts = x.unsqueeze(1) + (lap * r * inset.eps.view(B, 1, 1)).view(B, n, *shape)
        return torch.maximum(torch.minimum(pts, hi), lo)
    d = torch.randn((B, n, *shape), generator=gen)
    d = d / d.flatten(2).norm(dim=2).view(B, n, *([1] * len(shape)))
    r = torch.rand((B, n), generator=gen)
    r[:, : n // 2] = 1.0  # half on the sphere
    eps = inset.eps.view(B, 1)
    pts = x.unsqueeze(1) + d * (r * eps).view(B, n, *([1] * len(shape)))
    return torch.maximum(torch.minimum(pts, hi), lo)


def project(inset: InputSet, xs: torch.Tensor) -> torch.Tensor:
    """Project points ``(B, n, *s)`` onto the set (ball first, then the domain box; for L2 the
    result stays inside the ball because clipping towards x never leaves it)."""
    x = inset.x.unsqueeze(1)
    lo, hi = inset.lower.unsqueeze(1), inset.upper.unsqueeze(1)
    if inset.norm == "l1":
        from certonnx.attacks.pgd import project_l1

        B, n = xs.shape[:2]
        d = project_l1((xs - x).reshape(B * n, *xs.shape[2:]), inset.eps.repeat_interleave(n))
        xs = x + d.reshape(xs.shape)
    elif inset.norm == "l2":
        d = xs - x
        nrm = d.flatten(2).norm(dim=2).clamp_min(1e-12)
        eps = inset.eps.view(-1, 1)
        fac = torch.clamp(eps / nrm, max=1.0)
        xs = x + d * fac.view(*fac.shape, *([1] * (xs.ndim - 2)))
    return torch.maximum(torch.minimum(xs, hi), lo)


def spec_values(fn, C: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``C @ f(x)`` for points ``(B, n, *s)``: ``(B, n, S)``."""
    B, n = xs.shape[:2]
    out = fn(xs.reshape(B * n, *xs.shape[2:])).reshape(B, n, -1)
    return torch.einsum("bsk,bnk->bns", C, out)


def pgd_extremes(fn, C: torch.Tensor, inset: InputSet, steps: int = 30, restarts: int = 4,  # type: ignore[no-untyped-def]
                 gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, row): the smallest and largest spec value PGD finds, each ``(B, S)``."""
    gen = gen or torch.Generator().manual_seed(0)
    B, S = C.shape[:2]
    shape = inset.x.shape[1:]
    best_lo = torch.full((B, S), float("inf"))
    best_hi = torch.full((B, S), float("-inf"))
    eps = inset.eps.view(B, 1, *([1] * len(shape)))
    for sign in (1.0, -1.0):  # minimise, then maximise
        xs = sample_set(inset, S * restarts, gen).reshape(B, S * restarts, *shape)
        step = (eps * 2.5 / steps).clamp_min(1e-4)
        for _ in range(steps):
            xs = xs.detach().requires_grad_(True)
            v = spec_values(fn, C, xs)  # (B, n, S)
            # point j attacks row j % S
            rows = torch.arange(S * restarts) % S
            obj = v.gather(2, rows.view(1, -1, 1).expand(B, -1, 1)).sum() * sign
            (g,) = torch.autograd.grad(obj, xs)
            if inset.norm == "linf":
                xs = xs - step * g.sign()
            elif inset.norm == "l1":
                from certonnx.attacks.pgd import l1_step

                n = xs.shape[1]
                flat = (B * n, *shape)
                xs = xs + step * l1_step(g.reshape(flat), xs.reshape(flat), None, None).reshape(xs.shape)
            else:
                gn = g.flatten(2).norm(dim=2).clamp_min(1e-12).view(B, -1, *([1] * len(shape)))
                xs = xs - step * g / gn
            xs = project(inset, xs)
        with torch.no_grad():
            v = spec_values(fn, C, xs)
            rows = torch.arange(S * restarts) % S
            sel = v.gather(2, rows.view(1, -1, 1).expand(B, -1, 1)).squeeze(2).view(B, restarts, S)
            if sign > 0:
                best_lo = torch.minimum(best_lo, sel.amin(1))
            else:
                best_hi = torch.maximum(best_hi, sel.amax(1))
    return best_lo, best_hi


def assert_sound(fn, C: torch.Tensor, inset: InputSet, lb: torch.Tensor, ub: torch.Tensor | None,  # type: ignore[no-untyped-def]
                 n_samples: int = 10_000, seed: int = 0, label: str = "") -> None:
    """Sample the set and run PGD; nothing may fall outside [lb, ub] (up to TOL)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        xs = sample_set(inset, n_samples, gen)
        v = spec_values(fn, C, xs)
    lo_found, hi_found = v.amin(1), v.amax(1)
    p_lo, p_hi = pgd_extremes(fn, C, inset, gen=gen)
    lo_found, hi_found = torch.minimum(lo_found, p_lo), torch.maximum(hi_found, p_hi)
    scale = 1.0 + v.abs().amax()
    tol = TOL * scale
    viol_lo = (lb - lo_found).max().item()
    assert viol_lo <= tol, f"{label}: a point lies {viol_lo:.3g} below the lower bound"
    if ub is not None:
        viol_hi = (hi_found - ub).max().item()
        assert viol_hi <= tol, f"{label}: a point lies {viol_hi:.3g} above the upper bound"
