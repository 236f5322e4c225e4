"""certonnx.data: layouts, scaling, and one-line DataErrors for every kind of bad file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from certonnx.cli import main
from certonnx.data import check_against_model, find_data, load_npz
from certonnx.errors import DataError
from certonnx.utils import sha256_arrays


def _save(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_uint8_nhw_to_nchw_and_scaled(tmp_path):
    x = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    y = np.array([0, 1, 2, 1, 0])
    p = _save(tmp_path, x_test=x, y_test=y, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, int))
    xt, yt, info = load_npz(p, "test")
    assert xt.dtype == torch.float32 and xt.shape == (5, 1, 4, 4)
    assert torch.allclose(xt[:, 0], torch.from_numpy(x.astype(np.float32) / 255))
    assert yt.dtype == torch.int64 and yt.tolist() == y.tolist()
    assert "NHW" in info["layout"] and info["n"] == 5
    assert info["sha256"] == sha256_arrays(x, y)
    xt2, _, info2 = load_npz(p, "train")
    assert xt2.shape == (2, 1, 4, 4) and info2["sha256"] != info["sha256"]


def test_first_n_and_plain_keys(tmp_path):
    p = _save(tmp_path, x=np.random.rand(10, 3).astype(np.float32), y=np.arange(10) % 3)
    xt, yt, info = load_npz(p, n=4)
    assert xt.shape == (4, 3) and yt.tolist() == [0, 1, 2, 0] and info["n"] == 4


def test_cifar_like_nhwc(tmp_path):
    x = np.random.randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    p = _save(tmp_path, x_test=x, y_test=np.array([1, 2, 9]))
    xt, _, info = load_npz(p)
    assert xt.shape == (3, 3, 32, 32) and "NHWC" in info["layout"]
    assert torch.allclose(xt[1, 2], torch.from_numpy(x[1, :, :, 2].astype(np.float32) / 255))


def test_nchw_kept(tmp_path):
    x = np.random.rand(2, 3, 8, 8).astype(np.float32)
    p = _save(tmp_path, x_test=x, y_test=np.array([0, 1]))
    xt, _, info = load_npz(p)
    assert xt.shape == (2, 3, 8, 8) and info["layout"] == "NCHW"


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"a": np.zeros(3)}, "x_test/y_test"),
        ({"x_test": np.zeros((3, 2), np.float32), "y_test": np.zeros(4, int)}, "3 samples but"),
        ({"x_test": np.array([[0.5, np.nan]], np.float32), "y_test": np.zeros(1, int)}, "NaN"),
        ({"x_test": np.array([[0.5, np.inf]], np.float32), "y_test": np.zeros(1, int)}, "NaN or infinite"),
        ({"x_test": np.full((2, 2), 200.0, np.float32), "y_test": np.zeros(2, int)}, "divide by 255"),
        ({"x_test": np.full((2, 2), -1.5, np.float32), "y_test": np.zeros(2, int)}, "expected \\[0, 1\\]"),
        ({"x_test": np.zeros((2, 2), np.float32), "y_test": np.array([0, -1])}, "negative"),
        ({"x_test": np.zeros((2, 2), np.float32), "y_test": np.array([0.0, 1.5])}, "non-integer"),
        ({"x_test": np.zeros((2, 2), np.float32), "y_test": np.array(["a", "b"])}, "dtype"),
        ({"x_test": np.array(["a", "b"]), "y_test": np.array([0, 1])}, "dtype"),
        ({"x_test": np.zeros((2, 2), np.float32), "y_test": np.zeros((2, 3))}, "one-hot"),
        ({"x_test": np.zeros((0, 2), np.float32), "y_test": np.zeros(0, int)}, "empty"),
    ],
)
def test_bad_arrays(tmp_path, arrays, match):
    p = _save(tmp_path, **arrays)
    with pytest.raises(DataError, match=match) as ei:
        load_npz(p)
    assert "\n" not in str(ei.value)


def test_missing_keys_lists_available(tmp_path):
    p = _save(tmp_path, images_train=np.zeros(2), foo=np.zeros(2))
    with pytest.raises(DataError, match="foo"):
        load_npz(p)


def test_label_out_of_range_for_model(tmp_path):
    p = _save(tmp_path, x_test=np.zeros((2, 2), np.float32), y_test=np.array([0, 10]))
    with pytest.raises(DataError, match="10 classes"):
        load_npz(p, num_classes=10)
    load_npz(p, num_classes=11)


def test_unnormalized_allowed_on_request(tmp_path):
    p = _save(tmp_path, x_test=np.full((2, 2), -1.0, np.float32), y_test=np.array([0, 1]))
    xt, _, _ = load_npz(p, allow_unnormalized=True)
    assert float(xt.min()) == -1.0


def test_not_npz_and_missing(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(bad)
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "nope.npz")
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match="single .npy"):
        load_npz(npy)
    with pytest.raises(DataError, match="not a file"):
        load_npz(tmp_path)


def test_check_against_model():
    x = torch.rand(3, 1, 28, 28)
    same, note = check_against_model(x, (1, 28, 28))
    assert same is x and note == ""
    flat, note = check_against_model(x, (784,))
    assert flat.shape == (3, 784) and "reshaped" in note
    assert torch.equal(flat[1], x[1].flatten())
    col, _ = check_against_model(x, (784, 1))
    assert col.shape == (3, 784, 1)
    with pytest.raises(DataError, match=r"\[1, 28, 28\].*\[3, 32, 32\]"):
        check_against_model(x, (3, 32, 32))


def test_find_data(monkeypatch, tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"x")
    monkeypatch.setenv("CERTONNX_DATA", str(tmp_path))
    assert find_data("mnist.npz") == tmp_path / "mnist.npz"
    assert find_data("nothing.npz") is None


def test_shared_mnist_if_present():
    p = find_data("mnist.npz")
    if p is None:
        pytest.skip("shared data (mnist.npz) not found: set CERTONNX_DATA or provide ../shared/data")
    x, y, info = load_npz(p, n=100)
    assert x.shape == (100, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert set(y.tolist()) <= set(range(10))


def _one_error_line(err: str) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.lower().startswith("error")]
    assert len(lines) == 1, err


@pytest.mark.parametrize("kind", ["missing", "nan", "labels"])
def test_cli_bad_data(tmp_path, capsys, kind):
    model = "tests/fixtures/mnist_mlp_trained.onnx"
    if kind == "missing":
        data = tmp_path / "missing.npz"
    elif kind == "nan":
        data = _save(tmp_path, x_test=np.full((2, 28, 28), np.nan, np.float32), y_test=np.array([0, 1]))
    else:
        data = _save(tmp_path, x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.array([0, 12]))
    rc = main(["certify", model, "--data", str(data), "--norm", "linf:0.1"])
    assert rc != 0
    _one_error_line(capsys.readouterr().err)
