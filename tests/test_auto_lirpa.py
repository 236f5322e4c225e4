"""The optional auto_LiRPA backend and the cross-check (:mod:`certonnx.bounds.auto_lirpa`).

Tests that run auto_LiRPA skip where it is not installed (it needs torch < 2.9); the pure
comparison logic and the error without it are tested everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from certonnx.bounds import auto_lirpa
from certonnx.bounds.auto_lirpa import CROSS_CHECK_RTOL, cross_check
from certonnx.cli import main

MLP = "tests/fixtures/mnist_mlp_trained.onnx"
CNN = "tests/fixtures/mnist_cnn_trained.onnx"
DATA = "tests/fixtures/mnist_200.npz"
HAVE = auto_lirpa.available() is not None
needs_lirpa = pytest.mark.skipif(not HAVE, reason="auto_LiRPA is not installed (it needs torch < 2.9; "
                                                  "see docs/certify.md, --backend)")


def test_cross_check_flags_only_tighter_bounds_beyond_tolerance() -> None:
    ref = {"crown": torch.tensor([[-1.0, 0.5]]), "ibp": torch.tensor([[-3.0, 0.7]])}
    # the reference is the best of auto_LiRPA's bounds: -1.0 and 0.7
    looser = cross_check(torch.tensor([[-1.2, 0.6]]), ref)
    assert looser["disagreements"] == 0 and looser["tighter"] == 0.0
    assert looser["looser"] == pytest.approx(0.2)
    within = cross_check(torch.tensor([[-1.0 + CROSS_CHECK_RTOL, 0.7]]), ref)
    assert within["disagreements"] == 0
    over = cross_check(torch.tensor([[-0.9, 0.7]]), ref)
    assert over["disagreements"] == 1 and over["tighter"] == pytest.approx(0.1 - 2 * CROSS_CHECK_RTOL, abs=1e-6)


@pytest.mark.skipif(HAVE, reason="auto_LiRPA is installed here")
@pytest.mark.parametrize("flag", [["--backend", "auto_lirpa"], ["--cross-check"]])
def test_without_auto_lirpa_one_line_error(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["certify", MLP, "--data", DATA, "--n", "4", "--norm", "linf:0.02", *flag])
    err = capsys.readouterr().err
    assert rc == 2 and "auto_LiRPA is not installed" in err and flag[0] in err and "Traceback" not in err


def test_backend_flag_misuse(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["certify", MLP, "--data", DATA, "--n", "4", "--norm", "linf:0.02"]
    assert main([*base, "--backend", "auto_lirpa", "--cross-check"]) == 2
    assert main([*base, "--method", "lipschitz", "--cross-check"]) == 2
    assert "--cross-check" in capsys.readouterr().err


@needs_lirpa
@pytest.mark.parametrize("model", [MLP, CNN])
def test_cross_check_passes_on_the_fixtures(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    """certonnx's CROWN-IBP and CROWN are never tighter than auto_LiRPA's on the same graph and
    set (L∞ box; L2 ball), and at most a little looser (its float32 rounding allowances)."""
    for method in ("crown-ibp", "crown"):
        rc = main(["certify", model, "--data", DATA, "--n", "12", "--norm", "linf:0.02,l2:0.3", "--method", method,
                   "--pgd-steps", "2", "--cross-check", "--json", "-"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        xc = json.loads(out.out)["cross_check"]
        assert xc and all(v["disagreements"] == 0 and v["max_looser"] < 0.5 for v in xc.values()), xc


@needs_lirpa
def test_auto_lirpa_backend_certifies_like_certonnx(capsys: pytest.CaptureFixture[str]) -> None:
    """Same graph, same sets: auto_LiRPA's bounds (no rounding allowance) certify at least what
    certonnx's do and never more than PGD allows; the report names the backend."""
    base = ["certify", MLP, "--data", DATA, "--n", "32", "--norm", "linf:0.02,l2:0.3", "--method", "crown",
            "--json", "-"]
    assert main(base) == 0
    ours = json.loads(capsys.readouterr().out)
    assert main([*base, "--backend", "auto_lirpa"]) == 0
    theirs = json.loads(capsys.readouterr().out)
    assert theirs["backend"]["name"] == "auto_lirpa" and theirs["backend"]["version"]
    for k in ("linf", "l2"):
        assert ours["certified_accuracy"][k] - 2 / 32 <= theirs["certified_accuracy"][k] <= theirs["pgd_accuracy"][k]


@needs_lirpa
def test_cross_check_fails_on_a_bound_that_claims_too_much(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A certonnx engine that claims 0.5 more than it proves is caught: exit non-zero, no table."""
    from certonnx.bounds.engine import BoundedModule

    real = BoundedModule.compute

    def too_tight(self, inset, C=None, method="ibp", **kw):  # type: ignore[no-untyped-def]
        lb, ub = real(self, inset, C, method, **kw)
        return lb + 0.5, ub

    monkeypatch.setattr(BoundedModule, "compute", too_tight)
    rc = main(["certify", MLP, "--data", DATA, "--n", "8", "--norm", "linf:0.02", "--method", "crown",
               "--pgd-steps", "2", "--cross-check"])
    out = capsys.readouterr()
    assert rc != 0 and "cross-check failed" in out.err and "certified" not in out.out
