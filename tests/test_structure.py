"""Structure rules of the code base, and the typed method options.

* every command in ``certonnx/commands`` stays a thin adapter over :mod:`certonnx.api`: no
  function there is longer than 80 lines;
* method options are typed dataclasses: an unknown ``--method-opt`` key or a bad value is a
  one-line error before any work, never silently ignored.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from certonnx.cli import main
from certonnx.train.methods import REGISTRY, MethodOptionError
from tests.train_util import write_npz

COMMANDS = Path(__file__).resolve().parents[1] / "certonnx" / "commands"
MAX_LINES = 80


def test_no_long_functions_in_commands() -> None:
    """From ``def`` to the last line (the click decorators above a command are declarations,
    not logic, and are not counted)."""
    too_long = []
    files = sorted(COMMANDS.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name}() is {n} lines")
    assert not too_long, "; ".join(too_long) + f" (at most {MAX_LINES}: move the logic into certonnx/api.py)"


def _finetune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    from certonnx.train import Trainer

    data = write_npz(tmp_path / "d.npz", n=32, n_test=8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started despite a bad option"))
    return main(["finetune", "--arch", "mlp", "--data", str(data), "--norm", "linf:0.1", "--epochs", "1",
                 "-o", "o.onnx", *extra])


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def test_unknown_method_opt_key_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = _finetune(tmp_path, monkeypatch, "--method", "sabr", "--method-opt", "sabr_lambda=0.3",
                   "--method-opt", "note=x")
    line = _one_error(capsys.readouterr().err)
    assert rc == 2
    # names the flag, the key, the method and the valid keys
    assert "--method-opt" in line and "'note'" in line and "sabr" in line, line
    assert "pgd_steps" in line and "sabr_lambda" in line, line
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.onnx.ckpt").exists()
    # a key of another method is not one of this method's either
    rc = _finetune(tmp_path, monkeypatch, "--method", "ibp", "--method-opt", "sabr_lambda=0.3")
    assert rc == 2 and "'sabr_lambda'" in _one_error(capsys.readouterr().err)
    # methods without options say so
    rc = _finetune(tmp_path, monkeypatch, "--method", "standard", "--method-opt", "x=1")
    assert rc == 2 and "takes no options" in _one_error(capsys.readouterr().err)


@pytest.mark.parametrize("opt,words", [
    ("sabr_lambda=abc", ["sabr_lambda", "number in (0, 1]", "'abc'"]),
    ("sabr_lambda=1.5", ["sabr_lambda", "(0, 1]"]),
    ("pgd_steps=2.5", ["pgd_steps", "integer"]),
    ("novalue", ["KEY=VALUE"]),
])
def test_bad_method_opt_value_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], opt: str, words: list[str]) -> None:
    rc = _finetune(tmp_path, monkeypatch, "--method", "sabr", "--method-opt", opt)
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and all(w in line for w in words), line


def test_dedicated_flag_checked_by_the_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--relaxation sets acert_bounds, which only takes ibp or crown-ibp: refused before training."""
    rc = _finetune(tmp_path, monkeypatch, "--method", "acert", "--relaxation", "crown")
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "acert_bounds" in line and "crown-ibp" in line, line


def test_library_refuses_unknown_options(tmp_path: Path) -> None:
    from certonnx import api

    data = write_npz(tmp_path / "d.npz", n=32, n_test=8)
    with pytest.raises(MethodOptionError, match="unknown option 'kappa' for method ibp"):
        api.finetune(None, data, arch="mlp", norms={"linf": 0.1}, options={"kappa": 0.1},
                     output=str(tmp_path / "o.onnx"))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_declares_typed_documented_options(name: str) -> None:
    cls = REGISTRY[name].Options
    default = cls()  # the defaults pass the validation
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help"
    # the stored form is plain data and round-trips, also through strings (the CLI's form)
    d = default.to_dict()
    assert cls(**d) == default
    as_text = {k: ("none" if v is None else str(v)) for k, v in d.items()}
    assert REGISTRY[name].parse_options(as_text) == default
    assert all(isinstance(v, (bool, int, float, str, type(None))) for v in d.values())


def test_option_conversion() -> None:
    gls = REGISTRY["gls"]
    o = gls.parse_options({"gls_pop": "9", "gls_antithetic": "no", "gls_relaxation": "CROWN_IBP", "gls_mix": 1})
    assert (o.gls_pop, o.gls_antithetic, o.gls_relaxation, o.gls_mix) == (10, False, "crown-ibp", 1.0)  # pgpe: even
    with pytest.raises(MethodOptionError, match="gls_antithetic: expected a boolean"):
        gls.parse_options({"gls_antithetic": "maybe"})
    # a config shared by several methods (strict=False, as the Trainer parses TrainConfig.options):
    # other methods' keys are dropped, a key no method has is still an error
    assert REGISTRY["ibp"].parse_options({"pgd_steps": 3, "kappa_end": 0}, strict=False).kappa_end == 0.0
    with pytest.raises(MethodOptionError, match="'pgd_stpes'"):
        REGISTRY["ibp"].parse_options({"pgd_stpes": 3}, strict=False)


def test_help_lists_every_method_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    for name, cls in REGISTRY.items():
        assert f"--method {name} " in out, name
        for key, default, _ in cls.Options.describe():
            assert f"{key}={default}" in out, (name, key)


def test_docs_options_table_is_generated() -> None:
    """docs/finetune.md shows the table the dataclasses generate (so its defaults cannot drift)."""
    from certonnx.train.methods import options_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "finetune.md").read_text()
    assert options_markdown() in docs, "regenerate the table in docs/finetune.md (see options_markdown)"
