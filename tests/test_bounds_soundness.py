"""Soundness of every bound rule and method: sample ≥10k points of the set, run PGD towards
each bound, and nothing may land outside [lower, upper] (tolerance: tests/bounds_util.TOL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certonnx.bounds import METHODS, BoundedModule, InputSet, margin_matrix
from certonnx.bounds.core import Interval
from certonnx.errors import UnsupportedOpError
from tests.bounds_util import assert_sound


class ConvNet(nn.Module):
    """Conv (stride, padding, dilation, groups), BN, ReLU, overlapping MaxPool, AvgPool,
    residual Add, Concat, Flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.c3 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = h + torch.relu(self.c2(h))  # residual
        p = self.pool(h)  # 11 -> 6
        a = self.avg(p)  # 3
        b = F.relu(self.c3(p))  # 3
        z = torch.cat([a, b], dim=1)
        return self.fc(torch.flatten(z, 1))


class ActNet(nn.Module):
    """Sigmoid, Tanh, LeakyReLU, Clip/Hardtanh, ReLU6, Sub of two perturbed tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 16)
        self.l4 = nn.Linear(16, 16)
        self.l5 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.l1(x) * 2.0)
        h = torch.tanh(self.l2(h))
        h = F.leaky_relu(self.l3(h), 0.1) - 0.5 * h
        h = torch.clamp(self.l4(h), -0.3, 0.4) + nn.functional.relu6(h * 3)
        return self.l5(h)


class ShapeNet(nn.Module):
    """Normalisation by constants, transpose, pad, slice, view, unsqueeze/squeeze, mean,
    negation, MatMul by a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.3, 0.5]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.4]).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(2, 3, 2)
        self.w = nn.Parameter(torch.randn(15, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        h = F.pad(h, (1, 0, 0, 1))
        h = torch.relu(self.conv(h))  # (3, 5, 5)
        h = h.transpose(2, 3)[:, :, 1:, :]  # (3, 4, 5)
        g = h.mean(dim=(2,)).unsqueeze(1).squeeze(1)  # (3, 5)
        flat = g.view(g.shape[0], -1)
        return -(torch.relu(flat) @ self.w) + 1.0


def _init(m: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                  nn.Linear(16, 6)), (1, 4, 5), 0.08, 0.3),
    "conv": (ConvNet, (1, 11, 11), 0.03, 0.3),
    "act": (ActNet, (12,), 0.1, 0.3),
    "shape": (ShapeNet, (2, 5, 5), 0.05, 0.2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_every_method_is_sound(case: str, norm: str) -> None:
    ctor, shape, eps_inf, eps_2 = CASES[case]
    torch.manual_seed(1)
    model = _init(ctor(), 3)
    bm = BoundedModule(model, shape)
    x = torch.rand(2, *shape)
    with torch.no_grad():
        K = model(x).shape[1]
    y = torch.randint(0, K, (2,))
    C = margin_matrix(y, K)
    # L1: twice the L2 radius (the L1 ball of radius 2ε is not inside the L2 ball of radius ε)
    inset = InputSet(x, {"linf": eps_inf, "l2": eps_2, "l1": 2 * eps_2}[norm], norm)
    results = {}
    for method in METHODS:
        lb, ub = bm.compute(inset, C, method, alpha_steps=10)
        assert lb.shape == (2, K - 1) and ub is not None
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
        assert_sound(model, C, inset, lb, ub, n_samples=10_000, label=f"{case}/{norm}/{method}")
        results[method] = (lb, ub)
    # raw-output bounds (no C) too
    lb, ub = bm.compute(inset, None, "crown")
    assert_sound(model, torch.eye(K).expand(2, K, K), inset, lb, ub, n_samples=2000, label=f"{case}/{norm}/raw")
    # α-CROWN keeps the best bound: never looser than CROWN
    assert (results["alpha-crown"][0] >= results["crown"][0] - 1e-6).all()


def test_crown_tighter_than_ibp_on_average() -> None:
    torch.manual_seed(0)
    for ctor, shape, eps, _ in CASES.values():
        model = _init(ctor(), 5)
        bm = BoundedModule(model, shape)
        x = torch.rand(4, *shape)
        inset = InputSet(x, eps, "linf")
        li, ui = bm.compute(inset, None, "ibp")
        lc, uc = bm.compute(inset, None, "crown")
        assert (uc - lc).mean() < (ui - li).mean()


def test_per_sample_eps_and_box() -> None:
    torch.manual_seed(0)
    model = _init(CASES["mlp"][0](), 0)
    bm = BoundedModule(model, (1, 4, 5))
    x = torch.rand(3, 1, 4, 5)
    eps = torch.tensor([0.0, 0.05, 0.2])
    lb, ub = bm.compute(InputSet(x, eps), None, "crown")
    out = model(x)
    assert torch.allclose(lb[0], out[0], atol=1e-4) and torch.allclose(ub[0], out[0], atol=1e-4)
    assert ((ub - lb)[1] < (ub - lb)[2]).all()
    box = InputSet.from_box(x - 0.01, x + 0.02)
    lb, ub = bm.compute(box, None, "crown")
    assert_sound(model, torch.eye(6).expand(3, 6, 6), box, lb, ub, n_samples=2000, label="box")


def test_bounds_are_differentiable() -> None:
    torch.manual_seed(0)
    model = _init(ConvNet(), 0).train()
    bm = BoundedModule(model, (1, 11, 11))
    x = torch.rand(4, 1, 11, 11)
    C = margin_matrix(torch.tensor([0, 1, 2, 3]), 10)
    for method in ("ibp", "crown-ibp"):
        lb, _ = bm.compute(InputSet(x, 0.02), C, method, upper=False)
        model.zero_grad()
        lb.sum().backward()
        assert model.c1.weight.grad is not None and model.c1.weight.grad.abs().sum() > 0


def test_unsupported_op_names_the_op() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x) * x

    with pytest.raises(UnsupportedOpError, match="exp"):
        BoundedModule(Bad(), (3,))

    class Prod(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    with pytest.raises(UnsupportedOpError, match="Mul"):
        BoundedModule(Prod(), (3,))


def test_memory_fallback_warns() -> None:
    torch.manual_seed(0)
    model = _init(ConvNet(), 0)
    bm = BoundedModule(model, (1, 11, 11))
    x = torch.rand(2, 1, 11, 11)
    with pytest.warns(UserWarning, match="falling back"):
        lb, _ = bm.compute(InputSet(x, 0.01), None, "alpha-crown", max_memory=1)
    assert torch.isfinite(lb).all()


class _MatMulBN(nn.Module):
    """``x @ W`` by a constant (ONNX MatMul) followed by BatchNorm1d over its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 7) * 0.4)
        self.bn = nn.BatchNorm1d(7)
        self.fc = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(torch.flatten(x, 1) @ self.w)))


@pytest.mark.parametrize("arch", ["conv-bn", "linear3d-bn", "matmul-bn"])
def test_batchnorm_folding_matches_unfolded_ibp(arch: str) -> None:
    """IBP folds an eval-mode BatchNorm into the Conv/Linear before it (fewer element-wise
    passes). The fold is exact, so bounds must equal the unfolded ones and stay sound; a Linear
    on 3-D input (BatchNorm over a different axis than the Linear's features) must not fold."""
    torch.manual_seed(0)
    if arch == "conv-bn":
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
        shape: tuple[int, ...] = (1, 6, 6)
    elif arch == "matmul-bn":
        model = _MatMulBN()
        shape = (3, 4)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(24, 5))
        shape = (4, 5)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.3, 2.0)
            mod.weight.data.uniform_(-1.5, 1.5)  # negative scales flip |W| signs: the fold must handle them
            mod.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    bm = BoundedModule(model, shape)
    # a batch whose intervals outweigh the layers' weights: folding pays for every pair
    x = torch.rand(64, *shape)
    inset = InputSet(x, 0.05)
    lb, ub = bm.compute(inset, None, "ibp")
    lb, ub = bm.compute(inset, None, "ibp")  # second call: folded (shapes known)
    ctx = bm.ibp_pass(inset)
    folded = [n for n in bm._bn_pairs if not isinstance(ctx.values[n], Interval)]
    assert len(folded) == {"conv-bn": 2, "matmul-bn": 1, "linear3d-bn": 0}[arch]
    if arch == "conv-bn":
        # one sample: the 64 x 8 Linear's weights outweigh its 8 outputs, so its BatchNorm is
        # not folded (the conv's still is); the bounds are the same
        one = InputSet(x[:1], 0.05)
        ctx1 = bm.ibp_pass(one)
        assert len([n for n in bm._bn_pairs if not isinstance(ctx1.values[n], Interval)]) == 1
        l1, u1 = bm.compute(one, None, "ibp")
        assert torch.allclose(l1, lb[:1], atol=1e-5) and torch.allclose(u1, ub[:1], atol=1e-5)
    ref = BoundedModule(model, shape)
    ref._bn_pairs = {}
    lr, ur = ref.compute(inset, None, "ibp")
    assert torch.allclose(lb, lr, atol=1e-5) and torch.allclose(ub, ur, atol=1e-5)
    K = 5
    assert_sound(model, torch.eye(K).expand(64, K, K), inset, lb, ub, n_samples=5000, label=f"bn-fold/{arch}")
    # a weight update must invalidate the cached folded weights
    with torch.no_grad():
        (model.w if arch == "matmul-bn" else model[0].weight).mul_(0.5)
    lb2, _ = bm.compute(inset, None, "ibp")
    lr2, _ = ref.compute(inset, None, "ibp")
    assert torch.allclose(lb2, lr2, atol=1e-5)


def test_l1_ball_of_a_linear_map_is_exact() -> None:
    """Over an L1 ball a linear form takes its minimum at a vertex: ``w·x − ε·max|w|``. Every
    method reaches it (the dual norm at the input), up to the rounding allowance; without it
    (the enclosing box) the bound would be ``w·x − ε·‖w‖₁``, far looser."""
    torch.manual_seed(0)
    lin = nn.Linear(30, 4)
    bm = BoundedModule(lin, (30,))
    x = torch.rand(3, 30)
    inset = InputSet(x, 0.7, "l1", None)
    with torch.no_grad():
        exact_lo = lin(x) - 0.7 * lin.weight.abs().amax(1)
        exact_hi = lin(x) + 0.7 * lin.weight.abs().amax(1)
    for method in METHODS:
        lb, ub = bm.compute(inset, None, method)
        assert ub is not None
        assert torch.all(lb <= exact_lo + 1e-6) and torch.all(ub >= exact_hi - 1e-6), method
        assert torch.allclose(lb, exact_lo, atol=1e-4) and torch.allclose(ub, exact_hi, atol=1e-4), method
