"""End to end: float32 rounding must never turn into a wrong ``unsat`` or ``verified``.

A Linear(4096→1) with N(0, 1) weights, bias set so that the exact value at the maximising corner
of [0, 1]^4096 is tiny: onnxruntime's float32 sum differs from the exact one by more than that
value. A property whose threshold lies between the exact maximum and onnxruntime's value at the
corner is violated by the model as it runs; the verifier must answer ``sat`` (the counterexample
checked in onnxruntime) or ``unknown``/``timeout``, never ``unsat`` — which is what exact-arithmetic
bounds said before the rounding terms (certonnx/bounds/rounding.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

N = 4096


def _wide_model(tmp_path: Path) -> tuple[Path, float, float]:
    """(onnx path, exact max, onnxruntime value at the maximising corner), ORT above exact."""
    import onnxruntime as ort

    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        lin = nn.Linear(N, 1)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(1, N, generator=g))
            w = lin.weight.double()[0]
            corner = (w > 0).double()
            s = float((w * corner).sum())
            lin.bias.fill_(-s)
            exact = s + float(lin.bias.double())  # the bias is -s rounded to float32
        model = nn.Sequential(lin).eval()
        path = tmp_path / f"wide_{seed}.onnx"
        torch.onnx.export(model, torch.zeros(1, N), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        y = float(sess.run(None, {"x": corner.float().numpy()[None]})[0][0, 0])
        if y - exact > 1e-5 + abs(exact):
            return path, exact, y
    pytest.skip("no seed where onnxruntime's float32 sum exceeds the exact one enough")


def test_verify_never_unsat_where_onnxruntime_violates(tmp_path: Path) -> None:
    import certonnx
    from certonnx.certify.verify import verify
    from certonnx.certify.vnnlib import parse_vnnlib

    path, exact, y_ort = _wide_model(tmp_path)
    t = (max(exact, 0.0) + y_ort) / 2  # above the exact maximum, below what onnxruntime computes
    lines = [f"(declare-const X_{i} Real)" for i in range(N)] + ["(declare-const Y_0 Real)"]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 1.0))" for i in range(N)]
    lines.append(f"(assert (>= Y_0 {t!r}))")
    prop = parse_vnnlib("\n".join(lines))
    res, cex = verify(certonnx.load(path), prop, 20.0, path)
    assert res != "unsat", f"exact max {exact:.3g}, onnxruntime {y_ort:.3g}, threshold {t:.3g}"
    if res == "sat":
        assert cex is not None and float(np.asarray(cex["y"]).ravel()[0]) >= t


def test_upper_bound_covers_onnxruntime_at_the_corner(tmp_path: Path) -> None:
    import certonnx
    from certonnx.bounds import BoundedModule, InputSet

    path, exact, y_ort = _wide_model(tmp_path)
    m = certonnx.load(path)
    bm = BoundedModule(m.module, m.sample_shape)
    inset = InputSet(torch.full((1, N), 0.5), 0.5, "linf", (0.0, 1.0))
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        _, ub = bm.compute(inset, None, method)
        assert float(ub) >= y_ort >= exact - 1e-3, method
