"""Small ReLU networks: the exact minimum of each margin (scipy MILP) lies inside every
method's bounds, and the methods are ordered as theory says (α-CROWN ≥ CROWN on lower bounds)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from certonnx.bounds import METHODS, BoundedModule, InputSet, margin_matrix
from certonnx.bounds.milp import exact_spec_min


def _net(seed: int, width: int = 20) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)).eval()


def milp_gaps(seeds: range, eps: float = 0.15) -> dict[str, float]:
    """Mean gap (exact min - lower bound) per method over random nets; asserts soundness."""
    gaps: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in seeds:
        net = _net(seed)
        x = torch.rand(2, 6, generator=torch.Generator().manual_seed(seed))
        y = net(x).argmax(1)
        C = margin_matrix(y, 4)
        inset = InputSet(x, eps, "linf")
        exact = exact_spec_min(net, inset.lower, inset.upper, C)
        bm = BoundedModule(net, (6,))
        for m in METHODS:
            lb, _ = bm.compute(inset, C, m, alpha_steps=30)
            assert (lb.double() <= exact + 1e-5).all(), f"{m} lower bound above the exact minimum (seed {seed})"
            gaps[m].append(float((exact - lb.detach().double()).mean()))
    return {m: sum(v) / len(v) for m, v in gaps.items()}


def test_bounds_contain_milp_optimum() -> None:
    gaps = milp_gaps(range(3))
    assert gaps["alpha-crown"] <= gaps["crown"] + 1e-6
    assert gaps["crown"] <= gaps["ibp"]
    out = os.environ.get("CERTONNX_MILP_GAPS")
    if out:
        with open(out, "w") as f:
            json.dump(gaps, f)


@pytest.mark.parametrize("seed", [11, 12])
def test_alpha_never_looser_than_crown(seed: int) -> None:
    net = _net(seed, 16)
    x = torch.rand(3, 6)
    C = margin_matrix(net(x).argmax(1), 4)
    bm = BoundedModule(net, (6,))
    for norm, eps in (("linf", 0.2), ("l2", 0.4)):
        inset = InputSet(x, eps, norm)
        lc, _ = bm.compute(inset, C, "crown")
        la, _ = bm.compute(inset, C, "alpha-crown", alpha_steps=20)
        assert (la >= lc - 1e-6).all()
