"""``--data`` in the forms people have: two .npy files, a folder of .npy files, an image folder
(torchvision ImageFolder layout), MNIST idx files and CIFAR python batches. Each gives what
``load_npz`` gives for the same arrays; each bad input is one DataError line."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from certonnx.cli import main
from certonnx.data import check_against_model, data_inputs, load_data, load_npz
from certonnx.errors import DataError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from tests.paths import FIXTURES  # noqa: E402

FIX = FIXTURES
MLP = FIX / "mnist_mlp_trained.onnx"
DATA = FIX / "mnist_200.npz"


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _raises(match: str, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match=match) as ei:
        load_data(*args, **kw)
    assert "\n" not in str(ei.value)
    return str(ei.value)


# -- .npy -------------------------------------------------------------------------------------------

def test_npy_pair_is_the_npz_equivalent(tmp_path: Path) -> None:
    x = _rng().integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y = np.arange(6) % 3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    pair = f"{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}"
    xa, ya, info = load_data(pair, "test", 4)
    xb, yb, ref = load_npz(tmp_path / "d.npz", "test", 4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 3, 8, 8)
    assert info["format"] == "npy pair"
    for k in ("sha256", "layout", "sample_shape", "stored_shape", "stored_layout", "canonical", "scale", "n"):
        assert info[k] == ref[k], k
    # the same arrays for every split (like x/y in an .npz)
    assert torch.equal(load_data(pair, "train")[0], load_npz(tmp_path / "d.npz", "train")[0])
    assert data_inputs(pair) == {"--data (images)": str(tmp_path / "x.npy"), "--data (labels)": str(tmp_path / "y.npy")}


def test_npy_folder_uses_split_names(tmp_path: Path) -> None:
    rng = _rng()
    arrays = {"x_train": rng.random((5, 4)).astype(np.float32), "y_train": np.arange(5) % 2,
              "x_test": rng.random((3, 4)).astype(np.float32), "y_test": np.array([1, 0, 1])}
    for k, a in arrays.items():
        np.save(tmp_path / f"{k}.npy", a)
    np.savez(tmp_path / "d.npz", **arrays)
    for split in ("train", "test"):
        xa, ya, info = load_data(tmp_path, split)
        xb, yb, ref = load_npz(tmp_path / "d.npz", split)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and info["sha256"] == ref["sha256"]
    assert info["format"] == "npy folder"
    msg = _raises("no arrays for split 'val'", tmp_path, "val")
    assert "x_val.npy/y_val.npy" in msg and "x_test.npy" in msg


@pytest.mark.parametrize("case, match", [
    ("three", "exactly two .npy"),
    ("not_npy", "exactly two .npy"),
    ("missing", "not found"),
    ("single", "single .npy array"),
    ("truncated", "not a readable .npy"),
    ("objects", "not a readable .npy"),
    ("mismatch", "5 samples but"),
    ("scalar", "single value"),
])
def test_npy_bad_input(tmp_path: Path, case: str, match: str) -> None:
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, np.zeros((5, 4), np.float32))
    np.save(y, np.zeros(5, int))
    spec = f"{x},{y}"
    if case == "three":
        spec = f"{x},{y},{y}"
    elif case == "not_npy":
        spec = f"{x},{tmp_path / 'y.txt'}"
    elif case == "missing":
        spec = f"{x},{tmp_path / 'nope.npy'}"
    elif case == "single":
        spec = str(x)
    elif case == "truncated":
        x.write_bytes(x.read_bytes()[:-20])
    elif case == "objects":
        np.save(x, np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    elif case == "mismatch":
        np.save(y, np.zeros(4, int))
    elif case == "scalar":
        np.save(y, np.int64(3))
    _raises(match, spec)


# -- image folders ------------------------------------------------------------------------------------

def _png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _image_folder(root: Path, classes: dict[str, int], rgb: bool = True, size: int = 8, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for c, k in classes.items():
        for i in range(k):
            a = rng.integers(0, 256, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
            _png(root / c / f"img{i}.png", a)
            out.append((c, a))
    return out


def test_image_folder_rgb(tmp_path: Path) -> None:
    made = _image_folder(tmp_path / "imgs", {"dog": 2, "cat": 3})
    x, y, info = load_data(tmp_path / "imgs", "test")
    # classes numbered in sorted name order (cat 0, dog 1), files in sorted order within a class
    assert info["classes"] == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1]
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    cats = [a for c, a in made if c == "cat"]
    assert torch.allclose(x[0], torch.from_numpy(cats[0].astype(np.float32) / 255).permute(2, 0, 1))
    assert info["format"] == "image folder" and info["scale"] == "uint8 / 255"
    assert info["stored_shape"] == [8, 8, 3] and info["canonical"] == "nhwc"
    # the info drives the layout code like that of an NHWC .npz
    fitted, note = check_against_model(x, (8, 8, 3), info)
    assert fitted.shape == (5, 8, 8, 3) and note == ""
    # only the first n files are decoded
    x2, y2, _ = load_data(tmp_path / "imgs", "test", 2)
    assert torch.equal(x2, x[:2]) and y2.tolist() == [0, 0]


def test_image_folder_grey_and_tiny_images(tmp_path: Path) -> None:
    _image_folder(tmp_path / "g", {"a": 2, "b": 1}, rgb=False)
    x, y, info = load_data(tmp_path / "g")
    assert x.shape == (3, 1, 8, 8) and "grayscale" in info["layout"]
    # decoded images are HWC even when H is a channel count (3x3 RGB images)
    _image_folder(tmp_path / "t", {"a": 2}, size=3)
    x, _, info = load_data(tmp_path / "t")
    assert x.shape == (2, 3, 3, 3) and info["canonical"] == "nhwc"


def test_image_folder_splits(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _image_folder(root / "train", {"cat": 2, "dog": 2, "emu": 1})
    _image_folder(root / "val", {"dog": 2, "emu": 1}, seed=1)  # no cat in val: labels must not shift
    xt, yt, info = load_data(root, "train")
    assert yt.tolist() == [0, 0, 1, 1, 2] and info["classes"] == ["cat", "dog", "emu"]
    xv, yv, info = load_data(root, "test")  # test falls back to val
    assert yv.tolist() == [1, 1, 2] and info["folder"] == str(root / "val")
    _raises("no split 'holdout'.*train, val", root, "holdout")


def test_image_folder_numbered_classes_warn(tmp_path: Path) -> None:
    _image_folder(tmp_path / "d", {"0": 1, "1": 1, "3": 1})
    _, y, info = load_data(tmp_path / "d")
    assert y.tolist() == [0, 1, 2] and "folder '3' is label 2" in info["warning"]


def test_image_folder_ignores_other_files_and_hidden_folders(tmp_path: Path) -> None:
    _image_folder(tmp_path / "d", {"a": 1, "b": 1})
    (tmp_path / "d" / "a" / "notes.txt").write_text("x")
    (tmp_path / "d" / ".ipynb_checkpoints").mkdir()
    _, y, info = load_data(tmp_path / "d")
    assert info["classes"] == ["a", "b"] and y.tolist() == [0, 1]


@pytest.mark.parametrize("case, match", [
    ("sizes", "all images must have one size"),
    ("corrupt", "cannot decode image"),
    ("mixed", "is colour .* first image is greyscale"),
    ("sixteen", "16-bit"),
    ("empty", "no images in"),
    ("nothing", "no dataset certonnx reads"),
])
def test_image_folder_bad_input(tmp_path: Path, case: str, match: str) -> None:
    root = tmp_path / "d"
    if case == "nothing":
        root.mkdir()
        (root / "readme.txt").write_text("x")
        _raises(match, root)
        return
    _image_folder(root, {"a": 2, "b": 1}, rgb=case != "mixed")
    bad = root / "b" / "img9.png"
    if case == "sizes":
        _png(bad, np.zeros((9, 8, 3), np.uint8))
    elif case == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "mixed":
        _png(bad, np.zeros((8, 8, 3), np.uint8))
    elif case == "sixteen":
        Image.fromarray(np.zeros((8, 8), np.uint16)).save(root / "a" / "img0.png")
    elif case == "empty":
        for f in root.rglob("*.png"):
            f.unlink()
    _raises(match, root)


# -- MNIST idx ----------------------------------------------------------------------------------------

def _idx(path: Path, a: np.ndarray, code: int = 0x08, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(a.dtype.newbyteorder(">")).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _mnist(raw: Path, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng()
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = np.arange(7, dtype=np.uint8) % 10
    _idx(raw / "train-images-idx3-ubyte", x, gz=gz)
    _idx(raw / "train-labels-idx1-ubyte", y, gz=gz)
    _idx(raw / "t10k-images-idx3-ubyte", x[:3], gz=gz)
    _idx(raw / "t10k-labels-idx1-ubyte", y[:3], gz=gz)
    return x, y


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path: Path, gz: bool) -> None:
    x, y = _mnist(tmp_path / "root" / "FashionMNIST" / "raw", gz)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    # the torchvision root, the dataset folder and its raw/ folder all work
    for where in ("root", "root/FashionMNIST", "root/FashionMNIST/raw"):
        xa, ya, info = load_data(tmp_path / where, "train", 5)
        xb, yb, ref = load_npz(tmp_path / "d.npz", "train", 5)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and info["sha256"] == ref["sha256"]
        assert info["format"] == "idx" and info["dataset"] == "FashionMNIST" and xa.shape == (5, 1, 28, 28)
    assert load_data(tmp_path / "root", "test")[0].shape == (3, 1, 28, 28)
    _raises("no split 'val'", tmp_path / "root", "val")


@pytest.mark.parametrize("case, match", [
    ("magic", "not an idx file"),
    ("truncated", "truncated"),
    ("counts", "declares 7 images but .* declares 6 labels"),
    ("missing", "no t10k-labels-idx1-ubyte"),
    ("gz_truncated", "truncated|cannot read"),
    ("file", "give the folder"),
])
def test_mnist_idx_bad_input(tmp_path: Path, case: str, match: str) -> None:
    raw = tmp_path / "MNIST" / "raw"
    x, y = _mnist(raw, gz=case == "gz_truncated")
    split = "train"
    if case == "magic":
        (raw / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04" + b"\0" * 100)
    elif case == "truncated":
        p = raw / "train-images-idx3-ubyte"
        p.write_bytes(p.read_bytes()[:500])
    elif case == "counts":
        _idx(raw / "train-labels-idx1-ubyte", y[:6])
    elif case == "missing":
        (raw / "t10k-labels-idx1-ubyte").unlink()
        split = "test"
    elif case == "gz_truncated":
        p = raw / "train-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:200])
    elif case == "file":
        _raises(match, raw / "train-images-idx3-ubyte")
        return
    _raises(match, tmp_path / "MNIST", split)


def test_idx_declared_size_is_not_allocated(tmp_path: Path) -> None:
    """A 20-byte file declaring 10^12 pixels is refused before any allocation."""
    raw = tmp_path / "raw"
    _mnist(raw, gz=False)
    (raw / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**6, 1000, 1000))
    _raises("declares shape", raw, "train")


# -- CIFAR ----------------------------------------------------------------------------------------------

def _cifar10(d: Path, n: int = 4, batches: int = 2) -> tuple[np.ndarray, np.ndarray]:
    d.mkdir(parents=True)
    rng = _rng()
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": ["f.png"] * n}, f, protocol=2)
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.array(y))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f)
    return np.concatenate(xs[:-1]), np.concatenate(ys[:-1])


def test_cifar10(tmp_path: Path) -> None:
    x, y = _cifar10(tmp_path / "root" / "cifar-10-batches-py")
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    for where in ("root", "root/cifar-10-batches-py"):
        xa, ya, info = load_data(tmp_path / where, "train", 6)  # across the two batches
        xb, yb, _ = load_npz(tmp_path / "d.npz", "train", 6)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (6, 3, 32, 32)
        assert info["layout"] == "NCHW" and info["dataset"] == "cifar-10" and info["classes"][:2] == ["c0", "c1"]
    assert load_data(tmp_path / "root", "train")[0].shape == (8, 3, 32, 32)
    assert load_data(tmp_path / "root", "test")[0].shape == (4, 3, 32, 32)


def test_cifar100(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x = _rng().integers(0, 256, (5, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        with open(d / name, "wb") as f:
            pickle.dump({"data": x, "fine_labels": [0, 1, 2, 3, 99], "coarse_labels": [0] * 5}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    xa, ya, info = load_data(tmp_path, "test")
    assert xa.shape == (5, 3, 32, 32) and ya.tolist() == [0, 1, 2, 3, 99]
    assert info["dataset"] == "cifar-100" and len(info["classes"]) == 100


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize("case, match", [
    ("code", "refusing to load"),
    ("not_pickle", "not a readable CIFAR"),
    ("shape", "3072"),
    ("keys", "expected 'data' and 'labels'"),
    ("labels", "labels of shape"),
])
def test_cifar_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, match: str) -> None:
    d = tmp_path / "cifar-10-batches-py"
    _cifar10(d)
    monkeypatch.chdir(tmp_path)
    obj: object = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
    if case == "code":
        obj = _Evil()
    elif case == "shape":
        obj = {"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}
    elif case == "keys":
        obj = {"pixels": np.zeros((4, 3072), np.uint8)}
    elif case == "labels":
        obj = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}
    if case == "not_pickle":
        (d / "test_batch").write_bytes(b"garbage")
    else:
        with open(d / "test_batch", "wb") as f:
            pickle.dump(obj, f)
    _raises(match, d, "test")
    assert not (tmp_path / "pwned.txt").exists()


def test_several_datasets_in_one_root(tmp_path: Path) -> None:
    _mnist(tmp_path / "MNIST" / "raw")
    _cifar10(tmp_path / "cifar-10-batches-py")
    _raises("several datasets .*MNIST/raw.*cifar-10-batches-py", tmp_path)


# -- through the CLI ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The first 30 test images of the fixture data in every form."""
    d = tmp_path_factory.mktemp("forms")
    z = np.load(DATA)
    x, y = z["x_test"][:30], z["y_test"][:30]
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    _idx(d / "MNIST" / "raw" / "t10k-images-idx3-ubyte", x, gz=True)
    _idx(d / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", y.astype(np.uint8), gz=True)
    for i, (a, k) in enumerate(zip(x, y)):  # folders "00".."09": sorted name order is the label order
        _png(d / "png" / "test" / f"{k:02d}" / f"{i:03d}.png", a)
    for k in range(10):
        (d / "png" / "train" / f"{k:02d}").mkdir(parents=True, exist_ok=True)
    return {"npz": str(DATA), "pair": f"{d / 'x.npy'},{d / 'y.npy'}", "idx": str(d / "MNIST"), "png": str(d / "png")}


def test_cli_certify_every_form(mnist_forms: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """The same images give the same numbers in every form (the image folder reorders them by class)."""
    results = {}
    for form, data in mnist_forms.items():
        rc = main(["certify", str(MLP), "--data", data, "--n", "30", "--norm", "linf:2/255", "--method", "ibp",
                   "--pgd-steps", "2", "--json", "-"])
        out = capsys.readouterr()
        assert rc == 0, (form, out.err)
        results[form] = json.loads(out.out)
    for form, r in results.items():
        assert r["n"] == 30 and r["epsilon"] == {"linf": 2 / 255}, form
        assert r["clean_accuracy"] == results["npz"]["clean_accuracy"], form
        assert r["certified_accuracy"] == results["npz"]["certified_accuracy"], form
    assert results["idx"]["data"]["format"] == "idx" and results["png"]["data"]["format"] == "image folder"


def test_cli_bad_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["certify", str(MLP), "--data", str(tmp_path / "empty"), "--norm", "linf:0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no dataset certonnx reads" in lines[0], err
