"""α-CROWN with the slopes of every bound pass optimised (``BoundedModule._alpha_crown``).

What must hold: every bound is sound (sampling + PGD, and the exact MILP minimum); it is never
looser than CROWN; optimising the intermediate passes' slopes beats optimising the final pass
alone on a net deep enough for intermediate bounds to matter; processing the batch in chunks
(to fit ``alpha_memory``) does not change the result; the cheap ReLU lower line equals the
general one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from certonnx.bounds.milp import exact_spec_min
from certonnx.bounds.rules.activation import ActivationRule
from tests.bounds_util import assert_sound


def _mlp(seed: int, width: int = 24, depth: int = 4, n_in: int = 6, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    n = n_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), act()]
        n = width
    layers.append(nn.Linear(n, 4))
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("norm,eps", [("linf", 0.6), ("l2", 1.0), ("l1", 2.0)])
def test_full_alpha_sound_and_tighter_than_final_only(norm: str, eps: float) -> None:
    net = _mlp(0)
    x = torch.rand(4, 6)
    C = margin_matrix(net(x).argmax(1), 4)
    bm = BoundedModule(net, (6,))
    inset = InputSet(x, eps, norm)
    with torch.no_grad():
        lc, _ = bm.compute(inset, C, "crown", upper=False)
        lf, _ = bm.compute(inset, C, "alpha-crown", upper=False, alpha_intermediate=False)
        la, ua = bm.compute(inset, C, "alpha-crown", alpha_steps=20)
    assert (la >= lc - 1e-6).all()
    # the intermediate slopes are worth something on a 4-layer net: a clear gain on average
    assert (la - lc).mean() > 1.5 * (lf - lc).mean() + 1e-4, (float((la - lc).mean()), float((lf - lc).mean()))
    assert_sound(net, C, inset, la, ua, n_samples=8000, label=f"alpha/{norm}")


@pytest.mark.parametrize("seed", [3, 4])
def test_full_alpha_below_milp_optimum(seed: int) -> None:
    net = _mlp(seed, width=10, depth=3)
    x = torch.rand(3, 6)
    C = margin_matrix(net(x).argmax(1), 4)
    inset = InputSet(x, 0.2, "linf")
    exact = exact_spec_min(net, inset.lower, inset.upper, C)
    la, _ = BoundedModule(net, (6,)).compute(inset, C, "alpha-crown", alpha_steps=30, upper=False)
    assert (la.double() <= exact + 1e-5).all()


def test_batch_chunking_does_not_change_the_bound() -> None:
    net = _mlp(1)
    x = torch.rand(5, 6)
    C = margin_matrix(net(x).argmax(1), 4)
    inset = InputSet(x, 0.15)
    with torch.no_grad():
        whole, _ = BoundedModule(net, (6,)).compute(inset, C, "alpha-crown", upper=False, alpha_steps=4)
        bm = BoundedModule(net, (6,))
        calls: list[int] = []
        orig = bm._alpha_crown

        def spy(ctx, *a, **k):  # type: ignore[no-untyped-def]
            calls.append(ctx.inset.batch)
            return orig(ctx, *a, **k)

        bm._alpha_crown = spy  # type: ignore[method-assign]
        chunked, _ = bm.compute(inset, C, "alpha-crown", upper=False, alpha_steps=4, alpha_memory=1)
    assert calls == [1] * 5
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=1e-5)


def test_conv_net_with_pooling_and_sigmoid_is_sound() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3)).eval()
    x = torch.rand(3, 1, 7, 7)
    inset = InputSet(x, 0.1, "linf")
    C = torch.eye(3).expand(3, 3, 3)
    bm = BoundedModule(net, (1, 7, 7))
    lc, _ = bm.compute(inset, C, "crown")
    la, ua = bm.compute(inset, C, "alpha-crown", alpha_steps=10)
    assert (la >= lc - 1e-6).all()
    assert_sound(net, C, inset, la, ua, n_samples=6000, label="alpha/conv")


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.2)])
def test_cheap_relu_lower_line_equals_the_general_one(act: nn.Module) -> None:
    net = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 3))
    bm = BoundedModule(net, (5,))
    bm.compute(InputSet(torch.rand(2, 5), 0.3), method="crown")  # sizes the rounding factors
    rule = next(r for r in bm.rules.values() if r.alpha_capable)
    assert rule.gamma > 0
    torch.manual_seed(0)
    lo = torch.randn(2, 1, 7)
    hi = lo + torch.rand(2, 1, 7) * 2
    alpha = torch.rand(2, 4, 7)
    lw, lb, _, _ = rule.relax(lo, hi, [None])
    fast = rule.alpha_lower(lo, hi, [None], alpha, lw, lb)
    ref = ActivationRule.alpha_lower(rule, lo, hi, [None], alpha, lw, lb)
    for f, r in zip(fast, ref):
        assert torch.allclose(f, r.expand_as(f), rtol=1e-6, atol=1e-12)


def test_per_sample_rows_give_the_bound_of_the_batch_union(monkeypatch: pytest.MonkeyPatch) -> None:
    """α-CROWN re-optimises only each sample's own unstable neurons (``_alpha_rows``: padded
    ``(B, K)`` rows); the neurons CROWN made stable in a sample but not in another cannot change
    that sample's bound, so it equals the bound with the batch's union of rows."""
    import certonnx.bounds.engine as E

    net = _mlp(5, width=32, depth=3)
    # samples far apart: each leaves a different set of neurons unstable
    torch.manual_seed(0)
    x = torch.rand(8, 6) * 2
    C = margin_matrix(net(x).argmax(1), 4)
    inset = InputSet(x, 0.1)
    seen: list[int] = []
    orig = E.BoundedModule._alpha_rows

    def spy(self, node, idx, ref):  # type: ignore[no-untyped-def]
        out = orig(self, node, idx, ref)
        seen.append(out.ndim)
        return out

    with torch.no_grad():
        monkeypatch.setattr(E.BoundedModule, "_alpha_rows", spy)
        per_sample, _ = BoundedModule(net, (6,)).compute(inset, C, "alpha-crown", alpha_steps=8, upper=False)
        assert 2 in seen, "the case must exercise per-sample rows"
        monkeypatch.setattr(E, "PER_SAMPLE_ROWS", 0.0)  # never per sample: the union, as before
        seen.clear()
        union, _ = BoundedModule(net, (6,)).compute(inset, C, "alpha-crown", alpha_steps=8, upper=False)
        assert 2 not in seen
    assert torch.allclose(per_sample, union, atol=1e-5, rtol=1e-5), (per_sample - union).abs().max()
    la, ua = BoundedModule(net, (6,)).compute(inset, C, "alpha-crown", alpha_steps=8)
    assert_sound(net, C, inset, la, ua, n_samples=6000, label="alpha/per-sample")


def _pool_net(seed: int, shift: float = 0.0) -> nn.Sequential:
    """Conv → (shifted) ReLU → tiling 2×2 MaxPool → Linear: α-CROWN frees the pool's lower
    lines (convex combinations of each window). ``shift`` < 0 moves the pooled values below 0,
    where a weight sum off 1 would overclaim."""
    torch.manual_seed(seed)

    class Shift(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + shift

    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), Shift(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4)).eval()


@pytest.mark.parametrize("norm,eps,shift", [("linf", 0.4, 0.0), ("linf", 0.4, -5.0), ("l2", 0.6, -5.0)])
def test_maxpool_alpha_sound_and_never_looser(norm: str, eps: float, shift: float) -> None:
    net = _pool_net(1, shift)
    x = torch.rand(3, 1, 8, 8)
    C = margin_matrix(net(x).argmax(1), 4)
    bm = BoundedModule(net, (1, 8, 8))
    from certonnx.bounds.rules.pool import MaxPoolRule

    assert any(isinstance(r, MaxPoolRule) and r.has_alpha() for r in bm.rules.values())
    inset = InputSet(x, eps, norm)
    with torch.no_grad():
        lc, uc = bm.compute(inset, C, "crown")
        la, ua = bm.compute(inset, C, "alpha-crown", alpha_steps=30)
    assert (la >= lc).all() and (ua <= uc).all()
    assert (la > lc + 1e-4).any(), "the pool's free lower lines should pay somewhere"
    assert_sound(net, C, inset, la, ua, n_samples=8000, label=f"maxpool alpha/{norm}/{shift}")


def test_maxpool_alpha_lines_are_convex_combinations() -> None:
    # λ = α / Σα per window; all-zero windows take CROWN's element; the allowance covers the
    # float32 sum's distance from 1 times the window's largest |x|
    from certonnx.bounds.rounding import U32
    from certonnx.bounds.rules.pool import MaxPoolRule

    net = nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
    bm = BoundedModule(net, (1, 4, 4))
    bm.compute(InputSet(torch.rand(1, 1, 4, 4), 0.1), torch.eye(4).unsqueeze(0), "ibp")  # sizes the rounding
    rule = next(r for r in bm.rules.values() if isinstance(r, MaxPoolRule))
    assert rule.gamma >= 2 * U32
    lo = -torch.rand(1, 1, 4, 4) * 3 - 1
    hi = lo + 0.5
    a = torch.rand(1, 2, 1, 4, 4)
    a[:, 1, :, :2, :2] = 0.0  # one window with every variable at 0
    sel = torch.zeros_like(rule._windows(lo)).scatter_(2, rule._windows(lo).argmax(2, keepdim=True), 1.0)
    lam, slack = rule._alpha_lines(a, sel, rule._windows(lo), rule._windows(hi))
    assert (lam >= 0).all()
    assert torch.allclose(lam.sum(3), torch.ones(1, 2, 1, 4), atol=1e-6)
    assert torch.equal(lam[0, 1, 0, :, 0], sel[0, 0, :, 0])
    assert (slack > 0).all() and (slack < 1e-4).all()
    # back and forth between windows and the input layout
    assert torch.equal(rule._from_windows(rule._to_windows(a), (4, 4)), a)


def test_maxpool_alpha_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same α-CROWN with the pool's lines frozen at CROWN's element is clearly looser
    from certonnx.bounds.rules.pool import MaxPoolRule

    net = _pool_net(1)
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    C = margin_matrix(net(x).argmax(1), 4)
    inset = InputSet(x, 0.4, "linf")
    with torch.no_grad():
        free, _ = BoundedModule(net, (1, 8, 8)).compute(inset, C, "alpha-crown", alpha_steps=30, upper=False)
        monkeypatch.setattr(MaxPoolRule, "has_alpha", lambda self: False)
        frozen, _ = BoundedModule(net, (1, 8, 8)).compute(inset, C, "alpha-crown", alpha_steps=30, upper=False)
    assert (free.mean() - frozen.mean()) > 0.05, (float(free.mean()), float(frozen.mean()))


def test_maxpool_alpha_projection_onto_the_simplex() -> None:
    # each window's variables become the nearest point of the simplex (checked against the
    # closed form for a window whose mass is spread: v − θ with θ = (Σv − 1)/k)
    from certonnx.bounds.rules.pool import MaxPoolRule

    bm = BoundedModule(nn.Sequential(nn.MaxPool2d(2)), (1, 4, 4))
    rule = next(r for r in bm.rules.values() if isinstance(r, MaxPoolRule))
    torch.manual_seed(0)
    a = torch.rand(2, 3, 1, 4, 4)
    a[0, 0, 0, :2, :2] = torch.tensor([[0.6, 0.5], [0.55, 0.45]])
    rule.alpha_project(a)
    w = rule._to_windows(a)
    assert (w >= 0).all() and torch.allclose(w.sum(3), torch.ones_like(w.sum(3)), atol=1e-6)
    assert torch.allclose(w[0, 0, 0, :, 0], torch.tensor([0.6, 0.5, 0.55, 0.45]) - 0.275, atol=1e-6)
    before = a.clone()
    rule.alpha_project(a)
    assert torch.allclose(a, before, atol=1e-6)  # a projection: points of the simplex stay
