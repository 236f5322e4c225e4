"""``certonnx check``: the deployment gate passes a certified model that meets its requirements,
fails one that does not (exit 1, one line), fails any model edited after certification (weights
or graph), and reports bad input as an error (exit 2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from certonnx.certify.gate import (
    RequirementError,
    check_certificate,
    evaluate,
    parse_requirement,
    recertify_norms,
)
from certonnx.cli import main
from certonnx.io.metadata import read_certificate
from tests.paths import FIXTURES

FIX = FIXTURES
DATA = FIX / "mnist_200.npz"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("check")
    out = d / "cert.onnx"
    rc = main(["certify", str(FIX / "mnist_mlp_trained.onnx"), "--data", str(DATA), "--n", "40",
               "--norm", "linf:0.02,l2:0.3", "-o", str(out), "--json", str(d / "res.json")])
    assert rc == 0
    return out, json.loads((d / "res.json").read_text())


# ---------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,metric,eps,op,value", [
    ("linf:0.1>=0.90", "linf", 0.1, ">=", 0.9),
    (" l2 : 0.5 >= 80% ", "l2", 0.5, ">=", 0.8),
    ("union>0.3", "union", None, ">", 0.3),
    ("clean>=95%", "clean", None, ">=", 0.95),
    ("inf>=0.5", "linf", None, ">=", 0.5),
    ("pgd-linf:0.1>=1", "pgd-linf", 0.1, ">=", 1.0),
])
def test_parse_requirement(text: str, metric: str, eps: float | None, op: str, value: float) -> None:
    r = parse_requirement(text)
    assert (r.metric, r.eps, r.op) == (metric, eps, op)
    assert r.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "linf", "linf:0.1=0.9", "linf:0.1>=1.5", "foo>=0.5", "union:0.1>=0.2",
                                  "linf:-1>=0.5", "linf:nan>=0.5", "clean>=150%", "linf:0.1<=0.9"])
def test_parse_requirement_rejects(text: str) -> None:
    with pytest.raises(RequirementError):
        parse_requirement(text)


# ---------------------------------------------------------------------------- evaluation
CERT = {"schema": "certonnx.certificate/1", "norms": {"linf": 0.1, "l2": 0.5}, "clean_accuracy": 0.97,
        "certified_accuracy": {"linf": 0.9, "l2": 0.8}, "union_certified_accuracy": 0.75,
        "pgd_accuracy": {"linf": 0.93, "l2": 0.85}, "weights_match": True, "graph_match": True}


def _eval(*reqs: str) -> list[bool]:
    return [o.passed for o in evaluate([parse_requirement(r) for r in reqs], CERT, "certificate")]


def test_thresholds_and_operators() -> None:
    assert _eval("linf:0.1>=0.9", "linf:0.1>0.9", "l2>=0.8", "union>=0.75", "union>0.75", "clean>=97%") == [
        True, False, True, True, False, True]


def test_eps_containment() -> None:
    # a certificate at ε=0.1 covers every smaller ball, never a larger one
    assert _eval("linf:0.05>=0.9", "linf:0.1>=0.9", "linf:0.2>=0.1", "l2:0.50000001>=0.5") == [True, True, False, True]
    # PGD accuracy is an upper bound on robust accuracy: only valid at the ε it was measured at
    assert _eval("pgd-linf:0.1>=0.9", "pgd-linf:0.05>=0.9") == [True, False]


def test_missing_norm_fails_with_reason() -> None:
    cert = {**CERT, "norms": {"linf": 0.1}, "certified_accuracy": {"linf": 0.9}, "union_certified_accuracy": None}
    out = evaluate([parse_requirement("l2:0.5>=0.1"), parse_requirement("union>=0.9")], cert, "certificate")
    assert not out[0].passed and "no certified accuracy for l2" in out[0].reason
    assert out[1].passed and out[1].actual == 0.9  # one norm: union is that norm


def test_tampered_and_missing_certificates_fail_before_requirements() -> None:
    reqs = [parse_requirement("clean>=0")]
    assert check_certificate(CERT, reqs).passed
    assert not check_certificate(None, reqs).passed
    assert "modified after certification" in check_certificate({**CERT, "weights_match": False}, reqs).reasons[0]
    assert "graph" in check_certificate({**CERT, "graph_match": False}, reqs).reasons[0]
    assert "schema" in check_certificate({**CERT, "schema": "x/9"}, reqs).reasons[0]
    # fresh numbers do not excuse a modified file
    assert not check_certificate({**CERT, "weights_match": False}, reqs, fresh=CERT).passed


def test_recertify_norms() -> None:
    reqs = [parse_requirement(t) for t in ("linf:0.05>=0.9", "linf:0.2>=0.5", "union>=0.1")]
    assert recertify_norms(reqs, CERT) == {"linf": 0.2}
    assert recertify_norms([parse_requirement("l2>=0.5")], CERT) == {"l2": 0.5}
    assert recertify_norms([parse_requirement("clean>=0.5")], CERT) == CERT["norms"]
    with pytest.raises(RequirementError):
        recertify_norms([parse_requirement("l2>=0.5")], None)


# ---------------------------------------------------------------------------- CLI
def test_cli_pass_and_fail(certified: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    path, res = certified
    h = _sha(path)
    lin, union = res["certified_accuracy"]["linf"], res["union_certified_accuracy"]
    assert lin > 0.3 and union > 0.3  # the fixture model is robust enough for a meaningful gate
    rc = main(["check", str(path), "--require", f"linf:0.02>={lin - 0.01:.4f}", "--require",
               f"union>={union - 0.01:.4f}", "--require", "clean>=0.9"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.strip().splitlines()[-1].startswith("PASS cert.onnx")

    rc = main(["check", str(path), "--require", f"linf:0.02>={min(lin + 0.05, 1):.4f}", "-q"])
    out = capsys.readouterr()
    assert rc == 1
    lines = out.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL cert.onnx: linf at ε=0.02 is")

    rc = main(["check", str(path), "--require", "linf:0.1>=0.1", "-q"])  # certificate is for ε=0.02 only
    assert rc == 1 and "not the required ε=0.1" in capsys.readouterr().out
    assert _sha(path) == h


def test_cli_json(certified: tuple[Path, dict], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, _ = certified
    rc = main(["check", str(path), "--require", "clean>=0.5,l2>=0.1", "--json", "-"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["passed"] is True and len(rep["requirements"]) == 2
    assert rep["certificate"]["weights_match"] is True and rep["certificate"]["graph_match"] is True
    rc = main(["check", str(path), "--require", "clean>=1.0", "--json", str(tmp_path / "v.json")])
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rc == 1 and rep["passed"] is False and rep["reasons"]


def _tamper_weights(src: Path, dst: Path) -> None:
    m = onnx.load(str(src))
    t = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    a = numpy_helper.to_array(t).copy()
    a.flat[0] += 1e-3  # a tiny edit: certified numbers no longer apply
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(dst))


def _tamper_graph(src: Path, dst: Path) -> None:
    m = onnx.load(str(src))
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type = "Sigmoid"  # same weights, different function
    onnx.save(m, str(dst))


@pytest.mark.parametrize("tamper,word", [(_tamper_weights, "weights"), (_tamper_graph, "graph")])
def test_cli_tampered_model_fails(certified: tuple[Path, dict], tmp_path: Path, tamper, word: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = certified
    bad = tmp_path / "tampered.onnx"
    tamper(path, bad)
    cert = read_certificate(bad)
    assert cert is not None and (cert["weights_match"] is False) == (word == "weights")
    for extra in ([], ["--data", str(DATA), "--n", "10"]):  # re-certifying does not excuse it
        rc = main(["check", str(bad), "--require", "clean>=0", "-q", *extra])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert rc == 1 and line.startswith("FAIL") and f"{word} do" in line and "modified" in line


def test_cli_recertify(certified: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    path, res = certified
    # same data and ε as the certificate: the fresh number equals the stored one
    rc = main(["check", str(path), "--data", str(DATA), "--n", "40", "--require", "linf:0.02>=0", "--json", "-"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["requirements"][0]["source"] == "re-certification"
    assert rep["requirements"][0]["actual"] == pytest.approx(res["certified_accuracy"]["linf"])
    # a larger ε, beyond the certificate, is decided on fresh numbers
    rc = main(["check", str(path), "--data", str(DATA), "--n", "40", "--require", "linf:0.3>=0.5", "-q"])
    assert rc == 1 and "linf at ε=0.3 is" in capsys.readouterr().out
    # an uncertified model can be gated by re-certification alone
    rc = main(["check", str(FIX / "mnist_mlp_trained.onnx"), "--data", str(DATA), "--n", "20",
               "--require", "clean>=0.5", "--require", "l2:0.1>=0.5", "-q"])
    assert rc == 0, capsys.readouterr()


def test_cli_errors(certified: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = certified
    assert main(["check", str(FIX / "mnist_mlp_trained.onnx"), "--require", "clean>=0"]) == 1
    assert "no certonnx certificate" in capsys.readouterr().out
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file")
    req = ["--require", "clean>=0"]
    for argv in (["check", str(tmp_path / "missing.onnx"), *req], ["check", str(junk), *req],
                 ["check", str(path), "--require", "linf>>0.5"], ["check", str(path), "--recertify", *req],
                 ["check", str(path), "--json", str(path), *req]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, argv
        assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)


@pytest.mark.parametrize("extra", [[], ["--require", ""], ["--require", " , "], ["--data", str(DATA)]])
def test_cli_no_requirement_is_an_error(certified: tuple[Path, dict], capsys: pytest.CaptureFixture[str],
                                        extra: list[str]) -> None:
    """An empty CI variable (``--require "$REQ"``) or a forgotten flag must not pass the gate."""
    path, _ = certified
    rc = main(["check", str(path), *extra])
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2 and "PASS" not in out.out, out
    assert len(lines) == 1 and lines[0].startswith("error: no requirement given") and "--require" in lines[0], out.err


def test_cli_fraction_and_case(certified: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    """The certificate is for linf 0.02 = 1/50: ``Linf:1/50`` is the same ε, ``LINF:1/40`` a larger one."""
    path, _ = certified
    assert main(["check", str(path), "--require", "Linf:1/50>=0", "-q"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["check", str(path), "--require", "LINF:1/40>=0", "-q"]) == 1
    assert "FAIL" in capsys.readouterr().out
