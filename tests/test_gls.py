"""Gaussian Loss Smoothing (certonnx/train/methods/gls.py): estimator correctness and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule
from certonnx.errors import CertonnxError
from certonnx.train.methods import REGISTRY
from certonnx.train.methods.base import StepContext
from certonnx.train.methods.gls import GLS, pgpe_gradient

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _ctx(m: nn.Module, eps: float = 0.05, progress: float = 1.0, seed: int = 3, **opts) -> StepContext:  # type: ignore[no-untyped-def]
    return StepContext(module=m, epoch=0, step=0, eps={"linf": eps}, eps_target={"linf": eps}, progress=progress,
                       num_classes=3, generator=torch.Generator().manual_seed(seed), options=opts)


def _grad_of(method: GLS, m: nn.Module, bm: BoundedModule, x, y, ctx) -> tuple[torch.Tensor, float]:  # type: ignore[no-untyped-def]
    m.zero_grad(set_to_none=True)
    loss, _ = method.loss_multi(m, bm, x, y, ctx)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in m.parameters()]), float(loss.detach())


def _plain_grad(m: nn.Module, bm: BoundedModule, x, y, relaxation: str = "ibp") -> torch.Tensor:  # type: ignore[no-untyped-def]
    # gls_mix=1 is the unsmoothed loss (same objective, plain autograd gradient)
    return _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_relaxation=relaxation, gls_mix=1.0))[0]


def test_pgpe_correlates_with_true_gradient() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    g_true = _plain_grad(m, bm, x, y)
    meth = GLS()
    g, _ = _grad_of(meth, m, bm, x, y, _ctx(m, gls_estimator="pgpe", gls_pop=1500, gls_sigma=1e-2,
                                              gls_sigma_mode="abs"))
    cos = float(torch.cosine_similarity(g, g_true, 0))
    assert cos > 0.5, cos
    assert 0.7 < float(g.norm() / g_true.norm()) < 1.4  # on the gradient's scale (σ² normalisation)
    # a tiny population is much noisier (the test above is not trivially satisfied)
    g_small, _ = _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_estimator="pgpe", gls_pop=2, gls_sigma=1e-2,
                                                   gls_sigma_mode="abs"))
    assert float(torch.cosine_similarity(g_small, g_true, 0)) < cos


def test_rgs_small_sigma_is_plain_gradient() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    for rel in ("ibp", "crown-ibp", "crown"):
        g_true = _plain_grad(m, bm, x, y, rel)
        g, _ = _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_estimator="rgs", gls_pop=4, gls_sigma=1e-7,
                                                   gls_sigma_mode="abs", gls_relaxation=rel))
        assert torch.allclose(g, g_true, rtol=1e-3, atol=1e-5), (rel, float((g - g_true).abs().max()))
        # a larger σ really smooths: the estimate moves away from the point gradient
        g_big, _ = _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_estimator="rgs", gls_pop=4, gls_sigma=0.5,
                                                       gls_relaxation=rel))
        assert not torch.allclose(g_big, g_true, rtol=1e-3, atol=1e-5)


def test_antithetic_estimate_unbiased_for_quadratic() -> None:
    """For L(θ) = ½θᵀAθ + bᵀθ the antithetic difference is exactly 2(Aθ+b)·ε, so the PGPE
    estimate is unbiased for ∇L (= ∇L_σ): the mean of many estimates is within a few standard
    errors of it, for an anisotropic σ too."""
    torch.manual_seed(0)
    d, n_est, h = 6, 4000, 4
    Q = torch.randn(d, d, dtype=torch.float64)
    A = Q @ Q.T
    b = torch.randn(d, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64)
    sigma = torch.linspace(0.1, 1.0, d, dtype=torch.float64)
    true = A @ theta + b

    def L(t: torch.Tensor) -> torch.Tensor:  # (P, d) -> (P,)
        return 0.5 * ((t @ A) * t).sum(1) + t @ b

    ests = []
    for _ in range(n_est):
        e = torch.randn(h, d, dtype=torch.float64) * sigma
        losses = L(torch.cat([theta + e, theta - e]))
        ests.append(pgpe_gradient(losses, {"t": e}, {"t": sigma})["t"])
    E = torch.stack(ests)
    se = E.std(0) / math.sqrt(n_est)
    z = (E.mean(0) - true) / se
    assert float(z.abs().max()) < 4.5, z
    # scale check: a wrong normalisation (e.g. by σ instead of σ²) would fail this
    assert torch.allclose(E.mean(0), true, rtol=0.1, atol=5 * float(se.max()))


def test_rank_shaping_keeps_direction() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    g_true = _plain_grad(m, bm, x, y)
    g, _ = _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_pop=1000, gls_sigma=1e-2, gls_sigma_mode="abs",
                                               gls_shaping="rank"))
    assert float(torch.cosine_similarity(g, g_true, 0)) > 0.3


def test_population_is_batched() -> None:
    """Vmapped members go through one call: bm.compute runs once for the whole population (plus
    once for the centre), not once per member. ``auto`` vmaps IBP; CROWN-IBP on CPU and CROWN
    (not vmappable) loop."""
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    n_calls = {"n": 0}
    orig = bm.compute

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        n_calls["n"] += 1
        return orig(*a, **k)

    bm.compute = counting  # type: ignore[method-assign]
    cases = (("ibp", "auto", 2), ("crown-ibp", "vmap", 2), ("crown-ibp", "auto", 1 + 16), ("crown", "auto", 1 + 16))
    for est in ("pgpe", "rgs"):
        for rel, mode, expect in cases:
            n_calls["n"] = 0
            meth = GLS()
            _grad_of(meth, m, bm, x, y, _ctx(m, gls_estimator=est, gls_relaxation=rel, gls_pop=16, gls_batched=mode))
            assert n_calls["n"] == expect, (est, rel, n_calls["n"])
            assert meth.calls == ({"batched": 1, "looped": 0} if expect == 2 else {"batched": 0, "looped": 1})


def test_batched_matches_loop() -> None:
    """The vmapped population losses equal a member-by-member evaluation."""
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    meth = GLS()
    ctx = _ctx(m, gls_relaxation="crown-ibp", gls_batched="vmap")
    meth.loss_multi(m, bm, x, y, ctx)  # builds the wrapper
    w = meth._wrapper
    assert w is not None
    from certonnx.bounds import margin_matrix

    C = margin_matrix(y, 3)
    members = {f"gm.{n}": p.detach().unsqueeze(0) + 0.1 * torch.randn(5, *p.shape) for n, p in bm.gm.named_parameters()}
    with torch.no_grad():
        a = meth._evaluate(w, members, x, y, C, "crown-ibp", chunk=2)
        meth._vmap_ok["crown-ibp"] = False
        b = meth._evaluate(w, members, x, y, C, "crown-ibp", chunk=0)
    assert torch.allclose(a, b, atol=1e-5)
    assert meth.calls == {"batched": 2, "looped": 1}  # 1 from the warm-up loss_multi


def test_alpha_crown_pgpe_only_and_grads_clean() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    with pytest.raises(CertonnxError, match="alpha-crown"):
        GLS().loss_multi(m, bm, x, y, _ctx(m, gls_estimator="rgs", gls_relaxation="alpha-crown"))
    m.zero_grad(set_to_none=True)
    loss, st = GLS().loss_multi(m, bm, x, y, _ctx(m, gls_estimator="pgpe", gls_relaxation="alpha-crown",
                                                   gls_pop=2, alpha_steps=2))
    # α-CROWN's inner optimisation must not leave gradients on the model's parameters
    assert all(p.grad is None for p in m.parameters())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert st["cert_acc"] is not None


def test_sigma_adaptation_changes_sigma() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    meth = GLS()
    ctx = _ctx(m, gls_pop=16, gls_sigma_lr=0.2)
    meth.loss_multi(m, bm, x, y, ctx)
    s0 = {n: s.clone() for n, s in meth._sigma_state.items()}  # type: ignore[union-attr]
    meth.loss_multi(m, bm, x, y, _ctx(m, gls_pop=16, gls_sigma_lr=0.2, seed=4))
    changed = any(not torch.equal(s0[n], s) for n, s in meth._sigma_state.items())  # type: ignore[union-attr]
    assert changed
    for n, s in meth._sigma_state.items():  # type: ignore[union-attr]
        assert (s > 0).all() and (s <= 10 * meth._sigma0[n] + 1e-12).all()


def test_logged_value_is_smoothed_loss() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    _, plain = _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_mix=1.0))
    _, smooth = _grad_of(GLS(), m, bm, x, y, _ctx(m, gls_pop=64, gls_sigma=1e-4, gls_sigma_mode="abs"))
    assert abs(plain - smooth) < 1e-3 * max(1.0, abs(plain))


@pytest.mark.parametrize("est,rel", [("pgpe", "ibp"), ("pgpe", "crown-ibp"), ("pgpe", "crown"),
                                     ("rgs", "ibp"), ("rgs", "crown-ibp"), ("rgs", "crown")])
def test_training_steps(est: str, rel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from certonnx.train.loop import TrainConfig, Trainer

    monkeypatch.setitem(REGISTRY, "gls", GLS)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(48, 1, 4, 4)
    y = (x.flatten(1)[:, :3].argmax(1)).long()
    before = [p.detach().clone() for p in m.parameters()]
    cfg = TrainConfig(norms={"linf": 0.05}, method="gls", epochs=2, batch_size=16, lr=1e-2, warmup_epochs=0,
                      ramp_epochs=1, num_classes=3,
                      options={"gls_estimator": est, "gls_relaxation": rel, "gls_pop": "8", "gls_sigma": "0.05"})
    log = Trainer(m, x, y, cfg, progress=False).fit()
    assert len(log) == 2
    assert all(math.isfinite(e["loss"]) and e["cert_acc"] is not None for e in log)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_bad_options() -> None:
    m = _tiny()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    for opts in ({"gls_estimator": "sgd"}, {"gls_relaxation": "deeppoly"}, {"gls_sigma": 0},
                 {"gls_mix": 2}, {"gls_pop": 1}, {"gls_sigma_mode": "x"}, {"gls_shaping": "x"},
                 {"gls_batched": "gpu"}):
        with pytest.raises(CertonnxError):
            GLS().loss_multi(m, bm, x, y, _ctx(m, **opts))


def test_batchnorm_members_do_not_touch_running_stats() -> None:
    """Members normalise with their own batch statistics but never update the running ones;
    the vmapped path works with BatchNorm in training mode."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    bm = BoundedModule(m, (4,))
    x, y = _data()
    bn = m[1]
    counts = []
    for pop in (2, 32):
        n0 = int(bn.num_batches_tracked)
        meth = GLS()
        loss, _ = meth.loss_multi(m, bm, x, y, _ctx(m, gls_pop=pop, gls_relaxation="crown-ibp", gls_batched="vmap"))
        loss.backward()
        counts.append(int(bn.num_batches_tracked) - n0)
        assert meth.calls["batched"] == 1 and bn.track_running_stats
    assert counts[0] == counts[1]  # independent of the population size
