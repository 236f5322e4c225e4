"""PGD: stays inside ball ∩ domain, finds known counterexamples, keeps the per-sample best."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.attacks import attack_loss, pgd_attack, property_tensors


def _linear_model():
    # f(x) = [x0 + x1, 1.0]: class 0 while x0 + x1 > 1
    class F(nn.Module):
        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([s, torch.ones_like(s)], 1)

    return F()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_stays_in_ball_and_domain(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(32, 3, 2, 2)
    y = torch.randint(0, 4, (32,))
    eps = torch.linspace(0.01, 0.5, 32)
    g = torch.Generator().manual_seed(1)
    adv = pgd_attack(net, x, y, eps, norm=norm, steps=10, restarts=3, generator=g)
    d = (adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert torch.all(dist <= eps + 1e-6)
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_finds_known_counterexample_and_respects_radius(norm):
    f = _linear_model()
    x = torch.full((2, 2), 0.6)  # sum 1.2 -> class 0, margin 0.2
    y = torch.zeros(2, dtype=torch.long)
    # linf: min sum over the ball is 1.2 - 2 eps; l2: 1.2 - sqrt(2) eps
    big, small = (0.15, 0.05) if norm == "linf" else (0.2, 0.1)
    adv = pgd_attack(f, x, y, torch.tensor([big, small]), norm=norm, steps=30)
    out = f(adv)
    assert out[0].argmax() == 1  # broken
    assert out[1].argmax() == 0  # impossible to break
    # the attack loss is the margin and was minimised to the analytic optimum
    loss = attack_loss(out, y)
    expect = 1.2 - 2 * small - 1 if norm == "linf" else 1.2 - 2 ** 0.5 * small - 1
    assert loss[1].item() == pytest.approx(expect, abs=1e-3)


def test_restarts_keep_best_per_sample():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 3))
    x = torch.rand(64, 5)
    y = net(x).argmax(1)
    g1 = torch.Generator().manual_seed(0)
    _, l1 = pgd_attack(net, x, y, 0.1, steps=5, restarts=1, generator=g1, return_loss=True)
    g2 = torch.Generator().manual_seed(0)
    _, l4 = pgd_attack(net, x, y, 0.1, steps=5, restarts=4, generator=g2, return_loss=True)
    # restart 0 is identical (starts at x), more restarts can only improve each sample
    assert torch.all(l4 <= l1 + 1e-6)
    clean = attack_loss(net(x), y)
    assert torch.all(l1 <= clean + 1e-6)


def test_property_form_and_box():
    f = _linear_model()
    # counterexample: y0 <= 0.5 AND y1 >= 1 (i.e. -y1 <= -1)  or  y0 >= 100 (never)
    dis = [
        (torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([0.5, -1.0])),
        (torch.tensor([[-1.0, 0.0]]), torch.tensor([-100.0])),
    ]
    A, b = property_tensors(dis, batch=1)
    assert A.shape == (1, 2, 2, 2) and b[0, 1, 1] > 1e8  # padding row never binds
    lo, hi = torch.tensor([[0.2, 0.2]]), torch.tensor([[0.9, 0.9]])
    adv, loss = pgd_attack(f, (lo + hi) / 2, None, spec=(A, b), box=(lo, hi), steps=20, return_loss=True)
    assert torch.all(adv >= lo) and torch.all(adv <= hi)
    assert loss.item() <= 0  # sum can reach 0.4 <= 0.5
    out = f(adv)
    assert out[0, 0] <= 0.5 + 1e-6


def test_margin_matrix_matches_default():
    out = torch.tensor([[3.0, 1.0, 2.5], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 2])
    from certonnx.bounds import margin_matrix

    assert torch.allclose(attack_loss(out, y), attack_loss(out, C=margin_matrix(y, 3)))
    assert torch.allclose(attack_loss(out, y), torch.tensor([0.5, -1.0]))
