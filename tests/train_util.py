"""Tiny synthetic data and models for the training tests (fast on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn


@pytest.fixture(autouse=False)
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one intra-op thread is much faster, especially on a busy 2-core runner."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def subprocess_env(repo: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


def synthetic_xy(n: int = 96, size: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, size, size) in [0, 1]; the class is where a bright blob sits (left/middle/right)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, size, size, generator=g)
    w = size // classes
    for c in range(classes):
        m = y == c
        x[m, :, :, c * w:(c + 1) * w] += 0.6
    return x.clamp(0, 1), y


def write_npz(path: Path, n: int = 96, n_test: int = 32, size: int = 8) -> Path:
    x, y = synthetic_xy(n, size, seed=0)
    xt, yt = synthetic_xy(n_test, size, seed=1)
    to_u8 = lambda a: (a[:, 0].numpy() * 255).round().astype(np.uint8)  # noqa: E731
    np.savez(path, x_train=to_u8(x), y_train=y.numpy(), x_test=to_u8(xt), y_test=yt.numpy())
    return path


def small_mlp(size: int = 8, classes: int = 3, seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    return fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(size * size, 32), nn.ReLU(),
                                           nn.Linear(32, classes)))


def small_cnn_bn(size: int = 8, classes: int = 3, seed: int = 0) -> fx.GraphModule:
    torch.manual_seed(seed)
    return fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                           nn.Linear(4 * (size // 2) ** 2, 16), nn.ReLU(), nn.Linear(16, classes)))
