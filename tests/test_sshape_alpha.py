"""α-CROWN's tangent-point variables for Sigmoid, Tanh and Erf (``_SShapedRule.alpha_relax``).

What must hold: every value of the variables in [0, 1] — the ends included, where a tangent
point sits on the edge of its valid range — gives lines that never cut the curve (checked in
float64 on a dense grid over adversarial intervals); the starting values give CROWN's lines
exactly (so α-CROWN starts from CROWN); and α-CROWN on S-shaped nets is sound under sampling +
PGD, never looser than CROWN, and tighter on average where there is something to optimise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from tests.bounds_util import assert_sound
from tests.test_sshape_relaxation import ACTS, _Erf, _intervals


def _rule(name: str):  # type: ignore[no-untyped-def]
    act = ACTS[name][0]
    net = nn.Sequential(nn.Linear(2, 2), act if act is not None else _Erf())
    bm = BoundedModule(net, (2,))
    bm.compute(InputSet(torch.rand(1, 2), 0.1), method="crown")  # sizes the rounding factors
    return next(r for r in bm.rules.values() if type(r).__name__.lower().startswith(name))


def _cut(lw: torch.Tensor, lb: torch.Tensor, uw: torch.Tensor, ub: torch.Tensor, l: torch.Tensor,
         u: torch.Tensor, name: str) -> tuple[float, float]:
    """How far the lower line rises above f and the upper line falls below it (≤ 0: sound)."""
    t = torch.linspace(0, 1, 1001, dtype=torch.float64).view(-1, 1, 1, 1)
    x = l.double() + (u.double() - l.double()) * t
    x = torch.cat([x, l.double().unsqueeze(0).expand(1, *x.shape[1:]), u.double().unsqueeze(0).expand(1, *x.shape[1:])])
    y = ACTS[name][1](x)
    return float(((lw.double() * x + lb.double()) - y).max()), float((y - (uw.double() * x + ub.double())).max())


@pytest.mark.parametrize("name", list(ACTS))
def test_every_alpha_gives_sound_lines(name: str) -> None:
    rule = _rule(name)
    l, u = _intervals()  # (1, 1, n)
    g = torch.Generator().manual_seed(1)
    n = l.shape[-1]
    # rows: both ends, the middle and random values, independently for the two variables
    cols = [torch.zeros(2, n), torch.ones(2, n), torch.full((2, n), 0.5), torch.tensor([[0.0], [1.0]]).expand(2, n),
            torch.tensor([[1.0], [0.0]]).expand(2, n), torch.rand(2, n, generator=g), torch.rand(2, n, generator=g)]
    alpha = torch.stack(cols).unsqueeze(0)  # (1, S, 2, n)
    _, (lw, lb, uw, ub) = rule.alpha_relax(l, u, [None], alpha)
    assert lw.shape == (1, len(cols), n)
    for t in (lw, lb, uw, ub):
        assert torch.isfinite(t).all()
    below, above = _cut(lw, lb, uw, ub, l, u, name)
    assert below <= 0, f"{name}: an alpha's lower line is above f by {below:.3g}"
    assert above <= 0, f"{name}: an alpha's upper line is below f by {above:.3g}"


@pytest.mark.parametrize("name", list(ACTS))
def test_initial_alpha_reproduces_crown(name: str) -> None:
    rule = _rule(name)
    l, u = _intervals()
    a0 = rule.alpha_init(l[:, 0], u[:, 0]).unsqueeze(1)  # (1, 1, 2, n)
    lines, alpha_lines = rule.alpha_relax(l, u, [None], a0)
    for crown, alpha in zip(lines, alpha_lines, strict=True):
        assert torch.allclose(alpha, crown.expand_as(alpha), rtol=1e-4, atol=1e-6), (crown - alpha).abs().max()
    # and the free ranges are not empty: there is something to optimise on most crossing intervals
    free = rule._lines(l, u)[1]
    cross = (l < 0) & (u > 0)
    assert (free.lower_free & cross).float().sum() > 0.5 * cross.float().sum()


def _net(act: type[nn.Module], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    n = 6
    for _ in range(4):
        lin = nn.Linear(n, 32)
        lin.weight.data *= 3  # out of the near-linear regime, so the relaxation matters
        layers += [lin, act()]
        n = 32
    layers.append(nn.Linear(n, 4))
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("act,norm,eps", [(nn.Tanh, "linf", 0.05), (nn.Tanh, "l2", 0.1), (nn.Sigmoid, "linf", 0.15),
                                          (nn.Sigmoid, "l1", 0.3)])
def test_alpha_crown_on_s_shaped_nets_is_sound_and_tighter(act: type[nn.Module], norm: str, eps: float) -> None:
    net = _net(act, 0)
    x = torch.rand(6, 6)
    C = margin_matrix(net(x).argmax(1), 4)
    bm = BoundedModule(net, (6,))
    inset = InputSet(x, eps, norm)
    assert len(bm._alpha_nodes()) == 4
    with torch.no_grad():
        lc, uc = bm.compute(inset, C, "crown")
        la, ua = bm.compute(inset, C, "alpha-crown", alpha_steps=20)
    assert (la >= lc - 1e-6).all() and (ua <= uc + 1e-6).all()
    gain = float((la - lc).mean())
    assert gain > 1e-3 * float((uc - lc).mean()), gain
    assert_sound(net, C, inset, la, ua, n_samples=8000, label=f"alpha/{act.__name__}/{norm}")
