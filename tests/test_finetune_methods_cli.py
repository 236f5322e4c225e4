"""The later methods run end to end through `certonnx finetune` from ONNX files of two
exporters (torch and keras/tf2onnx), with their CLI flags, and write the expected certificate."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from certonnx.cli import main
from tests.paths import FIXTURES

FIX = FIXTURES
DATA = str(FIX / "mnist_200.npz")


def _cert(path: Path) -> dict:
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    return json.loads(meta["certonnx.certificate"])


def _run(tmp_path: Path, model: str, *args: str) -> dict:
    out = tmp_path / "out.onnx"
    code = main(["finetune", str(FIX / model), "--data", DATA, "--epochs", "1", "--n-train", "64", "--batch-size", "32",
                 "--eval-n", "16", "--eval-method", "ibp", "-o", str(out), "--accept-worse", *args])
    assert code == 0  # (one epoch on 64 samples: the flags are under test, not the gain)
    return _cert(out)


@pytest.mark.parametrize("model", ["mnist_mlp_trained.onnx", "keras_cnn.onnx"])
def test_cure_with_default_radii(tmp_path: Path, model: str) -> None:
    cert = _run(tmp_path, model, "--method", "cure", "--norm", "linf,l2", "--method-opt", "cure_variant=max")
    assert cert["norms"] == {"linf": 0.1, "l2": 0.75}  # the MNIST small setting
    ca = cert["certified_accuracy"]
    assert set(ca) == {"linf", "l2"}
    assert cert["union_certified_accuracy"] <= min(ca.values())


def test_acert_exports_acr(tmp_path: Path) -> None:
    cert = _run(tmp_path, "mnist_mlp_trained.onnx", "--method", "acert", "--norm", "linf:0.4",
                "--method-opt", "acert_kappa=0.5")
    acr = cert["extra"]["average_certified_radius"]["linf"]
    assert 0.0 <= acr <= 0.8


@pytest.mark.parametrize("est", ["pgpe", "rgs"])
def test_gls_flags(tmp_path: Path, est: str) -> None:
    cert = _run(tmp_path, "mnist_mlp_trained.onnx", "--method", "gls", "--gls-estimator", est, "--relaxation",
                "crown", "--norm", "linf:0.1", "--method-opt", "gls_pop=2")
    assert cert["norms"] == {"linf": 0.1}


def test_sac_then_lipschitz_certify(tmp_path: Path) -> None:
    cert = _run(tmp_path, "mnist_mlp_trained.onnx", "--method", "sac", "--norm", "l2:1.0")
    assert "l2" in cert["certified_accuracy"]
    out = tmp_path / "out.onnx"
    code = main(["certify", str(out), "--data", DATA, "--n", "16", "--norm", "l2:0.1", "--method", "lipschitz",
                 "--json", str(tmp_path / "r.json")])
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["method"] == "lipschitz"
    assert res["certified_accuracy"]["l2"] <= res["pgd_accuracy"]["l2"]


def test_bad_norm_without_radius_names_the_norm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", str(FIX / "mnist_mlp_trained.onnx"), "--data", DATA, "--norm", "linf,l7",
                 "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error:") and "l7" in err[0]
