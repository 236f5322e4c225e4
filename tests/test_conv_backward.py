"""The CPU fast paths of the convolution's CROWN step (``conv_input_grad``: matmul + fold for
few taps, channels-last transposed convolution otherwise) compute the same pull-back as
autograd's convolution backward, on the shapes where the two are easiest to get wrong:
strides that leave trailing input rows uncovered, asymmetric padding and kernels, dilation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import grad as nn_grad

from certonnx.bounds.rules.linear import FOLD_TAPS, conv_input_grad

CASES = [
    # (C_in, C_out, H, W, kernel, stride, padding, dilation)
    (1, 8, 28, 28, (5, 5), (2, 2), (2, 2), (1, 1)),
    (3, 4, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 3, 13, 11, (4, 3), (3, 2), (0, 1), (1, 1)),  # trailing rows and columns no window covers
    (2, 5, 12, 15, (3, 2), (2, 3), (1, 0), (2, 1)),  # dilation
    (8, 16, 14, 14, (4, 4), (2, 2), (1, 1), (1, 1)),  # more taps than FOLD_TAPS: channels-last path
    (6, 7, 9, 10, (3, 5), (2, 1), (2, 1), (1, 2)),
]


@pytest.mark.parametrize("cin,cout,h,w,k,s,p,d", CASES)
def test_matches_autograd_backward(cin: int, cout: int, h: int, w: int, k: tuple, s: tuple, p: tuple,
                                   d: tuple) -> None:
    g = torch.Generator().manual_seed(cin * 100 + cout)
    weight = torch.randn(cout, cin, *k, generator=g, dtype=torch.float64)
    x = torch.zeros(1, cin, h, w, dtype=torch.float64)
    out = torch.nn.functional.conv2d(x, weight, None, s, p, d)
    A = torch.randn(37, *out.shape[1:], generator=g, dtype=torch.float64)
    want = nn_grad.conv2d_input((37, cin, h, w), weight, A, s, p, d, 1)
    got = conv_input_grad((cin, h, w), weight, A, s, p, d, 1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_cases_cover_both_paths() -> None:
    taps = [c[0] * c[4][0] * c[4][1] for c in CASES]
    assert min(taps) <= FOLD_TAPS < max(taps)


def test_gradient_flows_through_fast_path() -> None:
    """α-CROWN differentiates through the pull-back: the fold path must carry gradients."""
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    A = torch.randn(5, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    conv_input_grad((1, 8, 8), weight, A, (1, 1), (0, 0), (1, 1), 1).sum().backward()
    B = A.detach().clone().requires_grad_(True)
    nn_grad.conv2d_input((5, 1, 8, 8), weight, B, (1, 1), (0, 0), (1, 1), 1).sum().backward()
    assert A.grad is not None and B.grad is not None
    assert torch.allclose(A.grad, B.grad)


@pytest.mark.parametrize("size", [28, 27])
def test_maxpool_tiling_path_matches_fold(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """MaxPool's CROWN step for tiling windows (a transpose) gives the bounds of the general
    fold, also where the last row and column lie outside every window (27 = 2·13 + 1)."""
    from torch import nn

    from certonnx.bounds import BoundedModule, InputSet, margin_matrix
    from certonnx.bounds.rules.pool import MaxPoolRule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(6 * (size // 2) ** 2, 10)).eval()
    x = torch.rand(3, 1, size, size)
    C = margin_matrix(torch.tensor([1, 4, 7]), 10)
    s = InputSet(x, 0.03, norm="linf", domain=(0.0, 1.0))
    with torch.no_grad():
        fast, fast_u = BoundedModule(net, (1, size, size)).compute(s, C=C, method="crown")
        monkeypatch.setattr(MaxPoolRule, "_tiles", lambda self: False)
        slow, slow_u = BoundedModule(net, (1, size, size)).compute(s, C=C, method="crown")
    assert fast_u is not None and slow_u is not None
    assert torch.allclose(fast, slow, rtol=0, atol=1e-5) and torch.allclose(fast_u, slow_u, rtol=0, atol=1e-5)
