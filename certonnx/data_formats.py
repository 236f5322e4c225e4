"""The dataset forms ``--data`` accepts besides ``.npz``, read into plain arrays.

:func:`certonnx.data.load_data` decides the form and hands the arrays to the same checks and
conversion as :func:`~certonnx.data.load_npz`, so every form gives the same ``(x, y, info)``.
The forms (``split`` is ``train`` or ``test``, or what ``--split`` names):

``X.npy,Y.npy``
    two ``.npy`` files, images and labels, used for every split (like ``x``/``y`` in an .npz).
    Memory-mapped: only the first ``--n`` samples are read.
a folder of ``.npy`` files
    named like the .npz keys: ``x_<split>.npy``/``y_<split>.npy`` (or ``x.npy``/``y.npy``).
an image folder (torchvision ``ImageFolder`` layout)
    ``DIR/<class>/*.png|jpg|...``, one subfolder per class, classes numbered in sorted name
    order, files in the order torchvision lists them; with ``DIR/train/<class>/...`` and
    ``DIR/test/<class>/...`` (or ``val``) the split picks the subfolder, and the classes are those
    of all splits together, so a class missing from one split does not shift the labels.
    Without split subfolders the one folder serves every split. Images must share one size
    (nothing is resized: ε is measured on the pixels as stored); greyscale (``L``) images give
    one channel, anything else RGB (alpha dropped). Decoded lazily, batch by batch, into one
    uint8 array: only the first ``--n`` files are opened.
MNIST-style idx files (torchvision's ``MNIST``/``FashionMNIST``/``KMNIST`` download folders)
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz``, in the folder, in ``DIR/raw`` or in
    ``DIR/<NAME>/raw``; split ``train`` or ``test`` (``t10k``). Only the first ``--n`` samples
    are decompressed.
CIFAR-10/100 python batches (torchvision's ``cifar-10-batches-py``/``cifar-100-python``)
    ``data_batch_1..5``/``test_batch`` (CIFAR-10 labels) or ``train``/``test`` (CIFAR-100
    fine labels), in the folder or one below it. Read with a restricted unpickler that only
    rebuilds numpy arrays and plain containers: a batch file cannot run code.

Nothing here imports torchvision or downloads anything. Every problem is a one-line DataError.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certonnx.errors import DataError

__all__ = ["Arrays", "SPLIT_DIRS", "IMAGE_EXTENSIONS", "detect", "read_split"]

#: file endings of an image folder (torchvision's ``IMG_EXTENSIONS``), any case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: subfolders of an image folder that are splits, not classes; ``test`` falls back to the others
SPLIT_DIRS = ("train", "test", "val", "valid", "validation")
_TEST_FALLBACK = ("val", "valid", "validation")
#: images decoded per batch (the files are opened lazily, one batch at a time)
DECODE_BATCH = 256
#: idx prefixes per split (torchvision's MNIST file names)
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_TYPES: dict[int, np.dtype[Any]] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_NAME = re.compile(r"^(?P<prefix>[a-z0-9]+)-(?P<kind>images|labels)-idx(?P<ndim>\d)-ubyte(?:\.gz)?$")
_READ_CHUNK = 1 << 24


@dataclass
class Arrays:
    """One split as read: arrays as stored (``x`` uint8/int/float, ``y`` labels), the names the
    error messages use for them, and extra ``info`` fields (format, classes)."""

    x: np.ndarray
    y: np.ndarray
    x_name: str
    y_name: str
    info: dict[str, Any] = field(default_factory=dict)
    channels_last: bool | None = None  # known for decoded images (HWC); None: guessed from the shape


@dataclass
class Source:
    """A recognised dataset: its form and where it lives (``files`` for a pair)."""

    kind: str  # npz | npy-pair | npy-dir | image-folder | idx | cifar
    path: Path
    files: tuple[Path, ...] = ()


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


# -- recognising the form -----------------------------------------------------------------------

def detect(data: str | os.PathLike[str]) -> Source:
    """The form of ``--data``, cheaply (no array is read); DataError when it is none of them."""
    text = str(data)
    p = Path(text)
    if not p.exists() and "," in text:
        parts = [s.strip() for s in text.split(",")]
        if len(parts) != 2 or not all(s.lower().endswith(".npy") for s in parts):
            raise DataError(f"--data {text!r}: a comma joins exactly two .npy files, images and labels "
                            "(X.npy,Y.npy)")
        for s in parts:
            if not Path(s).is_file():
                raise DataError(f"data file not found: {s}" if not Path(s).exists() else f"data path is not a file: {s}")
        return Source("npy-pair", p, (Path(parts[0]), Path(parts[1])))
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        return _detect_dir(p)
    if not p.is_file():
        raise DataError(f"data path is not a file or a folder: {p}")
    name = p.name.lower()
    if name.endswith(".npy"):
        raise DataError(f"{p} is a single .npy array: give images and labels as --data X.npy,Y.npy "
                        "(or an .npz with x/y arrays)")
    if _IDX_NAME.match(name) or name in ("data_batch_1", "test_batch", "batches.meta"):
        raise DataError(f"{p} is one file of a dataset folder: give the folder ({p.parent}) as --data")
    return Source("npz", p)


def _detect_dir(p: Path) -> Source:
    found = _dir_kind(p)
    if found is not None:
        return found
    # a torchvision root: one dataset folder below (MNIST/raw, cifar-10-batches-py, ...); checked by
    # a few names per subfolder, never by listing it (the class folders of an image folder are large)
    below = []
    for c in _subdirs(p):
        if (c / "raw").is_dir() and any(_IDX_NAME.match(f.name) for f in (c / "raw").iterdir()):
            below.append(Source("idx", c / "raw"))
        elif _is_cifar(c):
            below.append(Source("cifar", c))
    if len(below) > 1:
        raise DataError(f"{p} holds several datasets ({', '.join(s.path.relative_to(p).as_posix() for s in below)}): "
                        "give one of them as --data")
    if below:
        return below[0]
    if _class_dirs(p):
        return Source("image-folder", p)
    raise DataError(f"{p} is a folder but no dataset certonnx reads: expected x_<split>.npy/y_<split>.npy, an image "
                    "folder (one subfolder of images per class), MNIST idx files or CIFAR python batches")


def _is_cifar(p: Path) -> bool:
    return ((p / "data_batch_1").is_file() or (p / "test_batch").is_file()
            or ((p / "train").is_file() and (p / "meta").is_file()))


def _dir_kind(p: Path) -> Source | None:
    names = {c.name for c in p.iterdir()}
    if any(n.endswith(".npy") and (n.startswith("x_") or n == "x.npy") for n in names):
        return Source("npy-dir", p)
    if _is_cifar(p):
        return Source("cifar", p)
    if any(_IDX_NAME.match(n) for n in names):
        return Source("idx", p)
    if (p / "raw").is_dir() and any(_IDX_NAME.match(c.name) for c in (p / "raw").iterdir()):
        return Source("idx", p / "raw")
    return None


def _subdirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))


def read_split(src: Source, split: str, n: int | None) -> Arrays:
    """The first ``n`` samples (all with None) of ``split`` of a non-npz source, as stored."""
    reader = {"npy-pair": _read_npy_pair, "npy-dir": _read_npy_dir, "image-folder": _read_image_folder,
              "idx": _read_idx_dir, "cifar": _read_cifar}[src.kind]
    return reader(src, split, n)


# -- .npy ---------------------------------------------------------------------------------------

def _load_npy(p: Path) -> np.ndarray:
    """Memory-mapped (nothing read until used); a truncated file or object array is a DataError."""
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, struct.error, OverflowError, SyntaxError) as e:
        raise DataError(f"{p} is not a readable .npy file ({type(e).__name__}: {_one_line(e)})") from e
    if not isinstance(a, np.ndarray):
        raise DataError(f"{p} is not a .npy array")
    if a.ndim == 0:
        raise DataError(f"{p.name} is a single value of shape (), not an array with one entry per sample")
    return a


def _read_npy_pair(src: Source, split: str, n: int | None) -> Arrays:
    px, py = src.files
    xa, ya = _load_npy(px), _load_npy(py)
    return Arrays(xa[:n], ya[:n], px.name, py.name, {"format": "npy pair", "files": [str(px), str(py)]})


def _read_npy_dir(src: Source, split: str, n: int | None) -> Arrays:
    d = src.path
    for fx, fy in ((f"x_{split}.npy", f"y_{split}.npy"), ("x.npy", "y.npy")):
        if (d / fx).is_file() and (d / fy).is_file():
            xa, ya = _load_npy(d / fx), _load_npy(d / fy)
            return Arrays(xa[:n], ya[:n], fx, fy, {"format": "npy folder", "files": [str(d / fx), str(d / fy)]})
    have = sorted(c.name for c in d.iterdir() if c.name.endswith(".npy"))
    raise DataError(f"no arrays for split {split!r} in {d}: expected x_{split}.npy/y_{split}.npy (or x.npy/y.npy); "
                    f"the folder has {have or 'no .npy files'}")


# -- image folders ------------------------------------------------------------------------------

def _class_dirs(p: Path) -> list[Path]:
    """Class subfolders (hidden ones, like ``.ipynb_checkpoints``, are not classes)."""
    return _subdirs(p) if p.is_dir() else []


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_of(class_dir: Path) -> list[Path]:
    """Image files under a class folder, in torchvision's order (sorted walk, links followed)."""
    out = []
    for root, dirs, files in sorted(os.walk(class_dir, followlinks=True)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(root) / f for f in sorted(files) if _is_image(f)]
    return out


def _splits(root: Path) -> list[str]:
    """The split subfolders of an image folder (``train``, ``test``, ``val``...): every subfolder
    is named like a split and at least one holds class folders. [] when ``root`` holds classes."""
    top = _class_dirs(root)
    if not top or any(c.name not in SPLIT_DIRS for c in top) or not any(_class_dirs(c) for c in top):
        return []
    return [c.name for c in top]


def _split_dir(root: Path, split: str, splits: list[str]) -> Path:
    """The folder of ``split``: ``root/<split>`` in a split layout, else ``root`` itself."""
    if not splits:
        return root  # no split subfolders: one folder for every split
    for name in (split, *(_TEST_FALLBACK if split == "test" else ())):
        if name in splits:
            return root / name
    raise DataError(f"no split {split!r} in the image folder {root}: it has {', '.join(splits)} (use --split)")


def _classes(root: Path, splits: list[str]) -> list[str]:
    """Class names of the whole dataset, sorted: the union over its split folders."""
    if splits:
        return sorted({c.name for s in splits for c in _class_dirs(root / s)})
    return [c.name for c in _class_dirs(root)]


_GREY = ("1", "L", "LA")
_COLOUR = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La")


def _decode(path: Path, grey: bool | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in _GREY and mode not in _COLOUR:
                raise DataError(f"image {path} has mode {mode} (16-bit or float pixels): certonnx reads 8-bit "
                                "greyscale or colour images")
            if grey and mode not in _GREY:
                raise DataError(f"image {path} is colour ({mode}) but the folder's first image is greyscale: "
                                "store all images of a dataset in one kind")
            pixels = im.convert("L" if grey or (grey is None and mode in _GREY) else "RGB")
            return np.asarray(pixels, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {_one_line(e)})") from e


def iter_image_batches(files: Sequence[Path], batch: int = DECODE_BATCH) -> Iterator[np.ndarray]:
    """Decoded images, ``batch`` files at a time, as uint8 ``(B, H, W)`` (greyscale, decided by
    the first image) or ``(B, H, W, 3)``; every image must have the first one's size."""
    grey: bool | None = None
    size: tuple[int, ...] | None = None
    first = ""
    for i in range(0, len(files), batch):
        out = []
        for f in files[i:i + batch]:
            a = _decode(f, grey)
            if size is None:
                size, grey, first = a.shape, a.ndim == 2, str(f)
            elif a.shape != size:
                raise DataError(f"image {f} is {_size(a.shape)} but {first} is {_size(size)}: all images must "
                                "have one size (certonnx does not resize; ε is measured on the pixels as stored)")
            out.append(a)
        yield np.stack(out)


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}" + (" RGB" if len(shape) == 3 else " greyscale")


def _read_image_folder(src: Source, split: str, n: int | None) -> Arrays:
    try:
        import PIL  # noqa: F401
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    root = src.path
    splits = _splits(root)
    folder = _split_dir(root, split, splits)
    classes = _classes(root, splits)
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        found = _images_of(folder / name) if (folder / name).is_dir() else []
        files += found
        labels += [k] * len(found)
        if n is not None and len(files) >= n:
            break  # later classes are not listed: only the first n files are used
    if not files:
        raise DataError(f"no images in {folder}: expected one subfolder per class holding "
                        f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS[:3])}... files")
    files, labels = files[:n], labels[:n]
    x: np.ndarray | None = None
    at = 0
    for b in iter_image_batches(files):
        if x is None:  # one uint8 array for all images, filled batch by batch
            x = np.empty((len(files), *b.shape[1:]), np.uint8)
        x[at:at + len(b)] = b
        at += len(b)
    assert x is not None
    info: dict[str, Any] = {"format": "image folder", "folder": str(folder), "classes": classes}
    odd = next((f"folder {c!r} is label {k}" for k, c in enumerate(classes) if c.isdigit() and int(c) != k), None)
    if odd:
        info["warning"] = (f"class folders are numbered in sorted name order, as torchvision's ImageFolder does: "
                           f"{odd} (a folder's name is not its label)")
    return Arrays(x, np.asarray(labels, np.int64), f"images in {folder}", "labels (class folders)", info,
                  channels_last=x.ndim == 4)


# -- MNIST idx ----------------------------------------------------------------------------------

def _idx_file(d: Path, split: str, kind: str) -> Path:
    if split not in _IDX_PREFIX:
        raise DataError(f"no split {split!r} in the idx folder {d}: MNIST-style files have train and test")
    ndim = 3 if kind == "images" else 1
    base = f"{_IDX_PREFIX[split]}-{kind}-idx{ndim}-ubyte"
    for name in (base, base + ".gz"):
        if (d / name).is_file():
            return d / name
    raise DataError(f"{d} has no {base}[.gz] for split {split!r}")


def _read_exact(f: Any, need: int) -> bytearray:
    """``need`` bytes, read in chunks (a declared size is never allocated before the bytes are there)."""
    buf = bytearray()
    while len(buf) < need:
        chunk = f.read(min(_READ_CHUNK, need - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(p: Path, n: int | None = None) -> tuple[np.ndarray, int]:
    """The first ``n`` entries of an idx file (gzipped or not) and the count its header declares."""
    try:
        with (gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_TYPES or not head[3]:
                raise DataError(f"{p} is not an idx file (header {head.hex() or 'empty'}; expected 00 00 <type> <ndim>)")
            dtype, ndim = _IDX_TYPES[head[2]], head[3]
            dims_b = f.read(4 * ndim)
            if len(dims_b) < 4 * ndim:
                raise DataError(f"{p} is truncated in its header")
            dims = struct.unpack(f">{ndim}I", dims_b)
            count = dims[0] if n is None else min(n, dims[0])
            need = count * math.prod(dims[1:]) * dtype.itemsize
            if not p.name.endswith(".gz"):
                total = dims[0] * math.prod(dims[1:]) * dtype.itemsize
                have = p.stat().st_size - 4 - 4 * ndim
                if have < total:
                    raise DataError(f"{p} declares shape {tuple(dims)} ({total:,} bytes) but holds {max(have, 0):,} "
                                    "bytes: truncated or corrupt")
            buf = _read_exact(f, need)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise DataError(f"cannot read {p} ({type(e).__name__}: {_one_line(e)})") from e
    if len(buf) < need:
        raise DataError(f"{p} declares shape {tuple(dims)} but ends after {len(buf):,} of the {need:,} bytes of "
                        f"its first {count} entries: truncated or corrupt")
    return np.frombuffer(buf, dtype=dtype).reshape(count, *dims[1:]), int(dims[0])


def _read_idx_dir(src: Source, split: str, n: int | None) -> Arrays:
    px, py = _idx_file(src.path, split, "images"), _idx_file(src.path, split, "labels")
    xa, nx = read_idx(px, n)
    ya, ny = read_idx(py, n)
    if nx != ny:
        raise DataError(f"{px.name} declares {nx} images but {py.name} declares {ny} labels")
    name = src.path.parent.name if src.path.name == "raw" else src.path.name
    return Arrays(xa, ya, px.name, py.name, {"format": "idx", "dataset": name, "files": [str(px), str(py)]})


# -- CIFAR python batches -----------------------------------------------------------------------

#: what a CIFAR batch may rebuild: numpy arrays, dtypes and scalars (numpy 1 and 2 names)
_PICKLE_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                   ("numpy.core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
                   ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: anything else (a pickle can name any
    callable) is refused instead of run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module.replace("numpy._core", "numpy.core"), name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core.* names under numpy 2
            return super().find_class(module, name)


def _unpickle(p: Path) -> Any:
    try:
        with open(p, "rb") as f:
            return _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, MemoryError, RecursionError, ImportError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not a readable CIFAR python batch ({type(e).__name__}: {_one_line(e)})") from e


def _is_cifar10(d: Path) -> bool:
    return (d / "data_batch_1").is_file() or (d / "test_batch").is_file()


def _cifar_files(d: Path, split: str) -> list[Path]:
    if _is_cifar10(d):
        batches = sorted((c.name for c in d.glob("data_batch_*")), key=lambda s: (len(s), s))  # 1, 2, ..., 10
        names = {"train": batches, "test": ["test_batch"]}.get(split)
    else:  # CIFAR-100
        names = {"train": ["train"], "test": ["test"]}.get(split)
    if names is None:
        raise DataError(f"no split {split!r} in the CIFAR folder {d}: it has train and test")
    missing = [s for s in names if not (d / s).is_file()]
    if missing or not names:
        raise DataError(f"{d} lacks {', '.join(missing) or 'data_batch_*'} for split {split!r}")
    return [d / s for s in names]


def _cifar_batch(p: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = _unpickle(p)
    if not isinstance(obj, dict):
        raise DataError(f"{p} holds a {type(obj).__name__}, not a CIFAR batch dictionary")
    data = obj.get("data")
    key = next((k for k in ("labels", "fine_labels") if k in obj), None)
    if not isinstance(data, np.ndarray) or key is None:
        raise DataError(f"{p} is not a CIFAR batch: expected 'data' and 'labels' (or 'fine_labels'), "
                        f"found {sorted(map(str, obj))}")
    if data.ndim == 2 and data.shape[1] == 3072:
        data = data.reshape(-1, 3, 32, 32)  # rows are CHW planes (a view)
    elif not (data.ndim == 4 and data.shape[1:] == (3, 32, 32)):
        raise DataError(f"{p}: 'data' has shape {data.shape}; CIFAR stores (N, 3072) rows of 3x32x32 pixels")
    try:
        labels = np.asarray(obj[key])
    except (TypeError, ValueError) as e:
        raise DataError(f"{p}: {key!r} is not a list of class labels ({_one_line(e)})") from e
    return data, labels


def _read_cifar(src: Source, split: str, n: int | None) -> Arrays:
    d = src.path
    xs, ys, got = [], [], 0
    for p in _cifar_files(d, split):
        x, y = _cifar_batch(p)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{p}: {x.shape[0]} images but labels of shape {y.shape}")
        xs.append(x if n is None else x[:n - got])
        ys.append(y if n is None else y[:n - got])
        got += xs[-1].shape[0]
        if n is not None and got >= n:
            break
    xa = xs[0] if len(xs) == 1 else np.concatenate(xs)
    ya = ys[0] if len(ys) == 1 else np.concatenate(ys)
    del xs, ys
    info: dict[str, Any] = {"format": "cifar", "dataset": "cifar-10" if _is_cifar10(d) else "cifar-100"}
    classes = _cifar_classes(d)
    if classes:
        info["classes"] = classes
    return Arrays(xa, ya, f"{d.name} images", f"{d.name} labels", info)


def _cifar_classes(d: Path) -> list[str] | None:
    for name, key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        if (d / name).is_file():
            try:
                meta = _unpickle(d / name)
            except DataError:
                return None
            names = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(names, list) and all(isinstance(s, (str, bytes)) for s in names):
                return [s.decode("latin1") if isinstance(s, bytes) else s for s in names]
    return None

