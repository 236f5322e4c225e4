"""The Lipschitz certificate is sound: per-op constants never fall below the exact operator
norm, and no PGD attack succeeds inside the certified radius."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule
from certonnx.bounds.lipschitz import lipschitz_radius, node_constants


def _conv_matrix(conv: nn.Conv2d, shape: tuple[int, int, int]) -> torch.Tensor:
    """The convolution (without bias) as a dense matrix on inputs of ``shape``."""
    n = int(torch.tensor(shape).prod())
    eye = torch.eye(n).reshape(n, *shape)
    with torch.no_grad():
        out = nn.functional.conv2d(eye, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).t()


@pytest.mark.parametrize("k,s,p,g", [(3, 1, 1, 1), (3, 2, 1, 1), (4, 2, 0, 1), (3, 1, 0, 2), (1, 1, 0, 1)])
def test_conv_constant_never_below_exact(k: int, s: int, p: int, g: int) -> None:
    torch.manual_seed(k * 10 + s)
    conv = nn.Conv2d(2, 4, k, stride=s, padding=p, groups=g, bias=False)
    model = nn.Sequential(conv)
    bm = BoundedModule(model, (2, 7, 7))
    M = _conv_matrix(conv, (2, 7, 7))
    for norm, exact in (("l2", torch.linalg.matrix_norm(M, 2)), ("linf", M.abs().sum(1).max())):
        L = node_constants(bm, norm)[bm.output_node]
        assert L >= float(exact) - 1e-5, (norm, L, float(exact))
        assert L <= 4 * float(exact) + 1e-5  # and not absurdly loose


def test_dense_constant_is_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    bm = BoundedModule(nn.Sequential(lin), (6,))
    L = node_constants(bm, "l2")[bm.output_node]
    assert abs(L - float(torch.linalg.matrix_norm(lin.weight.detach(), 2))) < 1e-5


class Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = h + torch.relu(self.c2(h))
        return self.fc(torch.flatten(nn.functional.avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_radius_never_attackable(norm: str) -> None:
    torch.manual_seed(0)
    model = Res().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    bm = BoundedModule(model, (1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    y = model(x).argmax(1)
    r = lipschitz_radius(bm, x, y, norm)
    assert (r > 0).all()
    # PGD at the certified radius (ignoring the domain: the certificate does too) never flips
    from certonnx.bounds import InputSet, margin_matrix
    from tests.bounds_util import pgd_extremes

    inset = InputSet(x, r * 0.999, norm, domain=None)
    lo, _ = pgd_extremes(model, margin_matrix(y, 10), inset, steps=20, restarts=2)
    assert (lo > 0).all()
    # and the radius is a lower bound on the radius where an attack succeeds
    inset_big = InputSet(x, r * (50 if norm == "l2" else 2000), norm, domain=None)
    lo_big, _ = pgd_extremes(model, margin_matrix(y, 10), inset_big, steps=20, restarts=2)
    assert (lo_big < 0).any()  # the certificate is not vacuous: large radii do get attacked
