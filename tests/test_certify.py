"""certify_dataset / certonnx certify: statuses, invariants, soundness guard, ORT re-check,
radius bisection, JSON keys, certificate export and bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

import certonnx
from certonnx.certify import core
from certonnx.certify.core import SoundnessError, certify_dataset, parse_norms
from certonnx.certify.radius import certified_radius, plot_curves, radius_summary
from certonnx.cli import main
from certonnx.graph.model import CertModel
from certonnx.utils import sha256_file

MLP = "tests/fixtures/mnist_mlp_trained.onnx"
DATA = "tests/fixtures/mnist_200.npz"
KEYS = {"n", "clean_accuracy", "pgd_accuracy", "certified_accuracy", "union_certified_accuracy", "epsilon",
        "input_space", "method", "seconds"}


def _linear_model() -> CertModel:
    """y = [x0 + x1, 1]: class 0 iff x0 + x1 > 1; L∞ radius (away from the domain edge) = (s - 1) / 2."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 1.0]))
    return CertModel(module=fx.symbolic_trace(lin), input_name="x", output_name="y", input_shape=(None, 2),
                     output_shape=(None, 2))


def _data():
    # sums 1.4, 1.2, 1.04 (class 0) and 0.6 (class 1) ; one mislabeled sample
    x = torch.tensor([[0.7, 0.7], [0.6, 0.6], [0.52, 0.52], [0.3, 0.3], [0.8, 0.8]])
    y = torch.tensor([0, 0, 0, 1, 1])
    return x, y


def test_exact_statuses_on_linear_model():
    m = _linear_model()
    x, y = _data()
    r = certify_dataset(m, x, y, {"linf": 0.05}, "ibp", progress=False, per_sample=True)
    assert KEYS <= set(r)
    # margins 0.4, 0.2, 0.04, 0.4 -> L∞ 0.05 changes the sum by 0.1: third broken, last misclassified
    assert r["per_sample"]["linf"] == ["verified", "verified", "falsified", "verified", "falsified"]
    assert r["clean_accuracy"] == pytest.approx(0.8)
    assert r["pgd_accuracy"]["linf"] == pytest.approx(0.6)
    assert r["certified_accuracy"]["linf"] == pytest.approx(0.6)
    assert r["union_certified_accuracy"] == pytest.approx(0.6)
    assert r["per_method"]["linf"] == {"ibp": 3}


def test_eps_zero_certifies_exactly_the_correct_samples():
    m = _linear_model()
    x, y = _data()
    r = certify_dataset(m, x, y, {"linf": 0.0, "l2": 0.0}, "crown", progress=False)
    assert r["certified_accuracy"] == {"linf": pytest.approx(0.8), "l2": pytest.approx(0.8)}


def test_auto_cascade_only_sends_open_samples_on(monkeypatch):
    calls = []
    real = core._bound_verified

    def spy(bm, x, *a, **k):
        calls.append((a[5], x.shape[0]))  # (method, batch)
        return real(bm, x, *a, **k)

    monkeypatch.setattr(core, "_bound_verified", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    m = CertModel(module=fx.symbolic_trace(net), input_name="x", output_name="y", input_shape=(None, 6),
                  output_shape=(None, 3))
    x = torch.rand(40, 6)
    y = net(x).argmax(1)
    r = certify_dataset(m, x, y, {"linf": 0.02}, "auto", progress=False, per_sample=True)
    sizes = [b for _, b in calls]
    assert [c for c, _ in calls][0] == "ibp" and sizes[0] == 40
    assert all(b2 <= b1 for b1, b2 in zip(sizes, sizes[1:]))  # each method sees at most the open ones
    assert sum(r["per_method"]["linf"].values()) == r["status_counts"]["linf"]["verified"]


def test_soundness_guard(monkeypatch):
    """An 'attack' that leaves the ball and flips the label while bounds verify -> internal error."""
    m = _linear_model()
    x, y = _data()

    def bogus(fn, xb, yb, eps, *a, **k):
        return torch.zeros_like(xb)  # sum 0 -> class 1, far outside the ball

    monkeypatch.setattr(core, "pgd_attack", bogus)
    with pytest.raises(SoundnessError, match="verified"):
        certify_dataset(m, x, y, {"linf": 0.01}, "ibp", progress=False)


def test_ort_disagreement_keeps_unknown(monkeypatch):
    m = _linear_model()
    x, y = _data()
    monkeypatch.setattr(core, "margin_violated", lambda out, yy: np.zeros(len(yy), dtype=bool))
    r = certify_dataset(m, x, y, {"linf": 0.05}, "ibp", progress=False, per_sample=True)
    assert r["per_sample"]["linf"][2] == "unknown" and r["per_sample"]["linf"][4] == "unknown"
    assert r["ort_disagreements"]["linf"] == 2
    assert r["status_counts"]["linf"]["falsified"] == 0


def test_radius_bisection_matches_analytic():
    m = _linear_model()
    x, y = _data()
    from certonnx.bounds import BoundedModule

    bm = BoundedModule(m.module, (2,))
    r = certified_radius(bm, x, y, "linf", 0.5, "ibp", iters=14)
    expect = torch.tensor([0.2, 0.1, 0.02, 0.2, 0.0])
    assert torch.all(r <= expect + 1e-6) and torch.all(r >= expect - 0.5 / 2 ** 13)
    s = radius_summary(r, 0.5, correct=torch.tensor([True, True, True, True, False]))
    assert s["acr"] == pytest.approx(float(expect.mean()), abs=1e-3)
    assert s["curve"]["accuracy"][0] == pytest.approx(0.8)
    assert s["curve"]["accuracy"] == sorted(s["curve"]["accuracy"], reverse=True)


def test_plot(tmp_path):
    p = tmp_path / "c.png"
    plot_curves({"linf": ([0, 0.1], [0.9, 0.5]), "l2": ([0, 1], [0.9, 0.2])}, p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_norms():
    assert parse_norms("linf:0.1,l2:0.5") == {"linf": 0.1, "l2": 0.5}
    assert parse_norms("inf:0.1, L2:1") == {"linf": 0.1, "l2": 1.0}
    assert parse_norms("Linf:0") == {"linf": 0.0}
    assert parse_norms("L1:1.0,linf:8/255") == {"l1": 1.0, "linf": 8 / 255}
    for bad in ["", "linf", "l3:0.1", "linf:x", "linf:-1", "linf:0.1,inf:0.2", "linf:nan"]:
        with pytest.raises(ValueError):
            parse_norms(bad)


def test_mnist_fixture_invariants_with_onnxruntime():
    m = certonnx.load(MLP)
    from certonnx.data import check_against_model, load_npz

    x, y, _ = load_npz(DATA, n=40, num_classes=10)
    x, _ = check_against_model(x, m.sample_shape)
    r = certify_dataset(m, x, y, {"linf": 0.03, "l2": 0.5}, "auto", onnx_path=MLP, progress=False,
                        per_sample=True)
    assert r["falsification_check"] == "onnxruntime"
    for k in ("linf", "l2"):
        assert r["certified_accuracy"][k] <= r["pgd_accuracy"][k] <= r["clean_accuracy"]
        assert r["union_certified_accuracy"] <= r["certified_accuracy"][k]
        sc = r["status_counts"][k]
        assert sum(sc.values()) == 40 and sc["falsified"] > 0 and sc["verified"] > 0
    # stronger perturbation never certifies more
    r2 = certify_dataset(m, x, y, {"linf": 0.06}, "crown", onnx_path=MLP, progress=False)
    assert r2["certified_accuracy"]["linf"] <= r["certified_accuracy"]["linf"]


def _one_error_line(err: str) -> None:
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.lower().startswith("error")]) == 1, err


def test_cli_end_to_end(tmp_path, capsys):
    before = sha256_file(MLP)
    out, js, png = tmp_path / "cert.onnx", tmp_path / "r.json", tmp_path / "c.png"
    rc = main(["certify", MLP, "--data", DATA, "--n", "20", "--norm", "linf:0.02,L2:0.3", "--json", str(js),
               "--plot", str(png), "-o", str(out), "--eps-max", "linf:0.05,l2:0.6"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "certified" in text and "raw inputs in [0, 1]" in text
    r = json.loads(js.read_text())
    assert KEYS <= set(r) and r["n"] == 20 and r["epsilon"] == {"linf": 0.02, "l2": 0.3}
    assert r["radius"]["linf"]["eps_max"] == 0.05 and 0 <= r["radius"]["l2"]["acr"] <= 0.6
    assert png.read_bytes()[:4] == b"\x89PNG"
    from certonnx.io.metadata import read_certificate

    cert = read_certificate(out)
    assert cert["certified_accuracy"] == r["certified_accuracy"] and cert["n"] == 20
    assert cert["dataset_sha256"] == r["data"]["sha256"]
    assert sha256_file(MLP) == before  # the input model is never written


def test_cli_json_to_stdout(capsys):
    rc = main(["certify", MLP, "--data", DATA, "--n", "5", "--norm", "linf:0.01", "--json", "-", "--method", "ibp"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == "ibp" and r["certified_accuracy"]["linf"] <= r["clean_accuracy"]


@pytest.mark.parametrize(
    "args",
    [
        ["--norm", "l7:0.1"],
        ["--norm", "linf:abc"],
        ["--norm", "linf:0.1", "--method", "magic"],
        ["--norm", "linf:0.1", "--mean", "0.5"],
        ["--norm", "linf:0.1", "--mean", "a,b", "--std", "1"],
        ["--norm", "linf:0.1", "--max-memory", "lots"],
        ["--norm", "linf:0.1", "--n", "0"],
        ["--norm", "linf:0.1", "-o", MLP],
        ["--norm", "linf:0.1", "-o", "/nonexistent_dir/x.onnx"],
        ["--norm", "linf:0.1", "--json", "/nonexistent_dir/x.json"],
        ["--norm", "linf:0.1", "--split", "validation"],
        ["--norm", "linf:0.1", "--device", "cuda:7"],
    ],
)
def test_cli_bad_flags(args, capsys):
    rc = main(["certify", MLP, "--data", DATA, *args])
    assert rc != 0
    _one_error_line(capsys.readouterr().err)


def test_cli_missing_model(capsys, tmp_path):
    rc = main(["certify", str(tmp_path / "none.onnx"), "--data", DATA, "--norm", "linf:0.1"])
    assert rc != 0
    _one_error_line(capsys.readouterr().err)


def test_cli_declared_normalization(capsys):
    """--mean/--std: prepended (identity here, so the numbers match) and reported in input_space."""
    base = ["certify", MLP, "--data", DATA, "--n", "10", "--norm", "linf:0.02", "--method", "crown", "--json", "-"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(base + ["--mean", "0", "--std", "1"]) == 0
    norm = json.loads(capsys.readouterr().out)
    assert norm["input_space"]["normalization"] == {"mean": [0.0], "std": [1.0], "inside": False}
    assert norm["certified_accuracy"] == plain["certified_accuracy"]
    assert norm["pgd_accuracy"] == plain["pgd_accuracy"]


def test_cli_refuses_double_normalization(capsys):
    model = "tests/fixtures/cnn_norm_ts.onnx"
    rc = main(["certify", model, "--data", DATA, "--n", "2", "--norm", "linf:0.01", "--mean", "0.1", "--std", "0.3"])
    assert rc != 0
    err = capsys.readouterr().err
    _one_error_line(err)
    assert "already normalizes" in err


def test_debug_flag_before_and_after_the_command(tmp_path, capsys):
    """``--debug`` shows the traceback wherever it is given as a flag; as an option's value it is
    that value (one line, no traceback); it never sticks to a later call."""
    from certonnx.errors import DataError

    argv = ["certify", MLP, "--data", str(tmp_path / "none.npz"), "--norm", "linf:0.1"]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)
    for debug_argv in (argv + ["--debug"], ["--debug", *argv], argv[:2] + ["--debug"] + argv[2:]):
        with pytest.raises(DataError, match="not found"):
            main(debug_argv)
    assert main(["certify", MLP, "--split", "--debug", *argv[2:]]) == 2  # the value of --split
    _one_error_line(capsys.readouterr().err)
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err)
    assert "--debug" in main_help(capsys, "certify")


def main_help(capsys, name):
    assert main([name, "--help"]) == 0
    return capsys.readouterr().out


def test_certify_radius_json_lists_every_sample(capsys: pytest.CaptureFixture[str]) -> None:
    """``--radius`` gives one radius per sample, in data order: their mean is the ACR, the curve
    is their survival function, misclassified samples have 0, and each certified radius holds
    (a margin bound at 0.999·r is positive)."""
    from certonnx.bounds import BoundedModule, InputSet, margin_matrix
    from certonnx.data import load_npz

    n = 24
    rc = main(["certify", MLP, "--data", DATA, "--n", str(n), "--norm", "linf:0.02", "--method", "crown-ibp",
               "--pgd-steps", "1", "--radius", "--json", "-"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rad = json.loads(out.out)["radius"]["linf"]
    radii = np.array(rad["radii"])
    assert radii.shape == (n,) and np.all((radii >= 0) & (radii <= rad["eps_max"]))
    assert rad["acr"] == pytest.approx(float(radii.mean()))
    for e, acc in zip(rad["curve"]["eps"][1:], rad["curve"]["accuracy"][1:]):
        assert acc == pytest.approx(float(np.mean(radii >= e)))
    cm = certonnx.load(MLP)
    x, y, _ = load_npz(DATA, split="test", n=n)
    x = torch.as_tensor(x).reshape(n, *cm.sample_shape)
    y = torch.as_tensor(y)
    with torch.no_grad():
        wrong = (cm.module(x).argmax(1) != y).numpy()
    assert np.all(radii[wrong] == 0)
    pos = np.nonzero(radii > 0)[0]
    assert pos.size > 0
    bm = BoundedModule(cm.module, cm.sample_shape)
    with torch.no_grad():
        lb, _ = bm.compute(InputSet(x[pos], torch.as_tensor(radii[pos] * 0.999, dtype=torch.float32), "linf", (0.0, 1.0)),
                           margin_matrix(y[pos], 10), "crown-ibp", upper=False)
    assert bool((lb.amin(1) > 0).all())


def test_certify_per_sample_statuses_and_method_times(capsys: pytest.CaptureFixture[str]) -> None:
    """``--per-sample`` lists each sample's status in data order, consistent with the counts;
    the JSON gives each cascade method's (and the attack's) wall time; without a terminal the
    progress goes to stderr as plain lines, never as a bar."""
    n = 12
    rc = main(["certify", MLP, "--data", DATA, "--n", str(n), "--norm", "linf:0.02,l2:0.3", "--method", "auto",
               "--pgd-steps", "2", "--per-sample", "--json", "-"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    r = json.loads(out.out)
    ps = r["per_sample"]
    assert len(ps["correct"]) == n and len(ps["prediction"]) == n
    for norm in ("linf", "l2"):
        st = ps[norm]
        assert len(st) == n and set(st) <= {"verified", "falsified", "unknown"}
        assert st.count("verified") == r["status_counts"][norm]["verified"]
        assert r["certified_accuracy"][norm] == pytest.approx(st.count("verified") / n)
        assert all(c or s != "verified" for c, s in zip(ps["correct"], st))
        secs = r["per_method_seconds"][norm]
        assert set(secs) == {"attack", "ibp", "crown-ibp", "crown", "alpha-crown"}
        assert all(v >= 0 for v in secs.values()) and secs["ibp"] > 0
    assert "certifying:" in out.err and f"{2 * n}/{2 * n}" in out.err
    assert main(["certify", MLP, "--data", DATA, "--n", "4", "--norm", "linf:0.02", "--method", "lipschitz",
                 "--per-sample"]) == 2
    assert "--per-sample" in capsys.readouterr().err


def test_certify_plot_shows_pgd_beside_certified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--plot`` writes the PNG and records the PGD curve it draws: at every ε the PGD accuracy
    is at least the certified accuracy (certified ⊆ robust ⊆ not broken by PGD), and at ε = 0 it
    is the clean accuracy."""
    png = tmp_path / "curve.png"
    rc = main(["certify", MLP, "--data", DATA, "--n", "16", "--norm", "linf:0.02", "--method", "crown-ibp",
               "--pgd-steps", "5", "--plot", str(png), "--json", "-"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    r = json.loads(out.out)
    rad = r["radius"]["linf"]
    pgd = rad["pgd_curve"]
    assert len(pgd["eps"]) == 6 and pgd["eps"][0] == 0.0 and pgd["accuracy"][0] == pytest.approx(r["clean_accuracy"])
    cert = dict(zip(rad["curve"]["eps"], rad["curve"]["accuracy"]))
    for e, a in zip(pgd["eps"], pgd["accuracy"]):
        assert a >= cert[e] - 1e-12, (e, a, cert[e])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag,tiny,extra", [
    ("--timeout", "1e-9", ["--method", "crown-ibp"]),  # whole run
    ("--sample-timeout", "1e-12", ["--batch-size", "8"]),  # per batch: SECONDS × its size
])
def test_certify_timeouts_leave_unknown_never_a_claim(flag: str, tiny: str, extra: list[str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Past ``--timeout`` (or a batch's ``--sample-timeout`` share) no bound pass starts: open
    samples stay unknown (certified accuracy can only drop), the attack still runs, the report
    says how many were cut short; a generous timeout changes nothing; a bad one is a usage error."""
    base = ["certify", MLP, "--data", DATA, "--n", "16", "--norm", "linf:0.02", "--pgd-steps", "2", *extra,
            "--json", "-"]
    assert main(base) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*base, flag, tiny]) == 0
    cut = json.loads(capsys.readouterr().out)
    key = "seconds" if flag == "--timeout" else "per_sample_seconds"
    assert cut["timeout"]["reached"] and cut["timeout"][key] == float(tiny)
    assert cut["certified_accuracy"]["linf"] == 0.0
    assert cut["timeout"]["cut_short"] == round(full["clean_accuracy"] * 16)
    assert cut["pgd_accuracy"] == full["pgd_accuracy"]
    assert main([*base, flag, "600"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert not slow["timeout"]["reached"] and slow["certified_accuracy"] == full["certified_accuracy"]
    assert main([*base, flag, "0"]) == 2 and flag in capsys.readouterr().err


def test_auto_budget_skips_expensive_crown_on_a_conv_net(capsys: pytest.CaptureFixture[str]) -> None:
    """``--method auto`` runs CROWN on a conv net only within its work budget (CROWN costs
    hundreds of CROWN-IBP passes there); ``--auto-budget inf`` runs the whole cascade, which
    can only certify more; the skipped samples are counted, never claimed."""
    base = ["certify", "tests/fixtures/mnist_cnn_trained.onnx", "--data", DATA, "--n", "6", "--norm", "l2:0.5",
            "--pgd-steps", "2", "--json", "-"]
    assert main(base) == 0
    cheap = json.loads(capsys.readouterr().out)
    open_ = cheap["status_counts"]["l2"]["unknown"]
    assert open_ > 0, "the fixture needs open samples at this radius"
    assert cheap["auto"]["budget"] == core.AUTO_BUDGET
    assert cheap["auto"]["skipped"]["l2"]["crown"] == open_ and cheap["per_method"]["l2"]["crown"] == 0
    assert main([*base, "--auto-budget", "inf"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["auto"]["skipped"]["l2"] == {m: 0 for m in core.AUTO_CASCADE}
    assert full["certified_accuracy"]["l2"] >= cheap["certified_accuracy"]["l2"]
    assert main([*base, "--auto-budget", "0.5"]) == 2 and "--auto-budget" in capsys.readouterr().err
    assert main([*base, "--method", "crown", "--auto-budget", "8"]) == 2


def test_auto_budget_keeps_cheap_crown_on_an_mlp() -> None:
    """On a small MLP CROWN fits the default budget (with the default attack, part of the
    budget's base), so auto still uses it (an estimate, not a clock)."""
    import math

    m = certonnx.load(MLP)
    d = np.load(DATA)
    x = torch.tensor(d["x_test"][:32], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(d["y_test"][:32]).long()
    r = certify_dataset(m, x, y, {"l2": 0.5}, "auto", progress=False)
    full = certify_dataset(m, x, y, {"l2": 0.5}, "auto", progress=False, auto_budget=math.inf)
    assert r["auto"]["skipped"]["l2"]["crown"] == 0 and r["per_method"]["l2"]["crown"] > 0
    assert r["per_method"]["l2"]["crown"] == full["per_method"]["l2"]["crown"]


def test_l1_through_certify_certificate_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--norm ...,l1:1.0``: statuses, the union over three norms, the certificate's l1 entry,
    and ``check --require 'l1:…'`` reading it."""
    out = tmp_path / "c.onnx"
    assert main(["certify", MLP, "--data", DATA, "--n", "24", "--norm", "linf:0.02,l2:0.3,l1:1.0", "--pgd-steps", "5",
                 "-o", str(out), "--json", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    c = r["certified_accuracy"]
    assert set(c) == {"linf", "l2", "l1"} and r["epsilon"]["l1"] == 1.0
    assert 0 < c["l1"] <= r["pgd_accuracy"]["l1"] <= r["clean_accuracy"]
    assert r["union_certified_accuracy"] <= min(c.values())
    assert sum(r["status_counts"]["l1"].values()) == 24
    from certonnx.io import read_certificate

    meta = read_certificate(str(out))
    assert meta is not None and meta["norms"]["l1"] == 1.0 and meta["certified_accuracy"]["l1"] == c["l1"]
    assert main(["check", str(out), "--require", f"l1:1.0>={c['l1']}", "-q"]) == 0
    assert main(["check", str(out), "--require", f"l1:1.0>{c['l1']}", "-q"]) == 1
    assert main(["check", str(out), "--require", "l1:2.0>=0", "-q"]) == 1  # a larger ε is not covered
    assert main(["certify", MLP, "--data", DATA, "--n", "4", "--norm", "l1:1", "--method", "lipschitz"]) == 2
    assert main(["certify", MLP, "--data", DATA, "--n", "4", "--norm", "l1:800"]) == 2  # > the L1 diameter 784
    assert "l1" in capsys.readouterr().err
