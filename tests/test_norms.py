"""ε as users write it: fractions (``linf:8/255``), any case of the norm name (``Linf``, ``LINF``,
``L2``), the same in every command (certify, finetune, check --require), and an ε larger than
the input range refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from certonnx import api
from certonnx.certify.gate import RequirementError, check_eps_ranges, parse_requirement
from certonnx.certify.norms import canonical_norm, eps_range_error, parse_eps, parse_norms
from certonnx.cli import main
from certonnx.errors import ConfigError
from tests.paths import FIXTURES
from tests.train_util import write_npz

FIX = FIXTURES
MLP = str(FIX / "mnist_mlp_trained.onnx")
DATA = str(FIX / "mnist_200.npz")


@pytest.mark.parametrize("text, value", [("0.1", 0.1), ("8/255", 8 / 255), (" 2 / 255 ", 2 / 255), ("1e-2", 0.01),
                                         ("0.5/2", 0.25), ("0", 0.0)])
def test_parse_eps(text: str, value: float) -> None:
    assert parse_eps(text) == value


@pytest.mark.parametrize("text, match", [("8/0", "divides by zero"), ("a/255", "not a number"), ("1/2/3", "not a"),
                                         ("-1/255", ">= 0"), ("inf", "finite"), ("nan", "finite"), ("", "not a")])
def test_parse_eps_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_eps(text)


def test_norm_names_are_normalised() -> None:
    for name in ("linf", "Linf", "LINF", "inf", "L_inf", "l-inf", "L∞"):
        assert canonical_norm(name) == "linf", name
    for name in ("l2", "L2", "2"):
        assert canonical_norm(name) == "l2", name
    assert parse_norms("LINF:8/255, L2:0.5") == {"linf": 8 / 255, "l2": 0.5}
    with pytest.raises(ValueError, match="'linf:8/x'.*not a number"):
        parse_norms("linf:8/x")


def test_requirements_take_fractions_and_any_case() -> None:
    r = parse_requirement("linf:8/255>=0.5")
    assert (r.metric, r.eps, r.value) == ("linf", 8 / 255, 0.5)
    assert parse_requirement("LINF:2/255>=50%").metric == "linf"
    assert parse_requirement("L2:0.5>=0.1").metric == "l2"
    assert parse_requirement("pgd-Linf:1/255>=0.9").metric == "pgd-linf"
    with pytest.raises(RequirementError, match="divides by zero"):
        parse_requirement("linf:8/0>=0.5")


def test_eps_range() -> None:
    assert eps_range_error("linf", 1.0) is None  # the whole box: allowed, if pointless
    msg = eps_range_error("linf", 8.0)
    assert msg and "larger than the input range [0, 1]" in msg and "linf:8/255" in msg and "\n" not in msg
    assert eps_range_error("linf", 0.5, (0.0, 255.0)) is None
    assert eps_range_error("l2", 5.0) is None  # no input size: the diameter is unknown
    assert eps_range_error("l2", 27.9, sample_shape=(1, 28, 28)) is None  # diameter sqrt(784) = 28
    assert "diameter 28" in (eps_range_error("l2", 29.0, sample_shape=(1, 28, 28)) or "")
    with pytest.raises(RequirementError, match="'linf:2>=0.5'.*larger than the input range"):
        check_eps_ranges([parse_requirement("linf:2>=0.5"), parse_requirement("clean>=0.9")])


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def test_certify_fraction_and_case(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    rc = main(["certify", MLP, "--data", DATA, "--n", "5", "--norm", "LINF:2/255", "--method", "ibp", "--pgd-steps",
               "1", "--radius", "--eps-max", "4/255", "--json", "-"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    r = json.loads(out.out)
    assert r["epsilon"] == {"linf": 2 / 255} and r["radius"]["linf"]["eps_max"] == 4 / 255


@pytest.mark.parametrize("norm, words", [("linf:8", ["--norm", "linf ε 8", "[0, 1]", "linf:8/255"]),
                                         ("l2:30", ["--norm", "diameter 28"])])
def test_certify_refuses_eps_beyond_the_input_range(capsys: pytest.CaptureFixture[str], norm: str,
                                                    words: list[str]) -> None:
    rc = main(["certify", MLP, "--data", DATA, "--n", "5", "--norm", norm, "--method", "ibp"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and all(w in line for w in words), line


def test_finetune_refuses_eps_beyond_the_input_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from certonnx.train import Trainer

    data = write_npz(tmp_path / "d.npz", n=16, n_test=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started despite a bad ε"))
    for norm in ("linf:8", "linf:0.1,l2:9"):  # (the L2 diameter of 8x8 inputs is 8)
        rc = main(["finetune", "--arch", "mlp", "--data", str(data), "--norm", norm, "--epochs", "1", "-o", "o.onnx"])
        line = _one_error(capsys.readouterr().err)
        assert rc == 2 and "larger than" in line and "--norm" in line, line
    with pytest.raises(ConfigError, match="larger than the input range"):
        api.finetune(None, data, arch="mlp", norms={"linf": "8"}, output=str(tmp_path / "o.onnx"))


def test_check_refuses_eps_beyond_the_input_range(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["check", MLP, "--require", "linf:8>=0.5"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "--require" in line and "linf:8/255" in line, line
    rc = main(["check", MLP, "--require", "l2:30>=0.5", "--data", DATA, "--n", "4"])  # L2: known with the model
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "diameter" in line, line
