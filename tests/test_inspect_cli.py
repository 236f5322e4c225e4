"""``certonnx inspect``: tables, --json, --strict, --no-parity, certificate display."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certonnx.cli import main
from certonnx.io import export, load, make_certificate
from tests.paths import FIXTURES

FIX = FIXTURES


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["inspect", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, str(FIX / "cnn_norm_ts.onnx"))
    assert rc == 0, err
    for word in ("BatchNormalization", "Conv", "MaxPool", "0.1307", "0.3081", "parity", "crown", "opset"):
        assert word in out, word
    assert "Traceback" not in out + err


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, str(FIX / "cnn_dynamo.onnx"), "--json")
    assert rc == 0, err
    info = json.loads(out)  # exactly one JSON document on stdout
    assert info["opset"] >= 18
    assert info["inputs"][0]["name"] == "input" and info["inputs"][0]["shape"][1:] == [1, 28, 28]
    assert info["imported"]["num_classes"] == 10
    ops = {o["op"]: o for o in info["ops"]}
    assert ops["Conv"]["count"] == 3
    assert info["parity_max_abs_diff"] < 1e-4
    assert info["parameters"] > 4000
    assert info["normalization"] is None and "--mean/--std" in info["eps_meaning"]
    assert info["certificate"] is None
    # every op row is a method table, "constant"/"removed", or unknown (None)
    for row in info["ops"]:
        s = row["support"]
        assert s is None or s in ("constant", "removed") or set(s) == set(info["methods"])


def test_no_parity(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, str(FIX / "mlp_ts.onnx"), "--json", "--no-parity")
    assert rc == 0
    assert json.loads(out)["parity_max_abs_diff"] is None


def test_removed_ops_marked(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, str(FIX / "shape_chain.onnx"), "--json")
    assert rc == 0
    ops = {o["op"]: o["support"] for o in json.loads(out)["ops"]}
    assert ops["Shape"] == "removed" and ops["Identity"] == "removed" and ops["Dropout"] == "removed"


def test_strict(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("certonnx.bounds.registry")
    rc, out, err = run(capsys, str(FIX / "mlp_ts.onnx"), "--strict", "--json")
    assert rc == 0, err
    assert json.loads(out)["unsupported"] == []

    import certonnx.bounds.registry as reg

    def fake_table(module, sample_shape=None):
        return {"Linear": {m: True for m in reg.METHODS}, "Relu": {m: False for m in reg.METHODS}}

    monkeypatch.setattr(reg, "support_table", fake_table)
    rc, out, err = run(capsys, str(FIX / "mlp_ts.onnx"), "--strict")
    assert rc == 1
    assert err.strip().startswith("error:") and "Relu" in err


def test_certificate_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = load(FIX / "mlp_ts.onnx", n_parity=2)
    cert = make_certificate(
        norms={"linf": 0.1}, input_space=m.input_space(), method="crown-ibp", verifier="crown",
        dataset_sha256="cd" * 32, n=50, clean_accuracy=0.97, certified_accuracy={"linf": 0.8125},
        union_certified_accuracy=None, pgd_accuracy={"linf": 0.9},
    )
    p = export(m, tmp_path / "robust.onnx", cert)
    rc, out, err = run(capsys, str(p))
    assert rc == 0, err
    assert "certificate" in out and "0.8125" in out and "matches the weights" in out
    rc, out, _ = run(capsys, str(p), "--json")
    info = json.loads(out)
    assert info["certificate"]["certified_accuracy"] == {"linf": 0.8125}
    assert info["certificate"]["weights_match"] is True
    assert "certonnx.version" in info["metadata"]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert rc == 0 and "--strict" in out and "--json" in out
