"""ONNX export: round trips, certificate metadata readable by plain onnxruntime, parity gate,
atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from certonnx import __version__
from certonnx.errors import ExportError, OutputPathError
from certonnx.io import export, load, make_certificate, read_certificate
from certonnx.io.metadata import SCHEMA, graph_fingerprint, weights_fingerprint
from certonnx.io.normalization import prepend_normalization
from tests.paths import FIXTURES

FIX = FIXTURES
FIXTURES = sorted(p.name for p in FIX.glob("*.onnx"))


def cert(**kw) -> dict:
    args = dict(
        norms={"linf": 0.1, "l2": 0.5},
        input_space={"domain": [0.0, 1.0], "normalization": None, "description": "raw inputs in [0, 1]"},
        method="crown",
        verifier="crown",
        dataset_sha256="ab" * 32,
        n=100,
        clean_accuracy=0.98,
        certified_accuracy={"linf": 0.9, "l2": 0.85},
        union_certified_accuracy=0.8,
        pgd_accuracy={"linf": 0.93, "l2": 0.9},
    )
    args.update(kw)
    return make_certificate(**args)


@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip(name: str, tmp_path: Path) -> None:
    m = load(FIX / name, n_parity=2)
    out = export(m, tmp_path / "out.onnx", n_parity=2)
    assert out == tmp_path / "out.onnx" and out.is_file()
    m2 = load(out, n_parity=2)
    x = torch.rand(4, *m.sample_shape)
    with torch.no_grad():
        np.testing.assert_allclose(m2.module(x).numpy(), m.module(x).numpy(), atol=1e-5, rtol=1e-5)
    assert m2.input_name == m.input_name and m2.output_name == m.output_name
    assert m2.sample_shape == m.sample_shape
    assert (m2.normalization is None) == (m.normalization is None)
    onx = onnx.load(str(out))
    assert [o.version for o in onx.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dim0 = onx.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")  # batch-dynamic


def test_certificate_readable_by_onnxruntime(tmp_path: Path) -> None:
    m = load(FIX / "cnn_norm_ts.onnx", n_parity=2)
    c = cert(input_space=m.input_space(), extra={"note": "test"})
    p = export(m, tmp_path / "robust.onnx", c)
    meta = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["certonnx.version"] == __version__
    stored = json.loads(meta["certonnx.certificate"])
    assert stored["schema"] == SCHEMA
    assert stored["norms"] == {"linf": 0.1, "l2": 0.5}
    assert stored["certified_accuracy"]["l2"] == 0.85
    assert stored["input_space"]["normalization"]["mean"] == pytest.approx([0.1307])
    assert stored["weights_sha256"] == weights_fingerprint(onnx.load(str(p)))
    assert stored["extra"] == {"note": "test"}
    back = read_certificate(p)
    assert back is not None and back["weights_match"] is True
    assert back["created"].endswith("Z")
    # the original file carries no certificate
    assert read_certificate(FIX / "cnn_norm_ts.onnx") is None


def test_fingerprint_detects_other_weights(tmp_path: Path) -> None:
    m = load(FIX / "mlp_ts.onnx", n_parity=2)
    p = export(m, tmp_path / "a.onnx", cert())
    onx = onnx.load(str(p))
    t = max(onx.graph.initializer, key=lambda t: len(t.raw_data))
    arr = onnx.numpy_helper.to_array(t).copy()
    arr.flat[0] += 1.0
    t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    assert read_certificate(onx)["weights_match"] is False


def test_fingerprint_is_deterministic() -> None:
    a = onnx.load(str(FIX / "cnn_ts.onnx"))
    b = onnx.load(str(FIX / "cnn_ts.onnx"))
    b.graph.initializer.reverse()
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(onnx.load(str(FIX / "mlp_ts.onnx")))


def test_graph_fingerprint_sees_constants_and_wiring_not_metadata(tmp_path: Path) -> None:
    m = load(FIX / "cnn_norm_ts.onnx", n_parity=2)
    onx = onnx.load(str(export(m, tmp_path / "a.onnx", cert())))
    assert read_certificate(onx)["graph_match"] is True
    base = graph_fingerprint(onx)
    same = onnx.ModelProto()
    same.CopyFrom(onx)
    same.doc_string, same.producer_name = "edited docs", "someone else"
    onnx.helper.set_model_props(same, {"note": "metadata is not the function"})
    assert graph_fingerprint(same) == base
    # Constant nodes (e.g. a normalization's mean) count, though they are not initializers
    from onnx import TensorProto, helper

    def with_const(v: float) -> onnx.ModelProto:
        c = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [v]))
        g = helper.make_graph([c, helper.make_node("Sub", ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        return helper.make_model(g)

    assert graph_fingerprint(with_const(0.5)) == graph_fingerprint(with_const(0.5))
    assert graph_fingerprint(with_const(0.5)) != graph_fingerprint(with_const(0.25))
    edited = onnx.ModelProto()
    edited.CopyFrom(onx)
    edited.graph.node[-1].op_type = "Softmax" if edited.graph.node[-1].op_type != "Softmax" else "Identity"
    assert graph_fingerprint(edited) != base
    assert read_certificate(edited)["graph_match"] is False


def test_source_metadata_kept_and_old_certificate_replaced(tmp_path: Path) -> None:
    m = load(FIX / "mlp_ts.onnx", n_parity=2)
    m.metadata = {"author": "me", "certonnx.certificate": "{stale}"}
    p = export(m, tmp_path / "m.onnx")
    meta = {q.key: q.value for q in onnx.load(str(p)).metadata_props}
    assert meta["author"] == "me" and "certonnx.certificate" not in meta


def test_export_restores_mode_and_uses_eval(tmp_path: Path) -> None:
    m = load(FIX / "cnn_ts.onnx", n_parity=2)
    m.module.train()
    export(m, tmp_path / "m.onnx", n_parity=2)  # BatchNorm in train mode would fail parity
    assert m.module.training
    m.module.eval()
    export(m, tmp_path / "m.onnx", n_parity=2)
    assert not m.module.training


def test_export_check_inputs(tmp_path: Path) -> None:
    m = load(FIX / "mnist_mlp_trained.onnx", n_parity=2)
    x = np.load(FIX / "mnist_200.npz")["x_test"][:20].astype(np.float32)[:, None] / 255.0
    export(m, tmp_path / "m.onnx", check_inputs=torch.from_numpy(x), n_parity=2)


def test_export_prepended_normalization(tmp_path: Path) -> None:
    m = prepend_normalization(load(FIX / "cnn_ts.onnx", n_parity=2), 0.5, 0.25)
    p = export(m, tmp_path / "m.onnx", n_parity=2)
    m2 = load(p, n_parity=2)
    assert m2.normalization is not None and m2.normalization.mean == pytest.approx([0.5])
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(m2.module(x).numpy(), m.module(x).numpy(), atol=1e-5)


def test_export_bakes_parametrizations(tmp_path: Path) -> None:
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 0.5 * w

    m = load(FIX / "mlp_ts.onnx", n_parity=2)
    lin = next(mod for mod in m.module.modules() if isinstance(mod, nn.Linear))
    parametrize.register_parametrization(lin, "weight", Scale())
    p = export(m, tmp_path / "m.onnx", n_parity=2)
    assert parametrize.is_parametrized(lin)  # the caller's model is untouched
    m2 = load(p, n_parity=2)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(m2.module(x).numpy(), m.module(x).numpy(), atol=1e-5)


def test_export_parity_failure_is_export_error(tmp_path: Path) -> None:
    class Liar(nn.Module):
        """Exports something else than it computes."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.flatten(1)[:, :10]
            return y + 1.0 if torch.onnx.is_in_onnx_export() else y

    m = load(FIX / "mlp_ts.onnx", check_parity=False)
    m.module = Liar()  # type: ignore[assignment]  (fx tracing would freeze the branch)
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="does not match"):
        export(m, target, n_parity=2)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp files left behind


def test_export_unwritable_path(tmp_path: Path) -> None:
    m = load(FIX / "mlp_ts.onnx", check_parity=False)
    with pytest.raises(OutputPathError):
        export(m, tmp_path / "missing_dir" / "m.onnx")
    with pytest.raises(OutputPathError):
        export(m, tmp_path)  # a directory


def test_make_certificate_schema() -> None:
    c = cert(union_certified_accuracy=None, pgd_accuracy=None)
    assert set(c) == {
        "schema", "certonnx_version", "created", "norms", "input_space", "method", "verifier", "dataset_sha256",
        "n", "clean_accuracy", "certified_accuracy", "union_certified_accuracy", "pgd_accuracy",
        "weights_sha256", "graph_sha256", "extra",
    }
    assert c["weights_sha256"] is None and c["graph_sha256"] is None and c["union_certified_accuracy"] is None
    json.dumps(c)
    with pytest.raises(TypeError):
        cert(extra={"bad": object()})
