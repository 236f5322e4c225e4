"""ONNX import: every fixture loads with parity, each import pass does what it says, input
normalization is found, VNN-COMP networks work with batch > 1."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from certonnx.errors import CertonnxError, ModelLoadError, ParityError
from certonnx.io import load
from certonnx.io import passes as P
from certonnx.io.load import parity
from certonnx.io.normalization import detect_normalization, prepend_normalization
from tests.paths import FIXTURES

FIX = FIXTURES
FIXTURES = sorted(p.name for p in FIX.glob("*.onnx"))


def shared_data() -> Path | None:
    env = os.environ.get("CERTONNX_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base if base.is_dir() else None


def ort_run(model: onnx.ModelProto | str | Path, x: np.ndarray) -> np.ndarray:
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    sess = P.ort_session(m.SerializeToString())
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0])


def make_model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def fvi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const(arr, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


# --------------------------------------------------------------------------------------------
# every fixture
# --------------------------------------------------------------------------------------------
def test_fixture_list_complete() -> None:
    expected = {
        "mlp_ts.onnx", "mlp_dynamo.onnx", "cnn_ts.onnx", "cnn_dynamo.onnx", "cnn_norm_ts.onnx",
        "reshape_allowzero.onnx", "shape_chain.onnx", "external_data.onnx",
        "mnist_mlp_trained.onnx", "mnist_cnn_trained.onnx", "keras_cnn.onnx",
    }
    assert expected <= set(FIXTURES)
    total = sum(p.stat().st_size for p in FIX.iterdir() if p.is_file())
    assert total < 4.5 * 2**20


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_imports_with_parity(name: str) -> None:
    path = FIX / name
    m = load(path, n_parity=4)
    assert m.parity_max_abs_diff is not None and m.parity_max_abs_diff < 1e-4
    assert m.input_shape[0] is None and m.output_shape[0] is None
    assert m.num_classes == 10
    assert m.onnx_ops and sum(m.onnx_ops.values()) >= 3
    assert m.opset >= 7 and m.producer
    # batch 3 (not used by the parity gate) agrees with onnxruntime on the original file
    x = np.random.default_rng(1).random((3, *m.sample_shape)).astype(np.float32)
    with torch.no_grad():
        out = m.module(torch.from_numpy(x)).numpy()
    ref = ort_run(path, x)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
    # weights are trainable and gradients reach all of them
    params = list(m.module.parameters())
    assert params
    m.module.zero_grad()
    m.module(torch.from_numpy(x)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)


def test_file_never_modified(tmp_path: Path) -> None:
    from certonnx.utils import sha256_file

    before = {n: sha256_file(FIX / n) for n in ("cnn_dynamo.onnx", "external_data.onnx", "external_data.onnx.data")}
    load(FIX / "cnn_dynamo.onnx", n_parity=2)
    load(FIX / "external_data.onnx", n_parity=2)
    assert before == {n: sha256_file(FIX / n) for n in before}


def test_records_metadata() -> None:
    m = load(FIX / "cnn_dynamo.onnx", check_parity=False)
    assert m.parity_max_abs_diff is None
    assert m.opset >= 18  # the ORIGINAL opset is reported, not the converted one
    assert m.onnx_ops.get("Conv") == 3 and m.onnx_ops.get("BatchNormalization") == 1
    assert m.producer.startswith("pytorch")
    assert m.source_path and m.source_path.endswith("cnn_dynamo.onnx")
    assert m.input_name == "input" and m.output_name == "logits"


def test_domain_is_recorded_and_used() -> None:
    m = load(FIX / "mlp_ts.onnx", domain=(-1.0, 2.0), n_parity=2)
    assert m.domain == (-1.0, 2.0)


def test_cnn_weights_are_parameters() -> None:
    m = load(FIX / "cnn_ts.onnx", check_parity=False)
    n_params = sum(p.numel() for p in m.module.parameters())
    # conv1 4*1*9+4, bn 4+4, conv2 4*4*9+4, conv3 4*4+4, fc 392*10+10
    assert n_params == 40 + 8 + 148 + 20 + 3930


def test_matmul_weights_become_parameters_but_shapes_do_not() -> None:
    m = load(FIX / "shape_chain.onnx", check_parity=False)
    shapes = sorted(tuple(p.shape) for p in m.module.parameters())
    assert shapes == [(10,), (16,), (16, 10), (196, 16)]
    assert all(not torch.is_floating_point(b) or b.numel() <= 1 for b in m.module.buffers())


# --------------------------------------------------------------------------------------------
# passes, one by one
# --------------------------------------------------------------------------------------------
def test_convert_opset_down_from_20() -> None:
    src = onnx.load(str(FIX / "cnn_dynamo.onnx"))
    assert P.main_opset(src) >= 19
    out = P.convert_opset(src)
    assert P.main_opset(out) == 17
    onnx.checker.check_model(out)
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x), ort_run(src, x), atol=1e-6)
    same = onnx.load(str(FIX / "cnn_ts.onnx"))
    assert P.convert_opset(same) is same  # opset 17: untouched


def test_convert_opset_up_from_6(tmp_path: Path) -> None:
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])],
        "g", [fvi("x", [1, 4])], [fvi("y", [1, 3])],
        [const(np.ones((3, 4), np.float32), "w"), const(np.ones(3, np.float32), "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)])
    m.ir_version = 4
    assert P.main_opset(P.convert_opset(m)) == 9
    onnx.save(m, str(tmp_path / "op6.onnx"))
    cm = load(tmp_path / "op6.onnx", n_parity=2)
    assert cm.opset == 6 and cm.input_shape == (None, 4)
    with torch.no_grad():
        np.testing.assert_allclose(cm.module(torch.ones(3, 4)).numpy(), np.full((3, 3), 5.0), atol=1e-6)


def test_fix_reshape_allowzero() -> None:
    src = onnx.load(str(FIX / "reshape_allowzero.onnx"))
    (rs,) = [n for n in src.graph.node if n.op_type == "Reshape"]
    assert [a.i for a in rs.attribute if a.name == "allowzero"] == [1]
    out = P.fix_reshape_allowzero(src)
    (rs,) = [n for n in out.graph.node if n.op_type == "Reshape"]
    assert not [a for a in rs.attribute if a.name == "allowzero" and a.i == 1]
    # a shape with a 0 entry means something else under allowzero=1: must stay
    m = make_model(
        [helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)],
        [fvi("x", ["N", 4])], [fvi("y", None)], [const(np.array([0, 4], dtype=np.int64), "s")],
    )
    (rs,) = P.fix_reshape_allowzero(m).graph.node
    assert [a.i for a in rs.attribute if a.name == "allowzero"] == [1]


def test_remove_identity_and_dropout() -> None:
    src = onnx.load(str(FIX / "shape_chain.onnx"))
    out = P.remove_identity(src)
    ops = [n.op_type for n in out.graph.node]
    assert "Identity" not in ops and "Dropout" not in ops
    x = np.random.default_rng(0).random((2, 1, 14, 14)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x), ort_run(src, x), atol=1e-6)


def test_remove_identity_on_graph_output() -> None:
    m = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])],
        [fvi("x", ["N", 3])], [fvi("y", ["N", 3])],
    )
    out = P.remove_identity(m)
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert out.graph.node[0].output[0] == "y"
    onnx.checker.check_model(out)


def test_constants_to_initializers() -> None:
    m = make_model(
        [
            helper.make_node("Constant", [], ["c"], value=const(np.ones((3,), np.float32), "v")),
            helper.make_node("Constant", [], ["f"], value_float=2.0),
            helper.make_node("Add", ["x", "c"], ["a"]),
            helper.make_node("Mul", ["a", "f"], ["y"]),
        ],
        [fvi("x", ["N", 3])], [fvi("y", ["N", 3])],
    )
    out = P.constants_to_initializers(m)
    assert [n.op_type for n in out.graph.node] == ["Add", "Mul"]
    assert sorted(t.name for t in out.graph.initializer) == ["c", "f"]
    x = np.random.default_rng(0).random((2, 3)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x), (x + 1) * 2, atol=1e-6)


def test_fold_shape_chains_keeps_batch_dynamic() -> None:
    src = onnx.load(str(FIX / "shape_chain.onnx"))
    out = P.fold_shape_chains(src)
    ops = [n.op_type for n in out.graph.node]
    for op in ("Shape", "Gather", "Unsqueeze", "Concat", "Cast"):
        assert op not in ops
    (rs,) = [n for n in out.graph.node if n.op_type == "Reshape"]
    shape = numpy_helper.to_array({t.name: t for t in out.graph.initializer}[rs.input[1]])
    assert shape.tolist() == [0, -1]  # 0: copy the batch
    for b in (1, 5):
        x = np.random.default_rng(b).random((b, 1, 14, 14)).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, x), ort_run(src, x), atol=1e-6)


def test_fold_shape_chains_jax_export() -> None:
    path = FIX / "jax_mlp.onnx"
    if not path.exists():
        pytest.skip("jax fixture not generated (jax2onnx not installed when fixtures were made)")
    src = P.convert_opset(onnx.load(str(path)))
    out = P.fold_shape_chains(P.constants_to_initializers(src))
    assert "Shape" not in [n.op_type for n in out.graph.node]


def test_keras_tf2onnx_nhwc_cnn() -> None:
    """tf2onnx output of a Keras CNN: the NHWC input stays NHWC, the Slice-based Flatten chain folds
    to ``Reshape(0, -1)`` with a dynamic batch, the model still classifies MNIST (a wrong layout would
    not), and the bound engine bounds it soundly."""
    from certonnx.bounds import BoundedModule, InputSet

    path = FIX / "keras_cnn.onnx"
    src = onnx.load(str(path))
    assert src.producer_name == "tf2onnx"
    out = P.fold_shape_chains(P.constants_to_initializers(src))
    ops = [n.op_type for n in out.graph.node]
    assert not {"Shape", "Gather", "Slice", "Cast", "Concat"} & set(ops)
    for b in (1, 5):
        x = np.random.default_rng(b).random((b, 28, 28, 1)).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, x), ort_run(src, x), atol=1e-6)

    m = load(path, n_parity=4)
    assert m.sample_shape == (28, 28, 1) and m.num_classes == 10
    assert m.onnx_ops["Transpose"] == 1 and m.onnx_ops["Slice"] == 1
    d = np.load(FIX / "mnist_200.npz")
    x = torch.from_numpy(d["x_test"].astype(np.float32) / 255.0)[..., None]
    with torch.no_grad():
        acc = (m.module(x).argmax(1).numpy() == d["y_test"]).mean()
    assert acc >= 0.5  # 0.59 when generated; a transposed H/W layout drops to chance

    bm = BoundedModule(m.module, m.sample_shape)
    x0, eps = x[:4], 0.01
    lb, ub = bm.compute(InputSet(x0, eps), None, "crown")
    assert lb.shape == ub.shape == (4, 10) and bool((ub - lb).max() < 5.0)
    g = torch.Generator().manual_seed(0)
    pts = (x0[None] + (torch.rand(64, *x0.shape, generator=g) * 2 - 1) * eps).clamp(0.0, 1.0)
    with torch.no_grad():
        y = m.module(pts.reshape(-1, *m.sample_shape)).reshape(64, 4, 10)
    assert bool((y >= lb.detach() - 1e-5).all() and (y <= ub.detach() + 1e-5).all())


def test_make_batch_dynamic_rewrites_fixed_reshape() -> None:
    # exported at batch 1 with a batch-fixed reshape constant [1, 12]
    m = make_model(
        [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])],
        [fvi("x", [1, 3, 4])], [fvi("y", [1, 2])],
        [const(np.array([1, 12], np.int64), "s"),
         const(np.random.default_rng(0).standard_normal((12, 2)).astype(np.float32), "w")],
    )
    out, fixed = P.make_batch_dynamic(m)
    assert fixed == 1
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == P.BATCH_DIM
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == P.BATCH_DIM
    x = np.random.default_rng(1).random((4, 3, 4)).astype(np.float32)
    per_sample = np.concatenate([ort_run(m, x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(ort_run(out, x), per_sample, atol=1e-6)


def test_make_batch_dynamic_leaves_weight_reshapes() -> None:
    # a reshape of a weight (not of the input) with leading 1 must not be touched
    m = make_model(
        [helper.make_node("Reshape", ["b", "s"], ["b2"]), helper.make_node("Add", ["x", "b2"], ["y"])],
        [fvi("x", [1, 3])], [fvi("y", [1, 3])],
        [const(np.array([1, 3], np.int64), "s"), const(np.ones(3, np.float32), "b")],
    )
    out, _ = P.make_batch_dynamic(m)
    (rs,) = [n for n in out.graph.node if n.op_type == "Reshape"]
    assert rs.input[1] == "s"


def test_select_float_output_drops_labels() -> None:
    m = make_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0)],
        [fvi("x", ["N", 3])], [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), fvi("y", ["N", 3])],
    )
    out = P.select_float_output(m)
    assert [o.name for o in out.graph.output] == ["y"]
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    two = make_model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
                     [fvi("x", ["N", 3])], [fvi("y", ["N", 3]), fvi("z", ["N", 3])])
    with pytest.raises(ModelLoadError, match="2 outputs"):
        P.select_float_output(two)


def test_gemm_bias_and_max_zero() -> None:
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    m = make_model(
        [helper.make_node("Gemm", ["x", "w", "c"], ["g"], beta=0.5),
         helper.make_node("Max", ["g", "z"], ["y"])],
        [fvi("x", ["N", 4])], [fvi("y", ["N", 3])],
        [const(w, "w"), const(np.array([[1.0, 2.0, 3.0]], np.float32), "c"), const(np.array(0.0, np.float32), "z")],
    )
    out = P.max_zero_to_relu(P.normalize_gemm_bias(m))
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Relu"]
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits[out.graph.node[0].input[2]].shape == (3,)
    x = np.random.default_rng(1).random((2, 4)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, x), ort_run(m, x), atol=1e-6)


def test_check_single_float_input() -> None:
    good = make_model([helper.make_node("Relu", ["x"], ["y"])], [fvi("x", ["N", 3])], [fvi("y", ["N", 3])])
    assert P.check_single_float_input(good).name == "x"
    # initializers listed as inputs (old exporters) do not count
    old = make_model([helper.make_node("Add", ["x", "b"], ["y"])], [fvi("x", ["N", 3]), fvi("b", [3])],
                     [fvi("y", ["N", 3])], [const(np.ones(3, np.float32), "b")])
    assert P.check_single_float_input(old).name == "x"
    assert [i.name for i in P.remove_initializer_inputs(old).graph.input] == ["x"]


def test_run_passes_notes() -> None:
    _, notes = P.run_passes(onnx.load(str(FIX / "cnn_dynamo.onnx")))
    assert any("opset" in n for n in notes)
    _, notes = P.run_passes(onnx.load(str(FIX / "shape_chain.onnx")))
    assert any("folded" in n for n in notes)


# --------------------------------------------------------------------------------------------
# normalization
# --------------------------------------------------------------------------------------------
def test_detect_normalization_sub_div() -> None:
    m = load(FIX / "cnn_norm_ts.onnx", n_parity=2)
    assert m.normalization is not None and m.normalization.inside
    assert m.normalization.mean == pytest.approx([0.1307]) and m.normalization.std == pytest.approx([0.3081])
    assert "0.1307" in m.input_space()["description"]
    # normalization constants are frozen, not trained
    for p in m.module.parameters():
        assert p.numel() > 1


def test_no_normalization_in_plain_models() -> None:
    assert load(FIX / "mlp_ts.onnx", check_parity=False).normalization is None


def test_detect_per_channel_affine_mul_add() -> None:
    # y = x * (1/std) + (-mean/std) per channel, written as Mul then Add, constant first in Add
    mean = np.array([0.5, 0.4, 0.3], np.float32)
    std = np.array([0.2, 0.25, 0.5], np.float32)
    m = make_model(
        [helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Add", ["b", "a"], ["n"]),
         helper.make_node("Relu", ["n"], ["y"])],
        [fvi("x", ["N", 3, 2, 2])], [fvi("y", ["N", 3, 2, 2])],
        [const((1 / std).reshape(1, 3, 1, 1), "s"), const((-mean / std).reshape(3, 1, 1), "b")],
    )
    found = detect_normalization(m)
    assert found is not None
    np.testing.assert_allclose(found.normalization.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(found.normalization.std, std, rtol=1e-5)
    assert sorted(found.constants) == ["b", "s"]


def test_detect_normalization_rejects_non_channel_or_shared_input() -> None:
    # constant varying along the width: not a per-channel normalization
    m = make_model(
        [helper.make_node("Sub", ["x", "c"], ["y"])], [fvi("x", ["N", 1, 2, 2])], [fvi("y", ["N", 1, 2, 2])],
        [const(np.array([[[[0.1, 0.2]]]], np.float32), "c")],
    )
    assert detect_normalization(m) is None
    # the raw input is also used elsewhere: not a normalization in front
    m2 = make_model(
        [helper.make_node("Sub", ["x", "c"], ["a"]), helper.make_node("Add", ["a", "x"], ["y"])],
        [fvi("x", ["N", 2])], [fvi("y", ["N", 2])], [const(np.array(0.5, np.float32), "c")],
    )
    assert detect_normalization(m2) is None


def test_identity_normalization_reported() -> None:
    m = make_model(
        [helper.make_node("Sub", ["x", "z"], ["a"]), helper.make_node("Div", ["a", "o"], ["y"])],
        [fvi("x", ["N", 1, 2, 2])], [fvi("y", ["N", 1, 2, 2])],
        [const(np.zeros((1, 1, 1, 1), np.float32), "z"), const(np.ones((1, 1, 1, 1), np.float32), "o")],
    )
    found = detect_normalization(m)
    assert found is not None and found.is_identity
    assert found.normalization.mean == [0.0] and found.normalization.std == [1.0]


def test_prepend_normalization() -> None:
    m = load(FIX / "cnn_ts.onnx", check_parity=False)
    wrapped = prepend_normalization(m, 0.1307, 0.3081)
    assert wrapped.normalization is not None and not wrapped.normalization.inside
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(wrapped.module(x).numpy(), m.module((x - 0.1307) / 0.3081).numpy(), atol=1e-5)
    assert sum(p.numel() for p in wrapped.module.parameters()) == sum(p.numel() for p in m.module.parameters())
    assert m.normalization is None  # the original is untouched
    with pytest.raises(CertonnxError, match="channels"):
        prepend_normalization(m, [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    with pytest.raises(CertonnxError, match="positive"):
        prepend_normalization(m, 0.0, 0.0)


# --------------------------------------------------------------------------------------------
# parity gate
# --------------------------------------------------------------------------------------------
def test_parity_error_names_the_diverging_node() -> None:
    m = load(FIX / "cnn_ts.onnx", check_parity=False)
    src, _ = P.run_passes(onnx.load(str(FIX / "cnn_ts.onnx")))
    # corrupt the torch side of the second conv
    convs = [n for n in m.module.graph.nodes if n.meta.get("onnx_op_type") == "Conv"]
    target = m.module.get_submodule(convs[1].target)
    with torch.no_grad():
        target.weight.add_(0.5)
    with pytest.raises(ParityError, match=repr(convs[1].meta["onnx_node"])):
        parity(src, m.module, m.sample_shape, (0.0, 1.0), n=2)


# --------------------------------------------------------------------------------------------
# VNN-COMP networks
# --------------------------------------------------------------------------------------------
VNN = [
    "vnncomp/mnist_fc/onnx/mnist-net_256x2.onnx",
    "vnncomp/eran/nets/mnist_relu_9_200.onnx",
    "vnncomp/eran/nets/ffnnSIGMOID__Point_6x200.onnx",
]


@pytest.mark.parametrize("rel", VNN)
def test_vnncomp_batch(rel: str) -> None:
    base = shared_data()
    if base is None or not (base / rel).is_file():
        pytest.skip(f"VNN-COMP data not found ({rel} under $CERTONNX_DATA or ../shared/data)")
    path = base / rel
    m = load(path, n_parity=4)
    assert m.parity_max_abs_diff < 1e-4
    x = np.random.default_rng(0).random((5, *m.sample_shape)).astype(np.float32)
    # the file itself is batch-1 only: compare with one onnxruntime call per sample
    ref = np.concatenate([ort_run(path, x[i : i + 1]) for i in range(5)])
    with torch.no_grad():
        out = m.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-3)
    if "eran" in rel:
        assert m.normalization is not None
    if "SIGMOID" in rel:
        assert m.normalization.mean == pytest.approx([0.1307])
    if "mnist_fc" in rel:
        assert m.sample_shape == (784, 1) and m.input_name == "0"


def test_loading_does_not_import_torchvision_and_it_still_imports_after() -> None:
    """onnx2torch imports torchvision (NMS, RoiAlign converters), ~1.6 s of torch._dynamo at
    start-up; certonnx defers it (certonnx.io.onnx2torch_import). In a fresh process: loading
    a model leaves torchvision unimported, a later ``import torchvision`` is the real package,
    and onnx2torch's deferred functions reach it."""
    import subprocess
    import sys

    fix = Path(__file__).parent / "fixtures" / "mnist_mlp_trained.onnx"
    code = (
        "import sys, certonnx\n"
        f"certonnx.load({str(fix)!r})\n"
        "assert 'torchvision' not in sys.modules, 'torchvision imported at load'\n"
        "import torchvision, torch\n"
        "assert hasattr(torchvision, '__version__') and torchvision.ops.nms.__module__.startswith('torchvision')\n"
        "from onnx2torch.node_converters import nms\n"
        "b = torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.]]); s = torch.tensor([0.9, 0.8])\n"
        "assert nms.torchvision.ops.nms(b, s, 0.5).tolist() == [0]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
