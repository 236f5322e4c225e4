"""A fixed subset of the VNN-COMP mnist_fc and eran instances (sat and unsat) against ground truth.

A wrong answer (sat where the truth is unsat or the reverse) fails the test; so does losing the
instances that are known to be solved quickly. The full benchmark is tools/bench/vnncomp.py.
"""

from __future__ import annotations

import csv

import pytest

from certonnx.data import find_data

# (benchmark, onnx, vnnlib, must_solve): must_solve instances are settled in about a second or less
SUBSET = [
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_0_0.03.vnnlib", True),
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_1_0.03.vnnlib", True),
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_2_0.03.vnnlib", False),
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_3_0.03.vnnlib", True),
    ("mnist_fc", "onnx/mnist-net_256x2.onnx", "vnnlib/prop_4_0.03.vnnlib", True),  # needs ReLU splits
    ("mnist_fc", "onnx/mnist-net_256x4.onnx", "vnnlib/prop_1_0.03.vnnlib", True),
    # sat, missed by a fixed-step PGD from uniform starts; found by the ODS-initialised attack
    ("mnist_fc", "onnx/mnist-net_256x4.onnx", "vnnlib/prop_6_0.05.vnnlib", True),
    ("mnist_fc", "onnx/mnist-net_256x4.onnx", "vnnlib/prop_8_0.05.vnnlib", True),
    ("eran", "nets/mnist_relu_9_200.onnx", "specs/mnist/mnist_spec_idx_8098_eps_0.01500.vnnlib", True),
    ("eran", "nets/ffnnSIGMOID__Point_6x200.onnx", "specs/mnist/mnist_spec_idx_7955_eps_0.01200.vnnlib", True),
    ("eran", "nets/ffnnSIGMOID__Point_6x200.onnx", "specs/mnist/mnist_spec_idx_7259_eps_0.01200.vnnlib", False),
]
TIMEOUT = 4.0


def _truth(base, bench):
    with open(base / bench / "ground_truth.csv") as f:
        return {(r["onnx"], r["vnnlib"]): r["result"] for r in csv.DictReader(f)}


def test_vnncomp_subset_no_wrong_answers():
    base = find_data("vnncomp")
    if base is None:
        pytest.skip("shared data vnncomp/ not found: set CERTONNX_DATA or provide ../shared/data")
    import torch

    import certonnx
    from certonnx.certify.verify import verify
    from certonnx.certify.vnnlib import parse_vnnlib_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these nets are small: one thread avoids oversubscription
    try:
        models: dict[str, object] = {}
        report = []
        for bench, onnx, spec, must in SUBSET:
            truth = _truth(base, bench)[(onnx, spec)]
            path = base / bench / onnx
            if str(path) not in models:
                models[str(path)] = certonnx.load(path)
            res, cex = verify(models[str(path)], parse_vnnlib_file(base / bench / spec), TIMEOUT, path)
            report.append((bench, spec, truth, res))
            assert not (res == "unsat" and truth == "sat"), report
            assert not (res == "sat" and truth == "unsat"), report
            if res == "sat":
                assert cex is not None and cex["x"].shape == (784,)
            if must:
                assert res == truth, report
    finally:
        torch.set_num_threads(threads)
