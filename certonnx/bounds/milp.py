"""Exact bounds of small ReLU networks by mixed-integer linear programming (scipy's HiGHS).

This is the ground truth the relaxations are tested against: for a network of Linear and ReLU
layers and a box input set, ``exact_min`` returns ``min c·f(x)`` over the box. Each unstable
ReLU gets one binary variable (big-M with its IBP bounds), so it is only for small networks.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn


def _layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    mods = [m for m in model.modules() if not isinstance(m, (nn.Sequential, nn.Flatten))]
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Linear):
            out.append((m.weight.detach().double().numpy(), m.bias.detach().double().numpy()))
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if nxt is not None and not isinstance(nxt, nn.ReLU):
                raise ValueError("exact_min supports Linear/ReLU alternation only")
        elif not isinstance(m, nn.ReLU):
            raise ValueError(f"exact_min does not support {type(m).__name__}")
    return out


def exact_min(model: nn.Module, lo: np.ndarray, hi: np.ndarray, c: np.ndarray, time_limit: float = 60.0) -> float:
    """Exact ``min c · f(x)`` for ``x`` in the box ``[lo, hi]`` (flattened input)."""
    layers = _layers(model)
    n0 = lo.size
    # variable layout: x, then per hidden layer: z (pre), a (post), d (binary)
    idx = n0
    var_lo, var_hi, integ = list(lo.astype(float)), list(hi.astype(float)), [0] * n0
    rows: list[tuple[dict[int, float], float, float]] = []
    prev = list(range(n0))
    plo, phi = lo.astype(float), hi.astype(float)
    for k, (W, b) in enumerate(layers):
        # interval bounds of z = W a + b
        Wp, Wn = np.clip(W, 0, None), np.clip(W, None, 0)
        zl = Wp @ plo + Wn @ phi + b
        zh = Wp @ phi + Wn @ plo + b
        m = W.shape[0]
        z = list(range(idx, idx + m))
        idx += m
        var_lo += list(zl)
        var_hi += list(zh)
        integ += [0] * m
        for j in range(m):  # z_j - W_j·a = b_j
            coef = {z[j]: 1.0}
            for i, w in zip(prev, W[j]):
                if w != 0.0:
                    coef[i] = coef.get(i, 0.0) - float(w)
            rows.append((coef, float(b[j]), float(b[j])))
        if k == len(layers) - 1:
            out_vars = z
            break
        a = list(range(idx, idx + m))
        idx += m
        var_lo += [max(0.0, v) for v in zl]
        var_hi += [max(0.0, v) for v in zh]
        integ += [0] * m
        d = list(range(idx, idx + m))
        idx += m
        var_lo += [0.0] * m
        var_hi += [1.0] * m
        integ += [1] * m
        for j in range(m):
            l, u = zl[j], zh[j]
            if l >= 0:
                rows.append(({a[j]: 1.0, z[j]: -1.0}, 0.0, 0.0))
            elif u <= 0:
                rows.append(({a[j]: 1.0}, 0.0, 0.0))
            else:
                rows.append(({a[j]: 1.0, z[j]: -1.0}, 0.0, np.inf))  # a >= z
                rows.append(({a[j]: 1.0, z[j]: -1.0, d[j]: -l}, -np.inf, -l))  # a <= z - l(1-d)
                rows.append(({a[j]: 1.0, d[j]: -u}, -np.inf, 0.0))  # a <= u d
        prev = a
        plo, phi = np.maximum(zl, 0), np.maximum(zh, 0)
    nvar = idx
    A = np.zeros((len(rows), nvar))
    rl, rh = np.zeros(len(rows)), np.zeros(len(rows))
    for r, (coef, a_lo, a_hi) in enumerate(rows):
        for i, v in coef.items():
            A[r, i] += v
        rl[r], rh[r] = a_lo, a_hi
    obj = np.zeros(nvar)
    obj[out_vars] = c
    res = milp(obj, constraints=LinearConstraint(A, rl, rh), integrality=np.array(integ),
               bounds=Bounds(np.array(var_lo), np.array(var_hi)), options={"time_limit": time_limit})
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"MILP did not solve to optimality: {res.message}")
    return float(res.fun)


def exact_spec_min(model: nn.Module, x_lo: torch.Tensor, x_hi: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``exact_min`` for every sample and specification row: ``(B, S)``."""
    B, S = C.shape[:2]
    out = torch.empty(B, S, dtype=torch.float64)
    for i in range(B):
        lo, hi = x_lo[i].flatten().double().numpy(), x_hi[i].flatten().double().numpy()
        for s in range(S):
            out[i, s] = exact_min(model, lo, hi, C[i, s].double().numpy())
    return out
