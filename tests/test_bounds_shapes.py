"""Hypothesis-driven shapes: batch 1, odd spatial sizes, strides, dilations, grouped convs,
pooling windows. Each drawn network must give sound, finite bounds of the right shape."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from certonnx.bounds import BoundedModule, InputSet
from tests.bounds_util import assert_sound


@st.composite
def conv_nets(draw):  # type: ignore[no-untyped-def]
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dil = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 2))
    h = draw(st.integers(5, 9))
    w = draw(st.integers(5, 9))
    pool = draw(st.sampled_from(["max", "avg", "none"]))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    return cin, cout, k, stride, dil, pad, groups, h, w, pool, batch, seed


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_nets(), st.sampled_from(["linf", "l2"]), st.sampled_from(["ibp", "crown-ibp", "crown"]))
def test_conv_shapes_sound(params, norm, method) -> None:  # type: ignore[no-untyped-def]
    cin, cout, k, stride, dil, pad, groups, h, w, pool, batch, seed = params
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups), nn.ReLU()]
    x = torch.rand(batch, cin, h, w)
    with torch.no_grad():
        hs = nn.Sequential(*layers)(x)
    if pool == "max" and min(hs.shape[2:]) >= 2:
        layers.append(nn.MaxPool2d(2, stride=1, padding=1))
    elif pool == "avg" and min(hs.shape[2:]) >= 2:
        layers.append(nn.AvgPool2d(2))
    layers += [nn.Flatten()]
    body = nn.Sequential(*layers)
    with torch.no_grad():
        n = body(x).shape[1]
    model = nn.Sequential(body, nn.Linear(n, 3)).eval()
    bm = BoundedModule(model, x.shape[1:])
    inset = InputSet(x, 0.05 if norm == "linf" else 0.3, norm)
    lb, ub = bm.compute(inset, None, method)
    assert lb.shape == (batch, 3) and ub is not None
    assert torch.isfinite(lb).all() and (lb <= ub + 1e-6).all()
    assert_sound(model, torch.eye(3).expand(batch, 3, 3), inset, lb, ub, n_samples=1000, label=str(params))
