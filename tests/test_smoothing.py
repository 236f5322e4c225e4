"""``certify --method smoothing``: randomized smoothing (Cohen et al. 2019) checked against its
statistical definition, and kept apart from the deterministic certificates.

A linear two-class model has a known smoothed classifier: with ``f(x) = [w·x + b > 0]`` and
``δ ~ N(0, σ²I)``, ``P(f(x + δ) = f(x)) = Φ(|w·x + b| / (σ‖w‖))``, so the exact smoothed
radius ``σ·Φ⁻¹(p_A)`` is the distance ``|w·x + b| / ‖w‖`` to the decision boundary. The
estimate must stay below it (up to the stated failure rate α) and come close to it with
many samples; points on the boundary must abstain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from certonnx.certify.gate import parse_requirement
from certonnx.certify.smoothing import (
    SmoothingOptions,
    certify_smoothing,
    clopper_pearson_lower,
    l2_equivalent,
)
from certonnx.cli import main
from certonnx.io.metadata import read_certificate
from tests.paths import FIXTURES

D = 20


def _linear(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)
    b = 0.3
    lin = torch.nn.Linear(D, 2)
    with torch.no_grad():
        lin.weight[:] = torch.stack([torch.zeros(D), w])
        lin.bias[:] = torch.tensor([0.0, b])
    return lin, w, b


def _exact_radius(x: torch.Tensor, w: torch.Tensor, b: float) -> np.ndarray:
    return ((x @ w + b).abs() / w.norm()).numpy()


def test_clopper_pearson_lower_bound() -> None:
    n, alpha = 50, 0.01
    # all successes: the bound solves p^n = α
    assert math.isclose(float(clopper_pearson_lower(n, n, alpha)), alpha ** (1 / n), rel_tol=1e-9)
    assert float(clopper_pearson_lower(0, n, alpha)) == 0.0
    # in general P(X >= k | p = bound) = α (the one-sided exact interval)
    for k in (1, 7, 25, 49):
        p = float(clopper_pearson_lower(k, n, alpha))
        assert math.isclose(binom.sf(k - 1, n, p), alpha, rel_tol=1e-6)


def test_linear_model_radius_below_and_close_to_the_exact_one() -> None:
    lin, w, b = _linear()
    x = torch.randn(60, D, generator=torch.Generator().manual_seed(1)) * 0.3
    y = (x @ w + b > 0).long()
    sigma = 0.5
    res = certify_smoothing(lin, x, y, {"l2": 0.05}, SmoothingOptions(sigma=sigma, n=20_000, alpha=0.001), seed=0)
    s = res["smoothing"]
    est, exact = np.array(s["radius_l2"]), _exact_radius(x, w, b)
    assert np.all(est <= exact + 1e-9), "a smoothed radius above the exact one"
    near = (exact < 1.5 * sigma) & (np.array(s["prediction"]) >= 0)
    assert near.sum() >= 30
    assert np.all(exact[near] - est[near] < 0.1 * sigma), "estimate far below the exact radius"
    # certified at ε exactly when the label is predicted and the radius exceeds ε
    assert s["certified_accuracy"]["l2"] == pytest.approx(float(((est > 0.05) & (y.numpy() == s["prediction"])).mean()))


def test_abstains_on_the_decision_boundary() -> None:
    lin, w, b = _linear()
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(2))
    x = x - ((x @ w + b) / (w @ w))[:, None] * w  # project onto the hyperplane w·x + b = 0
    res = certify_smoothing(lin, x, torch.zeros(8, dtype=torch.long), {"l2": 0.0},
                            SmoothingOptions(sigma=0.5, n=2_000, alpha=0.001), seed=0)
    s = res["smoothing"]
    assert s["abstained"] == 8 and s["accuracy"] == 0.0 and s["certified_accuracy"]["l2"] == 0.0
    assert all(r == 0.0 for r in s["radius_l2"])


def test_failure_rate_is_at_most_alpha() -> None:
    """The same point certified 400 times with independent noise: the radius exceeds the exact
    one in at most about α of the runs (Clopper–Pearson is conservative). Using the point
    estimate k/n instead of the bound fails this about half of the time."""
    lin, w, b = _linear()
    x0 = torch.randn(1, D, generator=torch.Generator().manual_seed(3)) * 0.3
    exact = float(_exact_radius(x0, w, b)[0])
    trials, alpha = 400, 0.1
    x = x0.expand(trials, D).clone()
    y = (x @ w + b > 0).long()
    res = certify_smoothing(lin, x, y, {"l2": 0.0}, SmoothingOptions(sigma=0.5, n0=20, n=100, alpha=alpha,
                                                                     batch=4000), seed=5)
    over = float((np.array(res["smoothing"]["radius_l2"]) > exact).mean())
    assert over <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def test_other_norms_through_l2_ball_inclusions() -> None:
    assert l2_equivalent("l2", 0.5, 784) == 0.5
    assert l2_equivalent("l1", 1.0, 784) == 1.0  # the L1 ball lies in the L2 ball of the same radius
    assert l2_equivalent("linf", 0.1, 784) == pytest.approx(0.1 * 28)  # the L∞ ball in radius ε·√d
    lin, w, b = _linear()
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(4)) * 0.3
    y = (x @ w + b > 0).long()
    res = certify_smoothing(lin, x, y, {"l2": 0.1, "linf": 0.1, "l1": 0.1},
                            SmoothingOptions(sigma=0.5, n=2_000), seed=0)
    s = res["smoothing"]
    r, right = np.array(s["radius_l2"]), np.array(s["prediction"]) == y.numpy()
    assert s["certified_accuracy"]["linf"] == pytest.approx(float((right & (r > 0.1 * math.sqrt(D))).mean()))
    assert s["certified_accuracy"]["l1"] == s["certified_accuracy"]["l2"]
    assert s["union_certified_accuracy"] == s["certified_accuracy"]["linf"]


def test_options_are_validated() -> None:
    from certonnx.errors import ConfigError

    for bad in ({"sigma": 0.0}, {"sigma": float("nan")}, {"alpha": 1.0}, {"alpha": 0.0}, {"n": 0}):
        with pytest.raises(ConfigError):
            SmoothingOptions(**bad).validate()  # type: ignore[arg-type]


def test_onnxruntime_and_torch_votes_agree() -> None:
    import certonnx
    from certonnx.data import load_npz

    path = FIXTURES / "mnist_mlp_trained.onnx"
    cm = certonnx.load(path)
    x, y, _ = load_npz(FIXTURES / "mnist_200.npz", "test", 10)
    opts = SmoothingOptions(sigma=0.25, n0=50, n=500)
    ort = certify_smoothing(cm, x, y, {"l2": 0.1}, opts, seed=3, onnx_path=path)["smoothing"]
    tor = certify_smoothing(cm, x, y, {"l2": 0.1}, opts, seed=3)["smoothing"]
    assert ort["votes_from"] == "onnxruntime" and tor["votes_from"] == "torch"
    assert ort["prediction"] == tor["prediction"]  # the same noise draws; only exact ties could differ
    assert np.allclose(ort["radius_l2"], tor["radius_l2"], atol=1e-3)


@pytest.fixture(scope="module")
def smoothed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("smoothing")
    out = d / "smoothed.onnx"
    rc = main(["certify", str(FIXTURES / "mnist_mlp_trained.onnx"), "--data", str(FIXTURES / "mnist_200.npz"),
               "--n", "20", "--norm", "l2:0.25,linf:0.005", "--method", "smoothing", "--sigma", "0.25",
               "--noise-samples", "1000", "-o", str(out), "--json", str(d / "res.json")])
    assert rc == 0
    return out, json.loads((d / "res.json").read_text())


def test_report_and_certificate_keep_probabilistic_numbers_apart(smoothed: tuple[Path, dict]) -> None:
    out, res = smoothed
    assert res["method"] == "smoothing"
    for key in ("certified_accuracy", "union_certified_accuracy", "status_counts"):
        assert key not in res  # no deterministic claim in the report
    s = res["smoothing"]
    assert s["kind"] == "probabilistic" and "smoothed classifier" in s["meaning"] and s["votes_from"] == "onnxruntime"
    assert len(s["radius_l2"]) == 20 and s["certified_accuracy"]["l2"] > 0.5
    cert = read_certificate(out)
    assert cert is not None and cert["weights_match"]
    assert cert["norms"] == {} and cert["certified_accuracy"] == {} and cert["union_certified_accuracy"] is None
    prob = cert["probabilistic"]
    assert prob["certified_accuracy"] == s["certified_accuracy"] and prob["sigma"] == 0.25
    assert prob["norms"] == {"l2": 0.25, "linf": 0.005}


def test_check_reads_each_kind_only_for_its_own_requirements(smoothed: tuple[Path, dict],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, res = smoothed
    got = res["smoothing"]["certified_accuracy"]["l2"]
    assert main(["check", str(out), "--require", f"smoothed-l2:0.25>={got:.4f}", "-q"]) == 0
    assert main(["check", str(out), "--require", "smoothed-l2:0.2>=0", "-q"]) == 0  # a smaller ball is covered
    assert main(["check", str(out), "--require", "smoothed-l2:0.3>=0", "-q"]) == 1  # a larger one is not
    capsys.readouterr()
    assert main(["check", str(out), "--require", "l2:0.25>=0", "-q"]) == 1
    line = capsys.readouterr().out
    assert "no certified accuracy for l2" in line and "probabilistic" in line
    assert main(["check", str(out), "--require", "union>=0", "-q"]) == 1
    # a deterministic certificate has no probabilistic section to satisfy smoothed-*
    det = out.parent / "det.onnx"
    assert main(["certify", str(FIXTURES / "mnist_mlp_trained.onnx"), "--data", str(FIXTURES / "mnist_200.npz"),
                 "--n", "10", "--norm", "l2:0.25", "--method", "ibp", "-o", str(det)]) == 0
    capsys.readouterr()
    assert main(["check", str(det), "--require", "smoothed-l2:0.25>=0", "-q"]) == 1
    assert "no probabilistic" in capsys.readouterr().out
    assert parse_requirement("Smoothed_L2:0.5>=90%").metric == "smoothed-l2"


@pytest.mark.parametrize("args, flag", [
    (["--method", "crown", "--sigma", "0.5"], "--sigma"),
    (["--method", "smoothing", "--radius"], "--radius"),
    (["--method", "smoothing", "--sigma", "-1"], "--sigma"),
    (["--method", "smoothing", "--alpha", "2"], "--alpha"),
])
def test_bad_flags_are_one_line_errors(args: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["certify", str(FIXTURES / "mnist_mlp_trained.onnx"), "--data", str(FIXTURES / "mnist_200.npz"),
               "--n", "5", "--norm", "l2:0.25", *args])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err
