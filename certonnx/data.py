"""Dataset loading for ``certify``, ``finetune`` and ``check``, checked thoroughly.

:func:`load_data` reads every form ``--data`` accepts: an ``.npz`` (:func:`load_npz`), two
``.npy`` files ``X.npy,Y.npy``, a folder of ``x_<split>.npy``/``y_<split>.npy``, an image folder
in torchvision ``ImageFolder`` layout, MNIST-style idx files and CIFAR python batches (the
forms and their conventions: :mod:`certonnx.data_formats`). All of them go through the same
checks and conversion and return the same ``(x, y, info)``.

Bad data is the most common reason for meaningless certificates (pixels in [0, 255] while ε is
meant for [0, 1], labels shifted by one, NHWC fed as NCHW), so every such problem is a
:class:`DataError` with one clear line instead of a silently wrong number.
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certonnx.errors import DataError
from certonnx.layout import (
    TO_CHANNELS_FIRST,
    TO_CHANNELS_LAST,
    apply_layout,
    looks_channels_last,
    plan_layout,
)
from certonnx.utils import sha256_arrays

__all__ = ["load_data", "load_npz", "data_inputs", "find_data", "data_dir", "check_against_model", "as_stored",
           "normalize_arrays"]

#: labels are class indices; more classes than this is a corrupt or wrong label array
MAX_CLASSES = 100_000


def data_dir() -> Path | None:
    """``$CERTONNX_DATA`` when set, else ``<repo>/../shared/data`` when it exists."""
    env = os.environ.get("CERTONNX_DATA")
    if env:
        return Path(env)
    p = Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None


def find_data(name: str) -> Path | None:
    """Path of a shared data file (``mnist.npz``, ``vnncomp/...``), or None when absent."""
    d = data_dir()
    if d is None:
        return None
    p = d / name
    return p if p.exists() else None


#: what reading a corrupt archive can raise: zipfile raises BadZipFile, NotImplementedError
#: (unknown compression or zip version), RuntimeError (an "encrypted" flag bit), zlib.error,
#: struct.error, KeyError; numpy raises ValueError (object arrays with allow_pickle=False, bad
#: headers), EOFError, and tokenize.TokenError / SyntaxError from parsing a mangled header
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, struct.error, KeyError,
                NotImplementedError, RuntimeError, OverflowError, tokenize.TokenError, SyntaxError)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _check_declared_size(npz: Any, key: str) -> None:
    """Compare the shape an array's ``.npy`` header declares with the bytes its archive member
    really holds, before numpy allocates the declared size (a 60-byte file can declare a
    10^12-element array)."""
    name = key if key in npz.zip.namelist() else f"{key}.npy"
    info = npz.zip.getinfo(name)
    with npz.zip.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return  # newer formats: numpy's own reader checks them
        header = f.tell()
    if dtype.hasobject:
        return  # refused by allow_pickle=False when read
    need = math.prod(int(d) for d in shape) * dtype.itemsize
    have = info.file_size - header
    if need > have:
        raise DataError(f"array {key!r} declares shape {tuple(shape)} of {dtype} ({need:,} bytes) but the file "
                        f"holds {max(have, 0):,} bytes: truncated or corrupt")


def _pick_keys(keys: Sequence[str], split: str) -> tuple[str, str]:
    """``x_<split>``/``y_<split>`` first, plain ``x``/``y`` as a fallback."""
    for kx, ky in ((f"x_{split}", f"y_{split}"), ("x", "y"), ("X", "Y"), ("images", "labels")):
        if kx in keys and ky in keys:
            return kx, ky
    raise DataError(
        f"no arrays for split {split!r}: expected keys x_{split}/y_{split} (or x/y); "
        f"the file has {sorted(keys) or 'no arrays'}"
    )


def _layout(x: np.ndarray, channels_last: bool | None = None) -> tuple[np.ndarray, str, str]:
    """Bring images to NCHW (the ONNX convention); report which layout was found and how the
    array was changed (``"nhwc"``: transposed, ``"channel"``: a channel axis added, ``""``: not).
    ``channels_last`` is what the source knows (decoded images are HWC); None: guessed from the shape.

    This canonical form is only a starting point (and the input shape ``--arch`` models are
    built for): :func:`check_against_model` undoes it exactly and fits the data *as stored* to
    the model's input, so a model that takes NHWC gets the NHWC pixels untouched.
    """
    if x.ndim == 1:
        raise DataError(f"x must have a sample dimension and features, got shape {x.shape}")
    if x.ndim == 2:
        return x, "NF (flat features)", ""
    if x.ndim == 3:
        return x[:, None], "NHW (grayscale, channel added)", "channel"
    if x.ndim == 4:
        if looks_channels_last(x.shape[1:]) if channels_last is None else channels_last:
            return np.transpose(x, TO_CHANNELS_FIRST), "NHWC (converted to NCHW)", "nhwc"
        return x, "NCHW", ""
    return x, f"N + {x.ndim - 1} dims", ""


def _check_n(n: int | None) -> None:
    if n is not None and n <= 0:
        raise DataError(f"--n must be positive, got {n}")


def _check_per_sample(arrays: Sequence[tuple[str, np.ndarray]]) -> None:
    for k, a in arrays:
        if a.ndim == 0:
            raise DataError(f"{k} is a single value of shape (), not an array with one entry per sample")


def load_npz(
    path: str | os.PathLike[str],
    split: str = "test",
    n: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    allow_unnormalized: bool = False,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Load ``n`` first samples of one split as ``x`` float32 NCHW in [0, 1] and ``y`` int64.

    uint8 pixels are divided by 255. Float data must already lie in [0, 1] (the space ε is
    measured in) unless ``allow_unnormalized``. ``mean``/``std`` are *not* applied here (the
    model gets them prepended so ε stays in pixel space); they are only recorded in ``info``.
    Only the selected split is read, and only its first ``n`` samples are converted.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    try:
        npz = np.load(p, allow_pickle=False)
    except _READ_ERRORS as e:
        raise DataError(f"{p} is not a readable .npz file ({type(e).__name__}: {_one_line(e)})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{p} is a single .npy array, not an .npz archive with x/y arrays")
    with npz:
        kx, ky = _pick_keys(list(npz.files), split)
        try:
            for k in (kx, ky):
                _check_declared_size(npz, k)
            xa, ya = npz[kx], npz[ky]
        except _READ_ERRORS as e:
            raise DataError(f"cannot read arrays {kx}/{ky} from {p} ({type(e).__name__}: {_one_line(e)})") from e
    _check_per_sample(((kx, xa), (ky, ya)))
    _check_n(n)
    if n is not None:
        xa, ya = xa[:n], ya[:n]
    return _convert(xa, ya, kx, ky, p, allow_unnormalized, num_classes, mean, std)


def load_data(
    path: str | os.PathLike[str],
    split: str = "test",
    n: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    allow_unnormalized: bool = False,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """:func:`load_npz` for every form ``--data`` accepts (:mod:`certonnx.data_formats`): the
    same ``(x, y, info)``, with ``info["format"]`` saying which form was read (and
    ``info["classes"]`` the class names where the form has them)."""
    from certonnx.data_formats import detect, read_split

    src = detect(path)
    if src.kind == "npz":
        x, y, info = load_npz(src.path, split, n, mean=mean, std=std, allow_unnormalized=allow_unnormalized,
                              num_classes=num_classes)
        info["format"] = "npz"
        return x, y, info
    _check_n(n)
    arrays = read_split(src, split, n)
    _check_per_sample(((arrays.x_name, arrays.x), (arrays.y_name, arrays.y)))
    x, y, info = _convert(arrays.x, arrays.y, arrays.x_name, arrays.y_name, str(path), allow_unnormalized,
                          num_classes, mean, std, channels_last=arrays.channels_last)
    return x, y, {**info, **arrays.info}


def data_inputs(path: str | os.PathLike[str]) -> dict[str, str]:
    """The input paths of ``--data`` (two for ``X.npy,Y.npy``), labelled for
    :func:`certonnx.utils.check_outputs`; a missing path is a DataError, before any work."""
    from certonnx.data_formats import detect

    src = detect(path)  # also says what is wrong with a path that is no dataset, before any work
    if src.kind == "npy-pair":
        return {"--data (images)": str(src.files[0]), "--data (labels)": str(src.files[1])}
    return {"--data": str(path)}


def _convert(
    xa: np.ndarray,
    ya: np.ndarray,
    kx: str,
    ky: str,
    p: Path | str,
    allow_unnormalized: bool,
    num_classes: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels_last: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    if xa.dtype.kind not in "uifb":
        raise DataError(f"{kx} has dtype {xa.dtype}; expected uint8 pixels or floats")
    if ya.dtype.kind not in "uifb":
        raise DataError(f"{ky} has dtype {ya.dtype}; expected integer class labels")
    ya = ya.reshape(-1) if ya.ndim == 2 and ya.shape[1] == 1 else ya
    if ya.ndim != 1:
        raise DataError(f"{ky} must be a vector of class labels, got shape {ya.shape} (one-hot labels?)")
    if xa.shape[0] != ya.shape[0]:
        raise DataError(f"{kx} has {xa.shape[0]} samples but {ky} has {ya.shape[0]} labels")
    if xa.shape[0] == 0:
        raise DataError(f"{kx} is empty")
    sha = sha256_arrays(xa, ya)
    if ya.dtype.kind == "f":
        if not np.all(np.isfinite(ya)) or np.any(ya != np.round(ya)):
            raise DataError(f"{ky} holds non-integer labels")
    if np.any(ya < 0):
        raise DataError(f"{ky} holds negative labels (min {ya.min()})")
    if num_classes is not None and np.any(ya >= num_classes):
        raise DataError(f"{ky} holds label {int(ya.max())} but the model has {num_classes} classes")
    if np.any(ya >= MAX_CLASSES):
        # training from scratch sizes the last layer by the largest label: 2**63 - 1 would
        # overflow torch, and 10**9 would allocate a 400 GB layer
        raise DataError(f"{ky} holds label {int(ya.max())}: class labels must be indices below {MAX_CLASSES:,}")
    # layout first, on the stored array (a view), then one float32 copy in that layout: the data
    # is held at most twice (as stored and converted), also for NHWC files
    stored_shape = list(xa.shape[1:])
    xl, layout, changed = _layout(xa, channels_last)
    if xa.dtype.kind in "ui" and xa.dtype != np.uint8:
        mx = int(xa.max())
        if mx > 255 or xa.min() < 0:
            raise DataError(f"{kx} holds integers outside [0, 255] (max {mx})")
    x: np.ndarray[Any, np.dtype[np.float32]] = np.empty(xl.shape, np.float32)
    x[...] = xl
    if xa.dtype.kind in "ui":
        x /= np.float32(255.0)
        scale = "uint8 / 255" if xa.dtype == np.uint8 else f"{xa.dtype} / 255"
    else:
        if not np.all(np.isfinite(x)):
            raise DataError(f"{kx} contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if (lo < -1e-6 or hi > 1 + 1e-6) and not allow_unnormalized:
            hint = " (looks like 0..255 pixels: divide by 255 or store uint8)" if hi > 1.5 and lo >= 0 else ""
            hint = hint or " (looks already normalized: store raw pixels and pass --mean/--std)"
            raise DataError(f"{kx} values lie in [{lo:.3g}, {hi:.3g}], expected [0, 1]{hint}")
        scale = "float (as stored)"
    info: dict[str, Any] = {
        "path": str(p),
        "keys": [kx, ky],
        "n": int(x.shape[0]),
        "dtype": str(xa.dtype),
        "scale": scale,
        "layout": layout,
        "sample_shape": list(x.shape[1:]),
        # how the file stores one sample, and what _layout did to it (undone by check_against_model)
        "stored_shape": stored_shape,
        "stored_layout": layout.split(" (")[0],
        "canonical": changed,
        "sha256": sha,
        "num_labels": int(ya.max()) + 1,
    }
    if mean is not None or std is not None:
        info["normalization"] = {"mean": list(mean or []), "std": list(std or [])}
    return torch.from_numpy(x), torch.from_numpy(ya.astype(np.int64)), info


def as_stored(x: torch.Tensor, info: dict[str, Any] | None) -> torch.Tensor:
    """``x`` from :func:`load_npz` back in the layout of the file (exact inverse of the NCHW
    conversion, a view); ``x`` itself when ``info`` is None or does not describe it."""
    if not info or list(x.shape[1:]) != list(info.get("sample_shape", [])):
        return x
    if info.get("canonical") == "nhwc" and x.ndim == 4:
        return x.permute(*TO_CHANNELS_LAST)
    if info.get("canonical") == "channel" and x.ndim >= 2 and x.shape[1] == 1:
        return x[:, 0]
    return x


def check_against_model(
    x: torch.Tensor, sample_shape: Sequence[int], info: dict[str, Any] | None = None
) -> tuple[torch.Tensor, str]:
    """Fit the data to the model's per-sample input shape, or say clearly why not.

    With ``info`` from :func:`load_npz` the data is first taken back to its stored layout, so
    it reaches the model exactly as onnxruntime would receive it from the user: as stored when
    that is already the model's shape; transposed when only the channel axis sits elsewhere
    (NHWC data, NCHW model or the reverse), never reshaped; reshaped only when that is a pure
    re-view in the same element order (e.g. 28x28 images for a ``(784,)`` MLP input). The
    rules are those of :mod:`certonnx.layout`. Anything else is a DataError naming both shapes.
    The note says what was done beyond load_npz's own NCHW conversion ("" when nothing);
    ``info["layout"]`` is updated to what the model gets.
    """
    want = tuple(int(d) for d in sample_shape)
    stored = as_stored(x, info)
    have = tuple(stored.shape[1:])
    canonical = info.get("canonical", "") if info and stored is not x else ""
    plan = plan_layout(have, want, channels_last=True if canonical == "nhwc" else None)
    if plan is None:
        n_have = int(np.prod(have)) if have else 1
        n_want = int(np.prod(want)) if want else 1
        if n_have == n_want:
            raise DataError(
                f"data samples have shape {list(have)} but the model expects {list(want)}: the same {n_have} values "
                "in another arrangement, which certonnx does not guess (store the data in the model's input layout)"
            )
        raise DataError(
            f"data samples have shape {list(have)} ({n_have} values) but the model expects {list(want)} "
            f"({n_want} values)"
        )
    steps, note = plan
    out = apply_layout(stored, steps)
    out = out if out is x else out.contiguous()
    if canonical and tuple(x.shape[1:]) == want and (
            (canonical == "nhwc" and steps == [("transpose", TO_CHANNELS_FIRST)])
            or (canonical == "channel" and steps and steps[0][0] == "reshape")):
        note = ""  # load_npz's own conversion, already described by info["layout"]
    if info is not None:
        kind = info.get("stored_layout") or info.get("layout", "").split(" (")[0]
        if not steps:
            info["layout"] = f"{kind} (as stored)"
        elif not note:
            pass  # load_npz's description stands
        else:
            verb = "transposed" if steps[0][0] == "transpose" else "reshaped"
            info["layout"] = f"{kind} ({verb} to the model input {list(want)})"
    return out, note


def normalize_arrays(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:  # pragma: no cover - convenience for scripts
    """``(x - mean) / std`` per channel (dim 1)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = torch.as_tensor(list(mean), dtype=x.dtype).view(shape)
    s = torch.as_tensor(list(std), dtype=x.dtype).view(shape)
    return (x - m) / s
