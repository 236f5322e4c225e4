"""A final Softmax / LogSoftmax: set aside at import, certified on the logits with a margin that
covers the head's float32 rounding, written back at export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import certonnx
from certonnx.certify.core import certify_dataset
from certonnx.certify.head import HEAD_ABS, HEAD_REL
from certonnx.errors import UnsupportedOpError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(nodes: list[onnx.NodeProto], in_shape: list, out_shape: list, inits: list, opset: int = 17
           ) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _mlp_head(op: str, *, tail: str = "none", opset: int = 17, classes: int = 5, seed: int = 0) -> onnx.ModelProto:
    """x (N, 6) -> Gemm -> Relu -> Gemm -> [Reshape (N, 1, K)] -> op -> [Flatten | Reshape (N, K)]."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2, b2 = rng.standard_normal((classes, 8)).astype(np.float32), rng.standard_normal(classes).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["z"], transB=1)]
    soft_in, axis = "z", 1
    if tail == "unit-axis":  # logits (N, 1, K): the class axis is 2
        inits.append(numpy_helper.from_array(np.array([0, 1, classes], np.int64), "s3"))
        nodes.append(helper.make_node("Reshape", ["z", "s3"], ["z3"]))
        soft_in, axis = "z3", (1 if opset < 13 else 2)  # opset 11 normalizes over the axes from 1 on
    last = "out" if tail == "none" else "p"
    nodes.append(helper.make_node(op, [soft_in], [last], axis=axis))
    if tail == "flatten":
        nodes.append(helper.make_node("Flatten", ["p"], ["out"], axis=1))
    elif tail == "unit-axis":
        inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "s2"))
        nodes.append(helper.make_node("Reshape", ["p", "s2"], ["out"]))
    return _model(nodes, ["N", 6], ["N", classes], inits, opset=opset)


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize(("op", "tail", "opset"), [("Softmax", "none", 17), ("LogSoftmax", "flatten", 17),
                                                   ("Softmax", "unit-axis", 11), ("LogSoftmax", "unit-axis", 13)])
def test_head_set_aside_and_written_back(tmp_path: Path, op: str, tail: str, opset: int) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_mlp_head(op, tail=tail, opset=opset), str(src))
    cm = certonnx.load(str(src))
    assert cm.head is not None and cm.head.op == op
    assert cm.output_name == "out" and cm.num_classes == 5
    x = np.random.default_rng(1).random((7, 6)).astype(np.float32)
    with torch.no_grad():
        logits = cm.module(torch.from_numpy(x)).flatten(1).numpy()
    probs = _ort(src, x)
    # the module returns the logits: same order as the file's probabilities
    np.testing.assert_array_equal(logits.argmax(1), probs.argmax(1))
    ref = torch.from_numpy(logits.astype(np.float64))
    ref = (torch.log_softmax if op == "LogSoftmax" else torch.softmax)(ref, 1).numpy()
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)

    out = tmp_path / "exported.onnx"
    certonnx.export(cm, str(out))
    m = onnx.load(str(out))
    assert m.graph.node[-1].op_type in (op, "Flatten", "Reshape")
    assert any(n.op_type == op for n in m.graph.node[-2:])
    assert [o.name for o in m.graph.output] == ["out"]
    # onnxruntime computes the same outputs from the exported file as from the original
    np.testing.assert_allclose(_ort(out, x), probs, rtol=1e-5, atol=1e-6)
    # and its re-import finds the same head again
    again = certonnx.load(str(out))
    assert again.head is not None and again.head.op == op


def test_head_not_over_the_class_axis_stays_in_the_graph() -> None:
    # logits (N, 2, 5), softmax over the last axis: two groups of classes, not one class axis
    w = numpy_helper.from_array(np.ones((10, 6), np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, 2, 5], np.int64), "s")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1), helper.make_node("Reshape", ["z", "s"], ["z3"]),
             helper.make_node("Softmax", ["z3"], ["out"], axis=2)]
    m = _model(nodes, ["N", 6], ["N", 2, 5], [w, shape])
    from certonnx.io.head import strip_head
    from certonnx.io.passes import run_passes

    m2, _ = run_passes(m)
    assert strip_head(m2, (6,))[1] is None


def test_softmax_over_the_batch_axis_is_not_a_head(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 6), np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["z"], transB=1), helper.make_node("Softmax", ["z"], ["out"], axis=0)]
    p = tmp_path / "m.onnx"
    onnx.save(_model(nodes, ["N", 6], ["N", 4], [w]), str(p))
    cm = certonnx.load(str(p))
    assert cm.head is None
    from certonnx.bounds import BoundedModule

    with pytest.raises(UnsupportedOpError):
        BoundedModule(cm.module, cm.sample_shape)


def test_strip_head_false_keeps_it(tmp_path: Path) -> None:
    # VNN-LIB properties speak of the file's outputs (probabilities): verify keeps the head
    p = tmp_path / "m.onnx"
    onnx.save(_mlp_head("Softmax"), str(p))
    cm = certonnx.load(str(p), strip_head=False)
    assert cm.head is None
    x = torch.rand(3, 6)
    with torch.no_grad():
        np.testing.assert_allclose(cm.module(x).sum(1).numpy(), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# near ties: a logit margin the softmax's float rounding erases
# --------------------------------------------------------------------------------------------
def _near_tie_model(op: str) -> onnx.ModelProto:
    """Logits ``z0 = 1e-3``, ``z1 = 1e-3 + 1e-4·x0``, ``z2 = 1e-3 - 1``: class 1 wins by a margin
    ``1e-4·x0``, from far below what onnxruntime's float32 softmax resolves (it ties, and ArgMax
    takes class 0) to well above the head threshold. The Gemm's own rounding allowance (~1e-9)
    is below the smallest margins, so the engine alone would prove class 1 there."""
    w = np.zeros((3, 4), np.float32)
    w[1, 0] = 1e-4
    b = np.array([1e-3, 1e-3, 1e-3 - 1.0], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["z"], transB=1), helper.make_node(op, ["z"], ["p"], axis=1),
             helper.make_node("Flatten", ["p"], ["out"], axis=1)]
    return _model(nodes, ["N", 4], ["N", 3], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])


def _near_tie_data(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    x = np.full((n, 4), 0.5, np.float32)
    x[:, 0] = np.logspace(-8, 0, n).astype(np.float32)
    return x, np.ones(n, np.int64)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_near_ties_certify_no_more_than_onnxruntime_shows(tmp_path: Path, op: str, method: str) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_near_tie_model(op), str(p))
    cm = certonnx.load(str(p))
    assert cm.head is not None
    x, y = _near_tie_data()
    ort_ok = _ort(p, x).argmax(1) == y
    assert not ort_ok.all() and ort_ok.any()  # the construction does produce ties in onnxruntime

    def verified(model: object, eps: float) -> np.ndarray:
        res = certify_dataset(model, torch.from_numpy(x), torch.from_numpy(y), {"linf": eps}, method, onnx_path=p,
                              per_sample=True, progress=False)
        assert res["ort_clean_check"]["samples"] == len(x)  # the clean-prediction guard ran (ties excused)
        return np.array([s == "verified" for s in res["per_sample"]["linf"]])

    for eps in (0.0, 1e-7):
        ver = verified(cm, eps)
        assert not (ver & ~ort_ok).any(), f"certified {int((ver & ~ort_ok).sum())} samples onnxruntime misclassifies"
        # with ε > 0 every point of the ball must be classified right too: its corners and random points
        if eps > 0:
            rng = np.random.default_rng(0)
            for _ in range(8):
                pts = np.clip(x + eps * rng.choice([-1.0, 1.0], size=x.shape), 0, 1).astype(np.float32)
                assert (_ort(p, pts).argmax(1)[ver] == 1).all()
        gap = 1e-4 * x[:, 0].astype(np.float64)
        # not vacuous: margins well above the threshold (1e-5 + 2^-20 · ~1) are certified
        assert ver[gap > 4 * (HEAD_ABS + HEAD_REL)].all()
    # and the threshold is what prevents the overclaim: without the head, the bounds alone
    # prove class 1 where onnxruntime's softmax ties and returns class 0
    plain = verified(dataclasses.replace(cm, head=None), 0.0)
    assert (plain & ~ort_ok).any()


def test_near_ties_radius_and_lipschitz(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_near_tie_model("Softmax"), str(p))
    cm = certonnx.load(str(p))
    x, y = _near_tie_data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    ort_ok = _ort(p, x).argmax(1) == y
    from certonnx.bounds import BoundedModule
    from certonnx.certify.lipschitz_cert import certify_lipschitz, lipschitz_radii
    from certonnx.certify.radius import certified_radius

    bm = BoundedModule(cm.module, cm.sample_shape)
    for head in (cm.head, None):
        radii = {"crown": certified_radius(bm, xt, yt, "linf", 1e-6, "crown", head=head),
                 "lipschitz": lipschitz_radii(bm, xt, yt, "linf", head=head, domain=(0.0, 1.0))}
        for method, r in radii.items():
            over = (r.numpy() > 0) & ~ort_ok
            if head is not None:
                # a positive certified radius only where onnxruntime classifies right
                assert not over.any(), method
                assert (r.numpy() > 0).any(), method
            else:  # without the threshold both would claim samples onnxruntime gets wrong
                assert over.any(), method
    res = certify_lipschitz(cm, xt, yt, {"linf": 0.0}, onnx_path=p)
    assert res["certified_accuracy"]["linf"] <= ort_ok.mean()
    assert res["head"] == "Softmax (certified on the logits before it)"


def test_reports_name_the_head(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_near_tie_model("Softmax"), str(p))
    x, y = _near_tie_data()
    np.savez(tmp_path / "d.npz", x_test=x, y_test=y)
    from certonnx.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "m.onnx", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["head"] == "Softmax (certified on the logits before it)"
    assert {o["op"]: o["support"] for o in info["ops"]}["Softmax"] == "head"
    assert main(["inspect", "m.onnx"]) == 0
    assert "Softmax (certified on the logits before it)" in capsys.readouterr().out
    assert main(["certify", "m.onnx", "--data", "d.npz", "--norm", "linf:0", "--method", "crown",
                 "--json", "r.json", "-o", "c.onnx"]) == 0
    assert "certified on the logits before it" in capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["head"] == "Softmax (certified on the logits before it)"
    from certonnx.io.metadata import read_certificate

    cert = read_certificate(str(tmp_path / "c.onnx"))
    assert cert is not None and cert["extra"]["head"] == res["head"] and cert["weights_match"]
    assert [n.op_type for n in onnx.load(str(tmp_path / "c.onnx")).graph.node][-2:] == ["Softmax", "Flatten"]
    np.testing.assert_allclose(_ort(tmp_path / "c.onnx", x), _ort(p, x), rtol=0, atol=0)
