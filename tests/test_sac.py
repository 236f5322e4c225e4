"""Shrink & Cert: the shrinkage parametrization is invisible to the function at setup, seen by
the bound engine, baked by export; shrinkage lowers the Lipschitz constant; the bi-level step
keeps s in range with the correct hypergradient; the Lipschitz certificate is never beaten by
PGD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certonnx.bounds import BoundedModule, InputSet
from certonnx.bounds.lipschitz import lipschitz_radius, node_constants
from certonnx.certify.lipschitz_cert import certify_lipschitz
from certonnx.train.methods.base import StepContext
from certonnx.train.methods.sac import SaC, add_shrinkage, log_lipschitz, shrink_modules
from tests.paths import FIXTURES
from tests.train_util import one_thread, small_cnn_bn, small_mlp, synthetic_xy  # noqa: F401

FIX = FIXTURES


def _randomize_s(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, sh in shrink_modules(module):
            sh.s.copy_(sh.alpha * (0.2 + 0.8 * torch.rand(sh.s.shape, generator=g)))


def _ctx(module: nn.Module, step: int = 0, **opts) -> StepContext:  # type: ignore[no-untyped-def]
    return StepContext(module=module, epoch=0, step=step, eps={"l2": 0.5}, eps_target={"l2": 0.5}, progress=1.0,
                       num_classes=3, options=dict(opts))


@pytest.mark.parametrize("gran", ["weight", "channel"])
def test_setup_keeps_function_engine_sees_it_export_bakes_it(gran: str, tmp_path: Path) -> None:
    from certonnx.io import export, load

    m = load(FIX / "cnn_ts.onnx", n_parity=2)
    x = torch.rand(4, *m.sample_shape)
    with torch.no_grad():
        before = m.module(x).clone()
    params = add_shrinkage(m.module, alpha=0.2, granularity=gran)
    assert len(params) >= 2 and add_shrinkage(m.module, 0.2, gran) == params  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(m.module(x), before, atol=1e-5, rtol=1e-5)
    _randomize_s(m.module)
    with torch.no_grad():
        after = m.module(x)
    assert (after - before).abs().max() > 1e-3  # the shrinkage acts
    # the bound engine sees the shrunk weights: a zero-radius box bounds the output exactly
    bm = BoundedModule(m.module, m.sample_shape)
    with torch.no_grad():
        lb, ub = bm.compute(InputSet(x, 0.0, norm="linf"), method="ibp")
    # exact up to the float32 rounding allowance the engine adds (certonnx.bounds.rounding)
    assert bool((lb <= after).all() and (after <= ub).all())
    assert float((ub - lb).max()) < 2e-3
    # export bakes W ⊙ clamp(|s|, 0, α) into plain weights, parity-checked by onnxruntime
    p = export(m, tmp_path / "sac.onnx", n_parity=2)
    assert shrink_modules(m.module)  # the caller's model keeps its parametrization
    m2 = load(p, n_parity=2)
    with torch.no_grad():
        np.testing.assert_allclose(m2.module(x).numpy(), after.numpy(), atol=1e-5)
    assert not any(n.endswith(".s") for n, _ in m2.module.named_parameters())
    # Lipschitz certification of the parametrized model; counterexamples re-checked on the file
    y = after.argmax(1)
    y[:2] = (y[:2] + 1) % after.shape[1]  # two misclassified samples: falsified by onnxruntime
    res = certify_lipschitz(m, x, y, {"l2": 0.01}, pgd_steps=3, onnx_path=p)
    sc = res["status_counts"]["l2"]
    assert res["falsification_check"] == "onnxruntime" and sc["falsified"] >= 2
    assert sc["verified"] + sc["falsified"] + sc["unknown"] == 4


def test_shrinkage_lowers_lipschitz_constant(one_thread) -> None:  # noqa: F811
    gm = small_mlp(seed=1)
    add_shrinkage(gm, alpha=0.2)
    bm = BoundedModule(gm, (1, 8, 8))
    L0 = {n: node_constants(bm, n)[bm.output_node] for n in ("l2", "linf")}
    # the differentiable penalty agrees with the registry's constants on a chain
    assert abs(float(log_lipschitz(gm, "l2").detach()) - np.log(L0["l2"])) < 1e-4
    with torch.no_grad():
        for _, _, sh in shrink_modules(gm):
            sh.s.mul_(0.5)
    for n in ("l2", "linf"):
        L1 = node_constants(bm, n)[bm.output_node]
        assert L1 == pytest.approx(0.25 * L0[n], rel=1e-5)  # two layers, each halved
    # |s| above the cap changes nothing (clamp), and the constant is at most α·||W_stored||
    with torch.no_grad():
        for _, _, sh in shrink_modules(gm):
            sh.s.fill_(5.0)
    assert node_constants(bm, "l2")[bm.output_node] == pytest.approx(L0["l2"], rel=1e-5)


def test_unrolled_hypergradient_matches_finite_differences(one_thread) -> None:  # noqa: F811
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))).double()
    meth = SaC()
    opts = {"sac_alpha": 0.5, "sac_xi": 0.3, "sac_lip_weight": 0.1, "sac_granularity": "channel"}
    meth.setup(gm, opts)
    _randomize_s(gm, seed=3)
    x = torch.rand(16, 1, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    xt, yt, xv, yv = x[:8], y[:8], x[8:], y[8:]
    ctx = _ctx(gm, **opts)
    layers = shrink_modules(gm)

    def upper_value() -> torch.Tensor:  # L_val(W - ξ ∇_W L_train(W, s), s)
        from torch.func import functional_call

        Ws = [sub.parametrizations["weight"].original for _, sub, _ in layers]
        g = torch.autograd.grad(meth._objective(gm(xt), yt, gm, ctx), Ws)
        new = {f"{n}.parametrizations.weight.original": W - 0.3 * gw for (n, _, _), W, gw in zip(layers, Ws, g)}
        out = functional_call(gm, new, (xv,))
        origs = {n: new[f"{n}.parametrizations.weight.original"] for n, _, _ in layers}
        return meth._objective(out, yv, gm, ctx, originals=origs)

    s = layers[0][2].s
    rec = _Recorder(meth.params)
    meth.opt_s = rec  # type: ignore[assignment]
    meth.upper_step(gm, xt, yt, xv, yv, ctx)
    assert rec.grads is not None
    g = rec.grads[0]
    for idx in [(0, 0), (3, 0)]:
        h = 1e-6
        with torch.no_grad():
            s[idx] += h
        up = float(upper_value().detach())
        with torch.no_grad():
            s[idx] -= 2 * h
        dn = float(upper_value().detach())
        with torch.no_grad():
            s[idx] += h
        assert g[idx].item() == pytest.approx((up - dn) / (2 * h), rel=1e-4, abs=1e-8)
    # the first-order variant drops the mixed second-order term: a different value here
    rec2 = _Recorder(meth.params)
    meth.opt_s = rec2  # type: ignore[assignment]
    meth.upper_step(gm, xt, yt, xv, yv, _ctx(gm, **opts, sac_hypergrad="first"))
    assert rec2.grads is not None and not torch.allclose(rec2.grads[0], g)


class _Recorder:
    """Stands in for the upper-level optimizer: records the hypergradients, steps nothing."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.grads: list[torch.Tensor] | None = None

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.params]  # type: ignore[union-attr]

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


@pytest.mark.parametrize("hypergrad", ["unrolled", "first"])
def test_trainer_runs_bilevel_and_s_stays_in_range(hypergrad: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, one_thread) -> None:  # noqa: F811
    from certonnx.train.loop import TrainConfig, Trainer
    from certonnx.train.methods import REGISTRY

    monkeypatch.setitem(REGISTRY, "sac", SaC)
    x, y = synthetic_xy(96)
    gm = small_cnn_bn(seed=0)
    opts = {"sac_alpha": 0.3, "sac_lr": 0.02, "sac_lip_weight": 0.5, "sac_hypergrad": hypergrad, "sac_loss": "lmt"}
    cfg = TrainConfig(norms={"l2": 0.3}, method="sac", epochs=2, batch_size=32, lr=5e-3, num_classes=3,
                      options=opts)
    tr = Trainer(gm, x, y, cfg, progress=False)
    tr.method.setup(gm, opts)  # what the first loss() call does (idempotent)
    W_before = {n: p.detach().clone() for n, p in gm.named_parameters()}
    bm0 = BoundedModule(gm, (1, 8, 8))
    L_before = node_constants(bm0, "l2")[bm0.output_node]
    log = tr.fit()
    assert all(np.isfinite(e["loss"]) for e in log) and log[-1]["cert_acc"] is not None
    sh = shrink_modules(gm)
    assert len(sh) == 3  # 1 conv + 2 linear
    for _, _sub, p in sh:
        assert float(p.s.detach().min()) >= 0.0 and float(p.s.detach().max()) <= p.alpha + 1e-7
    assert any(float((p.s.detach() - p.alpha).abs().max()) > 1e-3 for _, _, p in sh)  # s moved
    moved = [n for n, p in gm.named_parameters() if n in W_before and not torch.equal(p, W_before[n])]
    assert any(n.endswith("original") for n in moved)  # the lower level trained W
    bm = BoundedModule(gm, (1, 8, 8))
    assert node_constants(bm, "l2")[bm.output_node] < L_before  # the Lipschitz penalty shrank it
    # resume: a fresh model + setup (the trainer hook) loads the parametrized state_dict
    state = {"model": gm.state_dict(), "method": tr.method.state_dict()}
    gm2 = small_cnn_bn(seed=5)
    m2 = SaC()
    m2.setup(gm2, opts)
    gm2.load_state_dict(state["model"])
    m2.load_state_dict(state["method"])
    gm.eval()
    gm2.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm2(x[:8]), gm(x[:8]))
    assert m2.opt_s is not None and len(m2.opt_s.state) == len(sh)


def test_upper_step_leaves_batchnorm_statistics_alone(one_thread) -> None:  # noqa: F811
    gm = small_cnn_bn(seed=0)
    meth = SaC()
    meth.setup(gm, {"sac_lr": 0.05})
    x, y = synthetic_xy(32)
    gm.train()
    bn = next(m for m in gm.modules() if isinstance(m, nn.BatchNorm2d))
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    s_before = meth.params[0].detach().clone()
    meth.upper_step(gm, x[:16], y[:16], x[16:], y[16:], _ctx(gm, sac_lr=0.05))
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.track_running_stats
    assert not torch.equal(meth.params[0].detach(), s_before)  # while s did take a step


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_lipschitz_certificate_never_beaten_by_pgd(norm: str, one_thread) -> None:  # noqa: F811
    from certonnx.attacks import pgd_attack

    torch.manual_seed(0)
    x, y = synthetic_xy(64, seed=2)
    gm = small_mlp(seed=0)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    for _ in range(60):  # a model with real margins, so radii are not all zero
        opt.zero_grad()
        nn.functional.cross_entropy(gm(x), y).backward()
        opt.step()
    eps = 0.3 if norm == "l2" else 0.02
    res = certify_lipschitz(gm, x, y, {norm: eps}, pgd_steps=10)
    for key in ("n", "clean_accuracy", "pgd_accuracy", "certified_accuracy", "union_certified_accuracy",
                "epsilon", "input_space", "seconds", "mean_certified_radius"):
        assert key in res
    assert res["method"] == "lipschitz" and res["n"] == 64
    assert sum(res["status_counts"][norm].values()) == 64
    assert res["per_method"][norm]["lipschitz"] == res["status_counts"][norm]["verified"]
    assert res["certified_accuracy"][norm] <= res["pgd_accuracy"][norm] <= res["clean_accuracy"]
    bm = BoundedModule(gm, (1, 8, 8))
    r = lipschitz_radius(bm, x, y, norm)
    assert float(r.max()) > 0
    assert res["mean_certified_radius"][norm] == pytest.approx(float(r.mean()), rel=1e-5)
    # the smallest radius (on a grid) at which PGD breaks a sample is never below its Lipschitz radius
    grid = torch.tensor([0.25, 0.5, 1.0, 2.0, 4.0, 8.0]) * (1.0 if norm == "l2" else 0.05)
    correct = gm(x).argmax(1) == y
    for e in grid:
        adv = pgd_attack(gm, x, y, float(e), norm, (0.0, 1.0), steps=30, restarts=2,
                         generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            broken = (gm(adv).argmax(1) != y) & correct
        assert not bool((broken & (r > e)).any())
    assert bool(((gm(x).argmax(1) == y) & (r < grid[-1])).any())  # the grid does reach attackable radii
