"""ACERT (adaptive certified training): per-sample radius search, adaptive loss, trade-off tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certonnx.bounds import BoundedModule, InputSet, margin_matrix
from certonnx.errors import CertonnxError
from certonnx.train import TrainConfig, Trainer
from certonnx.train.methods import REGISTRY
from certonnx.train.methods.acert import ACERT, adaptive_radii
from certonnx.train.methods.base import StepContext
from tests.train_util import one_thread, small_cnn_bn, small_mlp, subprocess_env, synthetic_xy

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["one_thread"]

REPO = Path(__file__).resolve().parents[1]
EPS_MAX, ITERS, K = 0.3, 8, 3


def _trained(make=small_mlp, steps: int = 40):  # type: ignore[no-untyped-def]
    """A tiny model trained a little on clean data, so that radii are neither all 0 nor all ε_max."""
    x, y = synthetic_xy(64)
    m = make()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m, x, y


def _lb_min(bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | float,
            norm: str = "linf") -> torch.Tensor:
    with torch.no_grad():
        lb, _ = bm.compute(InputSet(x, eps, norm=norm), C=margin_matrix(y, K), method="ibp", upper=False)
    return lb.amin(1)


def _scalar_bisection(bm: BoundedModule, x: torch.Tensor, y: torch.Tensor, eps_max: float, iters: int) -> float:
    """Reference: one sample, a Python float ε, the textbook bisection on g(ε) = -min_j lb_j(ε)."""
    with torch.no_grad():
        if int(bm(x).argmax(1)) != int(y):
            return 0.0
    if float(_lb_min(bm, x, y, eps_max)) > 0:
        return eps_max
    lo, hi = 0.0, eps_max
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float(_lb_min(bm, x, y, mid)) > 0:
            lo = mid
        else:
            hi = mid
    return lo


def test_batched_root_matches_scalar_bisection() -> None:
    m, x, y = _trained()
    # make some samples misclassified on purpose: flip a few labels
    y = y.clone()
    y[:5] = (y[:5] + 1) % K
    bm = BoundedModule(m, (1, 8, 8))
    r = adaptive_radii(bm, x, y, EPS_MAX, "linf", iters=ITERS, num_classes=K)
    n = 32  # the reference is slow (one bound pass per sample and step)
    r = r[:n]
    ref = torch.tensor([_scalar_bisection(bm, x[i:i + 1], y[i:i + 1], EPS_MAX, ITERS) for i in range(n)])
    res = EPS_MAX / 2**ITERS
    assert torch.allclose(r, ref, atol=res + 1e-6), (r - ref).abs().max()
    # the test is not trivial: radii spread over 0, the interior and (maybe) ε_max
    assert bool(((r > 0) & (r < EPS_MAX)).any())


@pytest.mark.parametrize("make", [small_mlp, small_cnn_bn])
def test_radius_properties(make) -> None:  # type: ignore[no-untyped-def]
    m, x, y = _trained(make)
    m.eval()
    y = y.clone()
    y[:4] = (y[:4] + 1) % K  # misclassified samples
    bm = BoundedModule(m, (1, 8, 8))
    r = adaptive_radii(bm, x, y, EPS_MAX, "linf", iters=ITERS, num_classes=K)
    with torch.no_grad():
        wrong = m(x).argmax(1) != y
    assert bool(wrong.any())
    assert torch.all(r[wrong] == 0)
    assert torch.all((r >= 0) & (r <= EPS_MAX))
    # the radius found is certified by the same bound (strictly positive margins)
    pos = r > 0
    assert bool(pos.any())
    assert torch.all(_lb_min(bm, x[pos], y[pos], r[pos]) > 0)
    # ... and one bisection step further is not (IBP bounds are monotone in ε)
    delta = EPS_MAX / 2**ITERS
    inner = ~wrong & (r < EPS_MAX - delta)
    assert bool(inner.any())
    assert torch.all(_lb_min(bm, x[inner], y[inner], r[inner] + delta * 1.001) <= 0)


def test_radius_l2_and_zero_eps() -> None:
    m, x, y = _trained()
    bm = BoundedModule(m, (1, 8, 8))
    r = adaptive_radii(bm, x, y, 1.0, "l2", iters=6, num_classes=K)
    assert r.shape == (x.shape[0],) and torch.all((r >= 0) & (r <= 1.0))
    pos = r > 0
    assert torch.all(_lb_min(bm, x[pos], y[pos], r[pos], norm="l2") > 0)
    assert torch.all(adaptive_radii(bm, x, y, 0.0, "linf", num_classes=K) == 0)


def _ctx(m: torch.nn.Module, eps: float, progress: float, **opts) -> StepContext:  # type: ignore[no-untyped-def]
    return StepContext(module=m, epoch=0, step=0, eps={"linf": eps}, eps_target={"linf": EPS_MAX},
                       progress=progress, num_classes=K, options=dict(opts), regularize=0 < progress < 1)


@pytest.mark.parametrize("kappa,bounds", [(0.0, "ibp"), (0.5, "ibp"), (0.25, "crown-ibp")])
def test_loss_finite_and_gradients_flow(kappa: float, bounds: str) -> None:
    m, x, y = _trained(small_cnn_bn, steps=20)
    m.train()
    bm = BoundedModule(m, (1, 8, 8))
    loss, st = ACERT().loss_multi(m, bm, x, y, _ctx(m, 0.15, 0.5, acert_kappa=kappa, acert_bounds=bounds))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert st["clean_acc"] is not None and 0 <= st["cert_acc"] <= 1  # type: ignore[operator]
    with pytest.raises(CertonnxError, match="acert_bounds"):
        ACERT().loss_multi(m, bm, x, y, _ctx(m, 0.0, 0.0, acert_bounds="crown"))  # caught even in warm-up
    with pytest.raises(CertonnxError, match="acert_kappa"):
        ACERT().loss_multi(m, bm, x, y, _ctx(m, 0.15, 0.5, acert_kappa=1.5))


def test_loss_is_robust_ce_at_the_radii() -> None:
    """κ = 0, no regularisers: the loss equals robust CE of the bounds at the searched radii,
    which at ε_i = 0 (misclassified samples) is the clean CE; κ = 1 gives the clean CE."""
    from certonnx.train.methods.base import robust_ce

    m, x, y = _trained()
    y = y.clone()
    y[:3] = (y[:3] + 1) % K
    bm = BoundedModule(m, (1, 8, 8))
    ctx = _ctx(m, 0.2, 1.0, acert_kappa=0.0)
    loss, _ = ACERT().loss(m, bm, x, y, 0.2, "linf", ctx)
    r = adaptive_radii(bm, x, y, 0.2, "linf", num_classes=K)
    lb, _ = bm.compute(InputSet(x, r, norm="linf"), C=margin_matrix(y, K), method="ibp", upper=False)
    assert torch.allclose(loss, robust_ce(lb), atol=1e-5)
    clean = torch.nn.functional.cross_entropy(m(x), y)
    z = r == 0
    # equal up to the float32 rounding allowance of the bounds (certonnx.bounds.rounding)
    assert torch.allclose(robust_ce(lb[z]), torch.nn.functional.cross_entropy(m(x[z]), y[z]), atol=1e-3)
    loss1, _ = ACERT().loss(m, bm, x, y, 0.2, "linf", _ctx(m, 0.2, 1.0, acert_kappa=1.0))
    assert torch.allclose(loss1, clean, atol=1e-5)
    # warm-up (ε_max = 0): clean training
    loss0, st0 = ACERT().loss(m, bm, x, y, 0.0, "linf", _ctx(m, 0.0, 0.0))
    assert torch.allclose(loss0, clean, atol=1e-6) and st0["cert_acc"] is None


def test_trains_with_the_trainer() -> None:
    REGISTRY.setdefault("acert", ACERT)
    x, y = synthetic_xy(64)
    m = small_mlp()
    cfg = TrainConfig(norms={"linf": 0.1}, method="acert", epochs=3, batch_size=32, lr=5e-3, warmup_epochs=0,
                      ramp_epochs=2, num_classes=K, regularize=True, options={"acert_kappa": 0.25})
    log = Trainer(m, x, y, cfg, progress=False).fit()
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert log[-1]["clean_acc"] > 0.5 and log[-1]["cert_acc"] is not None


def test_tradeoff_tool_png_and_json(tmp_path: Path) -> None:
    runs = []
    for i, (acr, clean) in enumerate([(0.1, 0.95), (0.2, 0.8)]):
        eps = [0.0, 0.1, 0.2, 0.3]
        d = {"clean_accuracy": clean, "radius": {"method": "ibp", "linf": {
            "eps_max": 0.3, "acr": acr, "curve": {"eps": eps, "accuracy": [clean, 0.7 - 0.1 * i, 0.4, 0.1]}}}}
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(d))
        runs.append(str(p))
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "tradeoff.py"), *runs, "-o", str(out),
                           "--labels", "a,b"], capture_output=True, text=True, env=subprocess_env(REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["a", "b"]
    assert summary["runs"][1]["radius"]["linf"]["acr"] == 0.2



def test_tradeoff_tool_bad_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A JSON without a radius block is a one-line error (exit 1), and no PNG is written."""
    from tools.tradeoff import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"clean_accuracy": 0.9}))
    out = tmp_path / "x.png"
    assert main([str(bad), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "radius" in err and not out.exists()
