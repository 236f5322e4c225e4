"""What soundness for float32 execution costs: bounds with and without the rounding terms.

Usage: ``python tools/bench/rounding.py [--n 32] [--methods ibp,crown-ibp,crown,alpha-crown]``

For each net (the bundled MNIST models at L∞ 0.02 / 0.05, and, when ``../shared/data`` or
``$CERTONNX_DATA`` has them, the VNN-COMP mnist_fc and ERAN nets at their instance radii) and
each method, the margins' lower bounds of the first ``--n`` correctly classified test images
are computed twice in one run: with the rounding terms of :mod:`certonnx.bounds.rounding`
(what certonnx reports) and inside ``exact_arithmetic()`` (the bounds of the exact-arithmetic
model, not sound for any float execution). The table gives the mean of the lower bounds,
their mean and largest difference, the certified counts and the time ratio, and is written
to the '## Float rounding' section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.common import write_section  # noqa: E402

FIX = ROOT / "tests" / "fixtures"


def _nets() -> list[tuple[str, Path, float, tuple[float, float] | None]]:
    """(name, onnx, eps, domain); eps in the model's input space."""
    from certonnx.data import find_data

    nets = [("bundled mnist_mlp_trained", FIX / "mnist_mlp_trained.onnx", 0.02, (0.0, 1.0)),
            ("bundled mnist_cnn_trained", FIX / "mnist_cnn_trained.onnx", 0.05, (0.0, 1.0))]
    base = find_data("vnncomp")
    if base is not None:
        for k in (2, 4, 6):
            nets.append((f"mnist_fc 256x{k}", base / "mnist_fc" / "onnx" / f"mnist-net_256x{k}.onnx", 0.02, (0.0, 1.0)))
        nets.append(("ERAN relu 9x200", base / "eran" / "nets" / "mnist_relu_9_200.onnx", 0.015, (0.0, 1.0)))
        nets.append(("ERAN sigmoid 6x200", base / "eran" / "nets" / "ffnnSIGMOID__Point_6x200.onnx", 0.012, (0.0, 1.0)))
    return [n for n in nets if n[1].exists()]


def _data(model: object, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` correctly classified images of the bundled MNIST sample."""
    d = np.load(FIX / "mnist_200.npz")
    x = torch.as_tensor(d["x_test"], dtype=torch.float32) / 255.0
    y = torch.as_tensor(d["y_test"], dtype=torch.long)
    shape = model.sample_shape  # type: ignore[attr-defined]
    x = x.reshape(x.shape[0], *shape)
    with torch.no_grad():
        ok = model.module(x).argmax(1) == y  # type: ignore[attr-defined]
    return x[ok][:n], y[ok][:n]


def _bound(model: object, x: torch.Tensor, y: torch.Tensor, eps: float, domain: tuple[float, float] | None,
           method: str, exact: bool) -> tuple[torch.Tensor, float]:
    from certonnx.bounds import BoundedModule, InputSet, margin_matrix
    from certonnx.bounds.rounding import exact_arithmetic

    ctx = exact_arithmetic() if exact else _null()
    with ctx, torch.no_grad():
        bm = BoundedModule(model.module, model.sample_shape)  # type: ignore[attr-defined]
        inset = InputSet(x, eps, "linf", domain)
        C = margin_matrix(y, 10)
        bm.compute(InputSet(x[:1], eps, "linf", domain), C[:1], method="ibp")  # warm-up, sizes factors
        best = float("inf")
        for _ in range(3):  # best of 3: the machine may be shared
            t0 = time.perf_counter()
            lb, _ = bm.compute(inset, C, method=method, upper=False)
            best = min(best, time.perf_counter() - t0)
        return lb, best


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--methods", default="ibp,crown-ibp,crown,alpha-crown")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import certonnx

    rows = []
    for name, path, eps, domain in _nets():
        model = certonnx.load(path)
        x, y = _data(model, args.n)
        for method in args.methods.split(","):
            lb_s, t_s = _bound(model, x, y, eps, domain, method, exact=False)
            lb_e, t_e = _bound(model, x, y, eps, domain, method, exact=True)
            d = (lb_e - lb_s)
            cs = int((lb_s.amin(1) > 0).sum())
            ce = int((lb_e.amin(1) > 0).sum())
            rows.append(f"| {name} | {eps:g} | {method} | {float(lb_e.mean()):.4f} | {float(lb_s.mean()):.4f} | "
                        f"{float(d.mean()):.2e} | {float(d.max()):.2e} | {ce} | {cs} | {t_s / max(t_e, 1e-9):.2f}× |")
            print(rows[-1], flush=True)
    body = (
        f"`python tools/bench/rounding.py --n {args.n}` (torch {torch.__version__}, 1 thread, CPU): the margins' "
        f"lower bounds of the first {args.n} correctly classified images of the bundled MNIST sample, L∞ ball "
        "intersected with [0, 1], with the float32 rounding terms (sound for the model as onnxruntime runs it; "
        "docs/bounds.md) and without them (exact arithmetic only). Δ = exact − sound (≥ 0: the price of "
        "soundness); time = sound / exact, best of 3 each.\n\n"
        "| net | ε | method | mean lb, exact | mean lb, sound | mean Δ | max Δ | certified, exact | certified, sound | time |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    write_section(args.out, "Float rounding (cost of soundness)", body)


if __name__ == "__main__":
    main()
