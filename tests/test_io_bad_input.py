"""Bad inputs give one ``error:`` line (no traceback), a non-zero exit, and the input files are
left byte-identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from certonnx.cli import main
from certonnx.errors import ModelLoadError, OutputPathError, UnsupportedOpError
from certonnx.io import export, load
from certonnx.utils import sha256_file
from tests.paths import FIXTURES

FIX = FIXTURES


def _save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 8
    return m


def f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def make_bad(kind: str, d: Path) -> Path:
    """Write one kind of bad model into ``d``; returns its path."""
    if kind == "missing":
        return d / "does_not_exist.onnx"
    if kind == "directory":
        (d / "adir.onnx").mkdir()
        return d / "adir.onnx"
    if kind == "not_onnx":
        (d / "text.onnx").write_text("this is not an ONNX model\n")
        return d / "text.onnx"
    if kind == "empty":
        (d / "empty.onnx").write_bytes(b"")
        return d / "empty.onnx"
    if kind == "truncated":
        data = (FIX / "cnn_ts.onnx").read_bytes()
        (d / "trunc.onnx").write_bytes(data[: len(data) // 2])
        return d / "trunc.onnx"
    if kind == "missing_external":
        shutil.copy(FIX / "external_data.onnx", d / "ext.onnx")  # without its .data file
        return d / "ext.onnx"
    if kind == "two_inputs":
        return _save(_model([helper.make_node("Add", ["a", "b"], ["y"])], [f32("a", ["N", 4]), f32("b", ["N", 4])],
                            [f32("y", ["N", 4])]), d / "two.onnx")
    if kind == "int_input":
        return _save(_model([helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)],
                            [helper.make_tensor_value_info("a", TensorProto.INT64, ["N", 4])], [f32("y", ["N", 4])]),
                     d / "int.onnx")
    if kind == "custom_op":
        return _save(_model([helper.make_node("FooBar", ["a"], ["y"], domain="com.example", name="foo_node")],
                            [f32("a", ["N", 4])], [f32("y", ["N", 4])], opsets=(("", 17), ("com.example", 1))),
                     d / "foobar.onnx")
    if kind == "no_converter":  # a standard op onnx2torch has no converter for
        return _save(_model([helper.make_node("Hardmax", ["a"], ["y"], name="hardmax_node")],
                            [f32("a", ["N", 4])], [f32("y", ["N", 4])]), d / "hardmax.onnx")
    if kind == "checker":  # a node reading a value nobody produces
        return _save(_model([helper.make_node("Relu", ["zz"], ["y"], name="r")], [f32("a", ["N", 4])],
                            [f32("y", ["N", 4])]), d / "checker.onnx")
    if kind == "symbolic_sample_dim":
        return _save(_model([helper.make_node("Relu", ["a"], ["y"])], [f32("a", ["N", "W"])], [f32("y", ["N", "W"])]),
                     d / "symbolic.onnx")
    raise ValueError(kind)


CASES = {
    "missing": "not found",
    "directory": "not a file",
    "not_onnx": "not an ONNX model",
    "empty": "empty",
    "truncated": "not an ONNX model",
    "missing_external": "external_data.onnx.data",
    "two_inputs": "2 inputs",
    "int_input": "INT64",
    "custom_op": "FooBar",
    "no_converter": "Hardmax",
    "checker": "checker",
    "symbolic_sample_dim": "only the batch",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_cli_one_line_error(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_bad(kind, tmp_path)
    before = {p: sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}
    rc = main(["inspect", str(path)])
    cap = capsys.readouterr()
    assert rc != 0
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error: ")
    assert CASES[kind] in lines[0]
    assert "Traceback" not in cap.err + cap.out
    assert before == {p: sha256_file(p) for p in tmp_path.rglob("*") if p.is_file()}


def test_unsupported_op_names_op_and_node(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedOpError) as ei:
        load(make_bad("no_converter", tmp_path))
    assert ei.value.op == "Hardmax" and ei.value.node == "hardmax_node"
    with pytest.raises(UnsupportedOpError) as ei:
        load(make_bad("custom_op", tmp_path))
    assert "FooBar" in ei.value.op and "foo_node" in (ei.value.node or "")


def test_allowzero_with_zero_is_named(tmp_path: Path) -> None:
    # Reshape(allowzero=1) with a 0 in the shape has no torch converter: name it, no traceback
    m = _model([helper.make_node("Reshape", ["a", "s"], ["y"], allowzero=1, name="rz")], [f32("a", ["N", 4])],
               [f32("y", ["N", 4])], [numpy_helper.from_array(np.array([-1, 4], np.int64), "s")])
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([0, 4], np.int64), "s"))
    with pytest.raises(UnsupportedOpError, match="Reshape"):
        load(_save(m, tmp_path / "rz.onnx"))


def test_missing_external_data_message(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"external_data\.onnx\.data"):
        load(make_bad("missing_external", tmp_path))


def test_fixed_batch_model_that_cannot_be_made_dynamic(tmp_path: Path) -> None:
    # concatenating a constant batch-1 tensor: the graph only runs at batch 1 -> clear error
    m = _model(
        [helper.make_node("Concat", ["a", "c"], ["y"], axis=1)],
        [f32("a", [1, 4])], [f32("y", [1, 6])], [numpy_helper.from_array(np.ones((1, 2), np.float32), "c")],
    )
    with pytest.raises(ModelLoadError, match="batch of 2"):
        load(_save(m, tmp_path / "fixed.onnx"))


def test_unwritable_output_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = load(FIX / "mlp_ts.onnx", check_parity=False)
    with pytest.raises(OutputPathError) as ei:
        export(m, tmp_path / "no" / "such" / "dir" / "m.onnx")
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "no").exists()
