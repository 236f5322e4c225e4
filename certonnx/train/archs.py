"""Architectures for training from scratch (``--arch``), sized like CTBench's models.

* ``mlp``: flatten, 256-256, ReLU (generic);
* ``cnn3``: CTBench-style small CNN: conv 8 (5x5, s2) - conv 16 (4x4, s2) - linear 128 - K;
* ``cnn7``: CTBench's CNN7: conv 64-64-128(s2)-128-128, linear 512-K, BatchNorm after every
  conv/linear, ReLU.

Models are traced to torch.fx and wrapped in a :class:`CertModel`, exactly like an imported
ONNX model, so training, certification and export take one path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx, nn

from certonnx.errors import CertonnxError
from certonnx.graph.model import CertModel

ARCHS = ("mlp", "cnn3", "cnn7")


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def build(arch: str, sample_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The ``nn.Module`` for ``arch`` on inputs of ``sample_shape`` (C, H, W) or (D,)."""
    shape = tuple(int(d) for d in sample_shape)
    n_in = math.prod(shape)
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, num_classes))
    if len(shape) != 3:
        raise CertonnxError(f"--arch {arch} needs image inputs (C, H, W); the data has samples of shape {list(shape)}")
    c, h, w = shape
    if arch == "cnn3":
        h1, w1 = _conv_out(h, 5, 2, 2), _conv_out(w, 5, 2, 2)
        h2, w2 = _conv_out(h1, 4, 2, 1), _conv_out(w1, 4, 2, 1)
        return nn.Sequential(
            nn.Conv2d(c, 8, 5, 2, 2), nn.ReLU(), nn.Conv2d(8, 16, 4, 2, 1), nn.ReLU(), nn.Flatten(),
            nn.Linear(16 * h2 * w2, 128), nn.ReLU(), nn.Linear(128, num_classes))
    if arch == "cnn7":
        layers: list[nn.Module] = []
        cin, hh, ww = c, h, w
        for cout, s in ((64, 1), (64, 1), (128, 2), (128, 1), (128, 1)):
            layers += [nn.Conv2d(cin, cout, 3, s, 1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin, hh, ww = cout, _conv_out(hh, 3, s, 1), _conv_out(ww, 3, s, 1)
        layers += [nn.Flatten(), nn.Linear(cin * hh * ww, 512), nn.BatchNorm1d(512), nn.ReLU(),
                   nn.Linear(512, num_classes)]
        return nn.Sequential(*layers)
    raise CertonnxError(f"unknown --arch {arch!r} (expected one of {', '.join(ARCHS)})")


def ibp_init(module: nn.Module) -> None:
    """Shi et al. (2021) IBP initialisation: weights ~ N(0, (sqrt(2π)/fan_in)²), biases 0.

    Keeps the expected width of IBP intervals constant from layer to layer at initialisation
    (instead of growing with the fan-in), so the ramp does not start with exploding bounds.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
                if m.bias is not None:
                    m.bias.zero_()


def build_model(arch: str, sample_shape: Sequence[int], num_classes: int, *, init: str = "ibp",
                seed: int = 0, domain: tuple[float, float] = (0.0, 1.0)) -> CertModel:
    """A from-scratch model as a :class:`CertModel` (fx-traced), ready for training and export."""
    torch.manual_seed(seed)
    m = build(arch, sample_shape, num_classes)
    if init == "ibp":
        ibp_init(m)
    gm = fx.symbolic_trace(m)
    return CertModel(module=gm, input_name="input", output_name="logits",
                     input_shape=(None, *[int(d) for d in sample_shape]), output_shape=(None, num_classes),
                     producer=f"certonnx finetune --arch {arch}", domain=domain,
                     onnx_ops={}, metadata={})
