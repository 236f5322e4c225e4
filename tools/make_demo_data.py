"""Write ``examples/data/mnist_demo.npz`` (the MNIST subset ``make demo`` and the documentation
use) and ``examples/data/mnist_demo_0.vnnlib`` (a robustness property on its first test image).

The demo and every documented command must run the same on any machine, including one without
the full dataset, so a small, class-balanced subset of MNIST is committed with the repository.
It is big enough for a short certified fine-tune to keep the model's clean accuracy (the 200
images of ``tests/fixtures/mnist_200.npz`` are not: fine-tuning on them over-fits) and small
enough to commit (about 1 MB). The VNN-LIB file gives ``certonnx verify`` a real property to
decide: the L∞ ball of radius 0.01 around test image 0, which the bundled
``tests/fixtures/mnist_cnn_trained.onnx`` is proven robust on (``unsat``).

The subset is drawn with a fixed seed, so re-running the script writes the same arrays. Run from
the repository root; MNIST is read from ``$CERTONNX_DATA/mnist.npz`` or
``../shared/data/mnist.npz`` (an ``.npz`` with uint8 ``x_train``/``x_test`` of shape
``(N, 28, 28)`` and labels ``y_train``/``y_test``)::

    .venv/bin/python tools/make_demo_data.py
    .venv/bin/python tools/make_demo_data.py --n-train 6000 --n-test 1000 --seed 0 --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from certonnx.data import find_data  # noqa: E402 - after the sys.path set-up

OUT = ROOT / "examples" / "data" / "mnist_demo.npz"
N_CLASSES = 10
#: L∞ radius of the VNN-LIB property written next to the data (pixels in [0, 1])
PROP_EPS = 0.01




def balanced_subset(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` samples, ``n / 10`` per class, in a shuffled order.

    Balanced classes keep a few thousand images representative of the whole set (a plain random
    draw of 1000 test images is off by up to ±15 % per class), and the shuffle makes every prefix
    (``--n-train 2000``, ``--n 200``) balanced too, since certonnx reads the first N samples."""
    if n % N_CLASSES:
        raise SystemExit(f"the subset size must be a multiple of {N_CLASSES}, got {n}")
    per_class = n // N_CLASSES
    picks = []
    for c in range(N_CLASSES):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} samples, {per_class} needed")
        picks.append(rng.choice(idx, per_class, replace=False))
    # interleave classes (0, 1, ..., 9, 0, 1, ...) in a shuffled order within each round, so that
    # any prefix of a multiple of 10 samples holds every class equally often
    rounds = np.stack(picks, axis=1)  # (per_class, 10)
    order = rng.permuted(np.tile(np.arange(N_CLASSES), (per_class, 1)), axis=1)
    return np.take_along_axis(rounds, order, axis=1).reshape(-1)


def make(src: Path, out: Path, n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Draw the subset from ``src`` and write it to ``out`` (uint8 images, int64 labels)."""
    d = np.load(src)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28):
            raise SystemExit(f"{src}: x_{split} should be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
        idx = balanced_subset(y, n, rng)
        arrays[f"x_{split}"] = np.ascontiguousarray(x[idx])
        arrays[f"y_{split}"] = y[idx].astype(np.int64)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays


def vnnlib_robustness(x: np.ndarray, label: int, eps: float, n_classes: int = N_CLASSES) -> str:
    """A VNN-LIB property for ``certonnx verify``: the L∞ ball of radius ``eps`` around ``x``
    (uint8 pixels, scaled to [0, 1] and clipped to it), and as the counterexample any class
    scoring at least as high as ``label``. ``unsat`` means the image is robust on the ball."""
    v = x.reshape(-1).astype(np.float64) / 255.0
    lo, hi = np.clip(v - eps, 0.0, 1.0), np.clip(v + eps, 0.0, 1.0)
    lines = [f"; certonnx demo property: MNIST test image of class {label}, L-inf eps {eps} in [0, 1] pixels",
             "; sat = some other class scores at least as high somewhere in the ball", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(v.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_classes)]
    for i, (a, b) in enumerate(zip(lo, hi)):
        lines += [f"(assert (>= X_{i} {a:.9g}))", f"(assert (<= X_{i} {b:.9g}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_classes) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def prop_path(data: Path) -> Path:
    """The VNN-LIB file written next to the data: ``mnist_demo_0.vnnlib`` for test image 0."""
    return data.with_name(data.stem + "_0.vnnlib")


def property_text(arrays: dict[str, np.ndarray]) -> str:
    return vnnlib_robustness(arrays["x_test"][0], int(arrays["y_test"][0]), PROP_EPS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=6000, help="training images (multiple of 10) [6000]")
    ap.add_argument("--n-test", type=int, default=1000, help="test images (multiple of 10) [1000]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw [0]")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output file [{OUT.relative_to(ROOT)}]")
    ap.add_argument("--check", action="store_true",
                    help="do not write: exit 1 unless the existing --out file holds exactly these arrays")
    a = ap.parse_args(argv)
    src = find_data("mnist.npz")
    if src is None:
        print("MNIST not found: set $CERTONNX_DATA to a folder with mnist.npz", file=sys.stderr)
        return 2
    if a.check:
        tmp = a.out.with_name(a.out.stem + ".check.npz")
        try:
            want = make(src, tmp, a.n_train, a.n_test, a.seed)
        finally:
            tmp.unlink(missing_ok=True)
        with np.load(a.out) as have:
            same = sorted(have.files) == sorted(want) and all(
                have[k].dtype == v.dtype and np.array_equal(have[k], v) for k, v in want.items())
        prop = prop_path(a.out)
        same = same and prop.is_file() and prop.read_text() == property_text(want)
        print(f"{a.out} and {prop.name}: {'match' if same else 'DIFFER from'} a fresh draw from {src}")
        return 0 if same else 1
    arrays = make(src, a.out, a.n_train, a.n_test, a.seed)
    prop = prop_path(a.out)
    prop.write_text(property_text(arrays))
    print(f"wrote {prop}: L∞ {PROP_EPS} around test image 0 (class {int(arrays['y_test'][0])})")
    size = a.out.stat().st_size
    shapes = ", ".join(f"{k} {v.dtype} {v.shape}" for k, v in arrays.items())
    print(f"wrote {a.out} ({size / 1e6:.2f} MB): {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
