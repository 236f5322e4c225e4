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


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_stays_in_ball_and_domain(norm):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(32, 3, 2, 2)
    y = torch.randint(0, 4, (32,))
    eps = torch.linspace(0.01, 0.5, 32)
    g = torch.Generator().manual_seed(1)
    adv = pgd_attack(net, x, y, eps, norm=norm, steps=10, restarts=3, generator=g)
    d = (adv - x).flatten(1)
    dist = {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]
    assert torch.all(dist <= eps + 1e-6)
    if norm == "l1":  # float32 x + d rounds, but d itself (the projection's output) is inside
        from certonnx.attacks.pgd import project_l1

        q = project_l1(torch.randn(32, 12) * 3, eps)
        assert torch.all(q.abs().sum(1) <= eps)
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_finds_known_counterexample_and_respects_radius(norm):
    f = _linear_model()
    x = torch.full((2, 2), 0.6)  # sum 1.2 -> class 0, margin 0.2
    y = torch.zeros(2, dtype=torch.long)
    # linf: min sum over the ball is 1.2 - 2 eps; l2: 1.2 - sqrt(2) eps; l1: 1.2 - eps (a vertex)
    big, small = {"linf": (0.15, 0.05), "l2": (0.2, 0.1), "l1": (0.3, 0.1)}[norm]
    adv = pgd_attack(f, x, y, torch.tensor([big, small]), norm=norm, steps=30)
    out = f(adv)
    assert out[0].argmax() == 1  # broken
    assert out[1].argmax() == 0  # impossible to break
    # the attack loss is the margin and was minimised to the analytic optimum
    loss = attack_loss(out, y)
    expect = 1.2 - {"linf": 2, "l2": 2 ** 0.5, "l1": 1}[norm] * small - 1
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


def test_project_l1_is_the_euclidean_projection() -> None:
    """Against the closed form on a small case and against scipy-free brute force: the
    projection of v onto the L1 ball is the closest point of the ball (checked by the KKT
    soft threshold: every moved coordinate loses the same θ)."""
    from certonnx.attacks.pgd import project_l1

    d = torch.tensor([[3.0, -1.0, 0.5], [0.1, 0.1, -0.1], [0.0, 0.0, 0.0]])
    p = project_l1(d, torch.tensor([2.0, 1.0, 1.0]))
    # first row: θ = 1 (3-1 = 2, |-1|-1 = 0, 0.5 -> 0): (2, 0, 0)
    assert torch.allclose(p[0], torch.tensor([2.0, 0.0, 0.0]), atol=1e-5)
    assert torch.equal(p[1], d[1]) and torch.equal(p[2], d[2])  # inside: unchanged
    torch.manual_seed(0)
    v = torch.randn(64, 50)
    e = torch.rand(64) * 3
    q = project_l1(v, e)
    assert torch.all(q.abs().sum(1) <= e)
    out = v.abs().sum(1) > e
    # soft threshold: |v| - |q| equals one θ per row on the coordinates that stay non-zero
    diff = (v.abs() - q.abs())[out]
    nz = (q[out] != 0)
    th = torch.where(nz, diff, torch.nan)
    spread = th.nan_to_num(0).amax(1) - torch.where(nz, diff, torch.inf).amin(1)
    assert torch.all(spread < 1e-4)



@pytest.mark.parametrize("norm", ["box", "linf", "l2", "l1"])
def test_ods_starts_stay_in_the_set(norm: str) -> None:
    """Output-diversified starts (``ods_steps``) climb random output directions with steps that
    together can cross the set: every point must still lie in the set."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(16, 20)
    y = torch.randint(0, 3, (16,))
    eps = {"box": 0.0, "linf": 0.1, "l2": 0.5, "l1": 1.0}[norm]
    box = (torch.zeros(16, 20), torch.ones(16, 20)) if norm == "box" else None
    kw = dict(box=box) if box is not None else dict(eps=eps, norm=norm)
    spec = property_tensors([(torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([0.0]))]) if box is not None else None
    adv = pgd_attack(net, x, None if box is not None else y, steps=5, restarts=3, random_init=True, ods_steps=10,
                     spec=spec, generator=torch.Generator().manual_seed(1), **kw)
    d = (adv - x).flatten(1)
    assert ((adv >= 0) & (adv <= 1)).all()
    if norm == "linf":
        assert (d.abs().amax(1) <= eps + 1e-6).all()
    elif norm == "l2":
        assert (d.norm(dim=1) <= eps * (1 + 1e-5)).all()
    elif norm == "l1":
        assert (d.abs().sum(1) <= eps * (1 + 1e-5)).all()


def test_step_decay_zero_stops_after_the_first_step() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    lo, hi = torch.zeros(1, 6), torch.ones(1, 6)
    spec = property_tensors([(torch.tensor([[1.0, -1.0]]), torch.tensor([-10.0]))])
    pts = [pgd_attack(net, (lo + hi) / 2, None, steps=k, spec=spec, box=(lo, hi), step_size=0.3, step_decay=0.0,
                      generator=torch.Generator().manual_seed(2), random_init=True) for k in (1, 2, 6)]
    assert torch.equal(pts[0], pts[1]) and torch.equal(pts[1], pts[2])
    moved = pgd_attack(net, (lo + hi) / 2, None, steps=6, spec=spec, box=(lo, hi), step_size=0.3,
                       generator=torch.Generator().manual_seed(2), random_init=True)
    assert not torch.equal(moved, pts[2])
