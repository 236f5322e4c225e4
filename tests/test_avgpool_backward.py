"""AvgPool's CROWN step for windows that tile the input (``AvgPoolRule.backward`` fast path)
gives the generic vector-Jacobian product's values and rounding terms, on odd sizes that the
floor mode crops, kernels 2 and 3, non-square ones, lower-only and both bounds; pools that do
not tile (overlap, padding, ceil mode) keep the generic step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet, Interval
from certonnx.bounds.rules.common import MonotoneLinearRule
from certonnx.bounds.rules.pool import AvgPoolRule
from tests.bounds_util import assert_sound


def _rule(pool: nn.Module, shape: tuple[int, int, int]) -> tuple[AvgPoolRule, BoundedModule]:
    net = nn.Sequential(nn.Conv2d(shape[0], shape[0], 1), nn.ReLU(), pool, nn.Flatten())
    bm = BoundedModule(net, shape)
    bm.compute(InputSet(torch.rand(2, *shape), 0.1), method="crown")  # sizes the rounding factors
    return next(r for r in bm.rules.values() if isinstance(r, AvgPoolRule)), bm


@pytest.mark.parametrize("pool,shape,tiles", [
    (nn.AvgPool2d(2), (3, 8, 8), True), (nn.AvgPool2d(2), (2, 7, 9), True), (nn.AvgPool2d(3), (2, 10, 8), True),
    (nn.AvgPool2d((2, 3)), (1, 6, 7), True), (nn.AvgPool2d(3, stride=2), (2, 9, 9), False),
    (nn.AvgPool2d(2, padding=1), (2, 6, 6), False), (nn.AvgPool2d(2, ceil_mode=True), (2, 7, 7), False)])
@pytest.mark.parametrize("both", [False, True])
def test_tiling_step_equals_the_generic_vjp(pool: nn.Module, shape: tuple[int, int, int], tiles: bool,
                                            both: bool) -> None:
    rule, _ = _rule(pool, shape)
    assert (rule._tiles() is not None) == tiles
    lo = torch.randn(2, *shape)
    vals = [Interval(lo, lo + torch.rand(2, *shape))]
    out = pool(torch.zeros(1, *shape)).shape[1:]
    g = torch.Generator().manual_seed(1)
    lA = torch.randn(2, 5, *out, generator=g)
    uA = torch.randn(2, 5, *out, generator=g) if both else None
    (fast,), bl, bu = rule.backward(lA, uA, vals)
    (ref,), rbl, rbu = MonotoneLinearRule.backward(rule, lA, uA, vals)
    for a, b in zip(fast, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-7)
    assert torch.allclose(torch.as_tensor(bl), torch.as_tensor(rbl), rtol=1e-6, atol=1e-9)
    if both:
        assert torch.allclose(torch.as_tensor(bu), torch.as_tensor(rbu), rtol=1e-6, atol=1e-9)


def test_conv_avgpool_net_bounds_are_sound() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.rand(3, 1, 9, 9)
    C = torch.eye(3).expand(3, 3, 3)
    inset = InputSet(x, 0.1)
    bm = BoundedModule(net, (1, 9, 9))
    for method in ("ibp", "crown", "alpha-crown"):
        lb, ub = bm.compute(inset, C, method)
        assert_sound(net, C, inset, lb, ub, n_samples=4000, label=f"avgpool/{method}")


@pytest.mark.parametrize("pool,stops", [(nn.AvgPool2d(2), True), (nn.AvgPool2d(3), True),
                                        (nn.AvgPool2d(3, stride=2), False), (nn.AvgPool2d(2, padding=1), False)])
def test_ibp_elision_stops_at_a_tiling_pool(pool: nn.Module, stops: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """IBP's elision stops at a tiling pool: in exact arithmetic the bound is the one of
    pulling through the pool (|a·P| = |a|·P), with its rounding terms it is no looser, and
    it is sound against sampling + PGD; overlapping or padded pools are pulled through."""
    from certonnx.bounds import margin_matrix
    from certonnx.bounds.rounding import exact_arithmetic

    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), pool, nn.Flatten()).eval()
    n_out = net(torch.zeros(1, 1, 15, 15)).shape[1]
    net = nn.Sequential(*net, nn.Linear(n_out, 6)).eval()
    x = torch.rand(3, 1, 15, 15)
    C = margin_matrix(torch.tensor([0, 2, 5]), 6)
    s = InputSet(x, 0.05, norm="linf", domain=(0.0, 1.0))
    bm = BoundedModule(net, (1, 15, 15))
    rule = next(r for r in bm.rules.values() if isinstance(r, AvgPoolRule))
    with torch.no_grad():
        lb, ub = bm.compute(s, C=C, method="ibp")
        assert rule.ibp_stop() is stops  # the shapes are known after the first pass
        with exact_arithmetic():
            lb_x, ub_x = bm.compute(s, C=C, method="ibp")
        monkeypatch.setattr(AvgPoolRule, "ibp_stop", lambda self: False)
        lb_t, ub_t = bm.compute(s, C=C, method="ibp")
        with exact_arithmetic():
            lb_tx, ub_tx = bm.compute(s, C=C, method="ibp")
    assert ub is not None and ub_t is not None and ub_x is not None and ub_tx is not None
    assert torch.allclose(lb_x, lb_tx, atol=1e-5) and torch.allclose(ub_x, ub_tx, atol=1e-5)
    assert bool((lb >= lb_t - 1e-6).all()) and bool((ub <= ub_t + 1e-6).all())
    assert_sound(net, C, s, lb, ub, label=f"ibp through {pool}")


def test_ibp_elision_goes_through_a_pool_fed_by_an_affine_layer() -> None:
    """Conv → AvgPool → Linear: stopping at the pool would drop the pull-back of the composite
    conv·pool·linear map onto the input box (looser, not unsound); the elision goes through it,
    so the bound equals the one with the pool's stop switched off."""
    from certonnx.bounds import margin_matrix

    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(2, 1, 14, 14)
    C = margin_matrix(torch.tensor([1, 3]), 5)
    s = InputSet(x, 0.05, norm="linf", domain=(0.0, 1.0))
    bm = BoundedModule(net, (1, 14, 14))
    with torch.no_grad():
        lb, ub = bm.compute(s, C=C, method="ibp")
        pool = next(n for n, r in bm.rules.items() if isinstance(r, AvgPoolRule))
        assert bm.rules[pool].ibp_stop() and not bm._is_stop_for_ibp(pool)
        ref = BoundedModule(net, (1, 14, 14))
        ref.compute(s, C=C, method="ibp")
        ref_pool = next(r for r in ref.rules.values() if isinstance(r, AvgPoolRule))
        ref_pool.ibp_stop = lambda: False  # type: ignore[method-assign]
        lb_r, ub_r = ref.compute(s, C=C, method="ibp")
    assert torch.equal(lb, lb_r) and ub is not None and ub_r is not None and torch.equal(ub, ub_r)
    assert_sound(net, C, s, lb, ub, label="ibp conv-avgpool-linear")
