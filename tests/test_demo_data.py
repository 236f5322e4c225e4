"""The bundled demo data (``examples/data/``) is what ``make demo`` and the documentation promise.

The demo and the documented commands run on these files on every machine, so a regenerated or
truncated file would silently change every number they show: the shapes, dtypes, class balance
and the VNN-LIB property are checked here, and, where full MNIST is available, that the file is
exactly what ``tools/make_demo_data.py`` draws from it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from certonnx.certify.vnnlib import parse_vnnlib_file
from certonnx.data import find_data, load_data

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "mnist_demo.npz"
PROP = ROOT / "examples" / "data" / "mnist_demo_0.vnnlib"
#: sizes documented in docs/quickstart.md, tests/fixtures/README.md and tools/make_demo_data.py
SIZES = {"train": 6000, "test": 1000}


def test_file_is_small_and_stored_as_documented() -> None:
    assert DATA.stat().st_size < 2_000_000  # committed with the repository
    with np.load(DATA, allow_pickle=False) as z:
        assert sorted(z.files) == ["x_test", "x_train", "y_test", "y_train"]
        for split, n in SIZES.items():
            x, y = z[f"x_{split}"], z[f"y_{split}"]
            assert x.dtype == np.uint8 and x.shape == (n, 28, 28)
            assert y.dtype == np.int64 and y.shape == (n,)


@pytest.mark.parametrize("split", sorted(SIZES))
def test_loads_with_the_data_loader(split: str) -> None:
    x, y, info = load_data(DATA, split)
    n = SIZES[split]
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9  # uint8 scaled to [0, 1]
    assert info["format"] == "npz"
    # class-balanced, and so is every prefix of 10 samples (--n-train N, --n N read the first N)
    counts = np.bincount(y.numpy(), minlength=10)
    assert counts.tolist() == [n // 10] * 10
    assert np.bincount(y[:200].numpy(), minlength=10).tolist() == [20] * 10


def test_train_and_test_images_are_disjoint() -> None:
    """Train and test images are disjoint: no test image is also a training image."""
    with np.load(DATA) as z:
        train = {r.tobytes() for r in z["x_train"]}
        assert not any(r.tobytes() in train for r in z["x_test"])


def test_vnnlib_property_is_the_ball_around_test_image_0() -> None:
    prop = parse_vnnlib_file(PROP)
    x, y, _ = load_data(DATA, "test", 1)
    assert prop.n_inputs == 28 * 28 and prop.n_outputs == 10
    assert len(prop) == 1
    lo, hi, disjuncts = prop.regions[0]
    v = x.reshape(-1).numpy().astype(np.float64)
    assert np.all(lo <= v + 1e-6) and np.all(v <= hi + 1e-6)
    assert np.all(lo >= 0) and np.all(hi <= 1)
    assert 0 < float(np.max(hi - lo)) <= 2 * 0.01 + 1e-6
    # the counterexample: some other class scores at least as high as the label, one class per
    # disjunct: logits with the label far ahead satisfy none, with another class ahead some
    label = int(y[0])
    assert len(disjuncts) == 9
    ahead = np.zeros(10)
    ahead[label] = 5.0
    assert not any(np.all(a @ ahead <= b) for a, b in disjuncts)
    other = np.zeros(10)
    other[(label + 1) % 10] = 5.0
    assert any(np.all(a @ other <= b) for a, b in disjuncts)


@pytest.mark.skipif(find_data("mnist.npz") is None, reason="full MNIST not found ($CERTONNX_DATA or ../shared/data)")
def test_regenerating_gives_the_same_file() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
