"""The S-shaped CROWN lines (Sigmoid, Tanh, Erf) on adversarial intervals: across 0 with the
tangent point found by bisection, saturated ends (f' underflows to 0), nearly empty widths,
one end at 0, very wide. Each line is checked on a dense grid against the function evaluated
in float64, so a line that cuts the curve by more than the documented implementation error
(the float32 kernels' own error, which ``outward`` adds) fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet

ACTS = {"sigmoid": (nn.Sigmoid(), torch.sigmoid), "tanh": (nn.Tanh(), torch.tanh), "erf": (None, torch.erf)}


class _Erf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


def _intervals() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ls, us = [], []
    # random, mostly across 0, widths up to 40
    lo = torch.empty(4000).uniform_(-25, 5, generator=g)
    ls.append(lo)
    us.append(lo + torch.rand(4000, generator=g) * 40)
    # hand-picked: saturated, tiny, touching 0, symmetric, lopsided
    pairs = [(-100.0, 100.0), (-90.0, 1e-3), (-1e-3, 90.0), (-1e-7, 1e-7), (-3e-7, 1e-6), (0.0, 5.0),
             (-5.0, 0.0), (-1e-30, 1e-30), (-0.5, 0.5), (-40.0, 0.3), (-0.3, 40.0), (-6.0, 6.0), (-2.0, 30.0)]
    ls.append(torch.tensor([p[0] for p in pairs]))
    us.append(torch.tensor([p[1] for p in pairs]))
    return torch.cat(ls).view(1, 1, -1), torch.cat(us).view(1, 1, -1)


@pytest.mark.parametrize("name", list(ACTS))
def test_lines_never_cut_the_curve(name: str) -> None:
    act, f64 = ACTS[name]
    net = nn.Sequential(nn.Linear(2, 2), act if act is not None else _Erf())
    bm = BoundedModule(net, (2,))
    bm.compute(InputSet(torch.rand(1, 2), 0.1), method="crown")  # sizes the rounding factors
    rule = next(r for r in bm.rules.values() if type(r).__name__.lower().startswith(name))
    l, u = _intervals()
    lw, lb, uw, ub = rule.relax(l, u, [None])
    assert torch.isfinite(lw).all() and torch.isfinite(lb).all() and torch.isfinite(uw).all() and torch.isfinite(ub).all()
    t = torch.linspace(0, 1, 2001, dtype=torch.float64).view(-1, 1, 1, 1)
    x = l.double() + (u.double() - l.double()) * t
    x = torch.cat([x, l.double().unsqueeze(0), u.double().unsqueeze(0)])  # the endpoints exactly
    y = f64(x)
    below = (lw.double() * x + lb.double()) - y
    above = y - (uw.double() * x + ub.double())
    assert below.max() <= 0, f"{name}: lower line above f by {below.max().item():.3g}"
    assert above.max() <= 0, f"{name}: upper line below f by {above.max().item():.3g}"
