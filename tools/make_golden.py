"""Golden tightness references of the bound engine: ``tests/fixtures/golden_bounds.json``.

The soundness tests show that every bound contains the outputs; they cannot show that a bound
is as tight as it was (a CROWN that silently degrades to IBP stays sound). This file records,
for small fixed networks that exercise each rule family, the mean width of the output bounds
per method and norm; ``tests/test_golden_tightness.py`` fails when a bound gets looser, and
also when it gets markedly tighter (then check soundness and regenerate).

Weights come from numpy's seeded generator (stable across torch versions); the MNIST nets
are the bundled fixtures. Regenerate after an intended change of the bounds::

    .venv/bin/python tools/make_golden.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from certonnx.bounds import METHODS, BoundedModule, InputSet  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "golden_bounds.json"
EPS = {"linf": 0.02, "l2": 0.3}
ALPHA_STEPS = 10


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    """``module`` with every parameter and buffer drawn from numpy's generator (a BatchNorm's
    running variance kept positive)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            v = rng.standard_normal(t.shape).astype(np.float32) / np.sqrt(max(1, t[0].numel() if t.ndim > 1 else 1))
            if name.endswith("running_var"):
                v = np.abs(v) + 0.5
            t.copy_(torch.from_numpy(v))
    return module.eval()


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.flatten(1)))
        return self.out(torch.relu(h + self.b(h)))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(12, 6), nn.Linear(12, 6), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.out(torch.cat([torch.tanh(self.a(x)), torch.sigmoid(self.b(x))], 1))


def _mlp(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 4))


def _conv(pool: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), pool, nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 4))


#: name -> (builder of the module, sample shape, data: "mnist" or "random")
SYNTHETIC: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp_relu": (lambda: _mlp(nn.ReLU()), (12,)),
    "mlp_leaky": (lambda: _mlp(nn.LeakyReLU(0.1)), (12,)),
    "mlp_sigmoid": (lambda: _mlp(nn.Sigmoid()), (12,)),
    "mlp_tanh": (lambda: _mlp(nn.Tanh()), (12,)),
    "mlp_clip": (lambda: _mlp(nn.Hardtanh(-0.5, 0.5)), (12,)),
    "residual": (_Residual, (12,)),
    "concat": (_Concat, (12,)),
    "conv_avgpool": (lambda: _conv(nn.AvgPool2d(2)), (1, 6, 6)),
    "conv_maxpool": (lambda: _conv(nn.MaxPool2d(2)), (1, 6, 6)),
}
FIXTURE_NETS = {"mnist_mlp": "mnist_mlp_trained.onnx", "mnist_cnn": "mnist_cnn_trained.onnx"}


def cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Every golden case: its module (eval mode) and its 4 input points."""
    out: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    for i, (name, (build, shape)) in enumerate(SYNTHETIC.items()):
        torch.manual_seed(0)  # module construction draws from torch's generator; overwritten below
        x = np.random.default_rng(100 + i).random((4, *shape)).astype(np.float32)
        out[name] = (_seeded(build(), 1 + i), torch.from_numpy(x))
    from certonnx.io.load import load

    data = np.load(ROOT / "tests" / "fixtures" / "mnist_200.npz")
    x = torch.from_numpy(data["x_test"][:4].astype(np.float32) / 255.0)
    for name, file in FIXTURE_NETS.items():
        cm = load(str(ROOT / "tests" / "fixtures" / file), check_parity=False)
        out[name] = (cm.module.eval(), x.reshape(4, *cm.sample_shape))
    return out


def measure(module: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean width ``ub − lb`` of the output bounds, per norm and method."""
    res: dict[str, dict[str, float]] = {}
    bm = BoundedModule(module, tuple(x.shape[1:]))
    for norm, eps in EPS.items():
        inset = InputSet(x, eps, norm, (0.0, 1.0))
        row = {}
        for method in METHODS:
            with torch.no_grad():  # as certify runs it (α-CROWN enables grad for its slopes only)
                lb, ub = bm.compute(inset, None, method, alpha_steps=ALPHA_STEPS)
            assert ub is not None
            row[method] = float((ub - lb).double().mean())
        res[norm] = row
    return res


def compute_all() -> dict[str, dict[str, dict[str, float]]]:
    torch.set_num_threads(1)  # a fixed summation order
    return {name: measure(m, x) for name, (m, x) in cases().items()}


def main() -> None:
    golden = compute_all()
    OUT.write_text(json.dumps({"eps": EPS, "alpha_steps": ALPHA_STEPS, "widths": golden}, indent=1, sort_keys=True)
                   + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(golden)} nets × {len(EPS)} norms × {len(METHODS)} methods")


if __name__ == "__main__":
    main()
