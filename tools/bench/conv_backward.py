"""The convolution's CROWN step on CPU: certonnx's pull-back against autograd's convolution
backward, per layer shape, in one run.

    python tools/bench/conv_backward.py [--repeat 3] [--threads 1] [--no-write]

A CROWN pass pulls thousands of backward rows through each convolution at once (one row per
unstable neuron of a later layer, times the batch), so the step is a transposed convolution
on a batch of ``rows`` A matrices. For each shape (the first layers of cnn3 and CNN7 on MNIST,
a CIFAR first layer, CNN7's inner layers) the table gives the seconds of
``torch.nn.grad.conv2d_input`` (autograd's backward: what the engine used before), of the plain
transposed convolution, and of :func:`certonnx.bounds.rules.linear.conv_input_grad` (what
the engine uses: matmul + fold for few taps, channels-last transposed convolution otherwise),
the largest difference of its result from autograd's, and the speed-up. Writes the
'## Conv pull-back' section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from certonnx.allocator import tune_allocator  # noqa: E402
from certonnx.bounds.rules.linear import FOLD_TAPS, conv_input_grad  # noqa: E402
from tools.bench.common import write_section  # noqa: E402

# (label, rows, C_in, C_out, H, kernel, stride, padding)
SHAPES = [
    ("cnn3 conv1 (MNIST)", 25000, 1, 8, 28, 5, 2, 2),
    ("cnn3 conv2", 4000, 8, 16, 14, 4, 2, 1),
    ("CNN7 conv1 (MNIST)", 1000, 1, 64, 28, 3, 1, 1),
    ("CIFAR conv1", 1000, 3, 64, 32, 3, 1, 1),
    ("CNN7 conv2", 2000, 64, 64, 28, 3, 1, 1),
    ("CNN7 conv3 (stride 2)", 2000, 64, 128, 28, 3, 2, 1),
    ("CNN7 conv4", 2000, 128, 128, 14, 3, 1, 1),
]


def _time(f: Callable[[], torch.Tensor], repeat: int) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t0) / repeat


def _measure(label: str, n: int, cin: int, cout: int, h: int, k: int, s: int, p: int, repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(cout, cin, k, k, generator=g)
    ho = (h + 2 * p - k) // s + 1
    A = torch.randn(n, cout, ho, ho, generator=g)
    in_shape = (cin, h, h)
    out_pad = h - ((ho - 1) * s - 2 * p + k)
    ref = nn_grad.conv2d_input((n, *in_shape), w, A, (s, s), (p, p))
    got = conv_input_grad(in_shape, w, A, (s, s), (p, p), (1, 1), 1)
    t_ref = _time(lambda: nn_grad.conv2d_input((n, *in_shape), w, A, (s, s), (p, p)), repeat)
    t_tr = _time(lambda: F.conv_transpose2d(A, w, None, s, p, out_pad), repeat)
    t_new = _time(lambda: conv_input_grad(in_shape, w, A, (s, s), (p, p), (1, 1), 1), repeat)
    print(f"{label}: {t_ref:.3f} s -> {t_new:.3f} s ({t_ref / t_new:.2f}x)", file=sys.stderr, flush=True)
    return {"label": label, "rows": n, "shape": f"{cin}→{cout}, {h}×{h}, k{k} s{s}",
            "path": "matmul + fold" if cin * k * k <= FOLD_TAPS else "channels-last",
            "autograd": t_ref, "conv_t": t_tr, "certonnx": t_new,
            "rel": float((got - ref).abs().max() / ref.abs().max())}


def run(repeat: int) -> list[dict]:
    return [_measure(*shape, repeat=repeat) for shape in SHAPES]


def to_markdown(rows: list[dict], repeat: int) -> str:
    lines = [f"Measured by `python tools/bench/conv_backward.py --repeat {repeat}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), CPU, float32). Seconds per pull-back of `rows` A matrices "
             "through one convolution; the engine used autograd's backward before.", "",
             "| layer | rows | C_in→C_out, input, kernel | certonnx path | autograd backward s | transposed conv s "
             "| certonnx s | speed-up | max rel. difference |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['rows']} | {r['shape']} | {r['path']} | {r['autograd']:.3f} | "
                     f"{r['conv_t']:.3f} | {r['certonnx']:.3f} | **{r['autograd'] / r['certonnx']:.2f}×** | "
                     f"{r['rel']:.1e} |")
    lines += ["", "The differences are float32 summation order only (the same products, summed in another order); "
              "the bounds' soundness does not depend on that order (docs/bounds.md, float rounding)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios)")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md alone")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tune_allocator()  # as the certonnx command runs
    body = to_markdown(run(a.repeat), a.repeat)
    print(body)
    if not a.no_write:
        write_section(a.out, "Conv pull-back (cpu)", body)


if __name__ == "__main__":
    main()
