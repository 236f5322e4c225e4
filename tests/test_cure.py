"""CURE multi-norm certified training: variants, bound alignment, gradient projection, radii."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certonnx.bounds import BoundedModule
from certonnx.errors import CertonnxError
from certonnx.train.methods.base import StepContext, robust_ce
from certonnx.train.methods.cure import (
    CURE,
    bound_alignment,
    combine_losses,
    default_norms,
    parse_norms_with_defaults,
    project_gradients,
    robust_ce_per_sample,
    surrogate_loss,
)

NORMS = {"linf": 0.05, "l2": 0.2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _problem(n: int = 64, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny MLP on an easy 3-class problem (labels from the mean brightness)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.rand(n, 1, 4, 4)
    mean = x.flatten(1).mean(1)
    y = (mean > 0.45).long() + (mean > 0.55).long()
    return m, x, y


def _ctx(m: nn.Module, step: int = 0, norms: dict[str, float] | None = None, **opts: object) -> StepContext:
    norms = dict(NORMS if norms is None else norms)
    return StepContext(module=m, epoch=0, step=step, eps=norms, eps_target=dict(norms), progress=1.0,
                       num_classes=3, generator=torch.Generator().manual_seed(1000 + step), options=dict(opts))


def _train(variant: str, steps: int = 20, **opts: object) -> list[float]:
    m, x, y = _problem()
    bm = BoundedModule(m, (1, 4, 4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    method = CURE()
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, st = method.loss_multi(m, bm, x, y, _ctx(m, s, cure_variant=variant, pgd_steps=3, **opts))
        assert torch.isfinite(loss)
        assert st["clean_acc"] is not None and st["cert_acc"] is not None
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("variant,opts", [
    ("joint", {}),
    ("max", {}),
    ("random", {}),
    ("joint", {"cure_align": 0.5, "cure_align_on": "all"}),
    ("joint", {"cure_gp": 0.8}),
    ("max", {"cure_clean_weight": 0.5, "cure_gp": "0.5", "cure_gp_project": "false"}),
])
def test_variants_train(variant: str, opts: dict[str, object]) -> None:
    losses = _train(variant, **opts)
    assert all(torch.isfinite(torch.tensor(losses)))
    # decreasing: the mean of the last 5 steps is clearly below the first steps'
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 0.05, (first, last)


def test_per_sample_ce_matches_robust_ce() -> None:
    lb = torch.randn(7, 4)
    assert torch.allclose(robust_ce_per_sample(lb).mean(), robust_ce(lb))


def test_max_picks_worst_norm_per_sample() -> None:
    # sample 0 is worst under L∞, sample 1 under L2
    lb_inf = torch.tensor([[-2.0, -1.0], [3.0, 2.0]])
    lb_l2 = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    per = {"linf": robust_ce_per_sample(lb_inf), "l2": robust_ce_per_sample(lb_l2)}
    expected = torch.stack([per["linf"][0], per["l2"][1]]).mean()
    assert torch.allclose(combine_losses(per, "max"), expected)
    assert torch.allclose(combine_losses(per, "joint"), (per["linf"].mean() + per["l2"].mean()) / 2)
    assert combine_losses(per, "max") > combine_losses(per, "joint")
    with pytest.raises(CertonnxError):
        combine_losses(per, "nope")


class _Recording(CURE):
    """CURE that records which norms it bounds."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def region_bounds(self, model_fn, bm, x, y, eps, norm, ctx):  # type: ignore[no-untyped-def]
        self.seen.append(norm)
        return super().region_bounds(model_fn, bm, x, y, eps, norm, ctx)


def test_random_variant_reproducible_and_draws_both_norms() -> None:
    m, x, y = _problem(16)
    bm = BoundedModule(m, (1, 4, 4))
    drawn = []
    for step in range(10):
        runs = []
        for _ in range(2):
            rec = _Recording()
            loss, _ = rec.loss_multi(m, bm, x, y, _ctx(m, step, cure_variant="random", pgd_steps=2))
            assert len(rec.seen) == 1  # one norm per batch
            runs.append((rec.seen[0], float(loss.detach())))
        assert runs[0] == runs[1]  # same generator seed -> same norm, same attack, same loss
        drawn.append(runs[0][0])
    assert set(drawn) == {"linf", "l2"}
    rec = _Recording()
    rec.loss_multi(m, bm, x, y, _ctx(m, 0, cure_variant="joint", pgd_steps=2))
    assert rec.seen == ["linf", "l2"]


def test_bound_alignment_zero_iff_equal() -> None:
    lb = torch.randn(5, 9)
    assert float(bound_alignment(lb, lb.clone())) == pytest.approx(0.0, abs=1e-7)
    other = lb + torch.randn(5, 9)
    assert float(bound_alignment(lb, other)) > 1e-4
    # only masked samples count; an empty mask gives 0
    mask = torch.tensor([True, False, False, False, False])
    other2 = lb.clone()
    other2[1:] += 3.0
    assert float(bound_alignment(lb, other2, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(bound_alignment(lb, other, torch.zeros(5, dtype=torch.bool))) == 0.0
    # only the L2 bounds receive gradient (L∞ is the target)
    a, b = lb.clone().requires_grad_(True), other.clone().requires_grad_(True)
    bound_alignment(a, b).backward()
    assert a.grad is None or float(a.grad.abs().sum()) == 0.0
    assert float(b.grad.abs().sum()) > 0


def _grads(m: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return [g.clone() for g in torch.autograd.grad(loss, list(m.parameters()))]


def test_gradient_projection_extremes() -> None:
    torch.manual_seed(3)
    m, x, y = _problem(32)
    bm = BoundedModule(m, (1, 4, 4))
    params = list(m.parameters())

    def method_grad(**opts: object) -> list[torch.Tensor]:
        loss, _ = CURE().loss_multi(m, bm, x, y, _ctx(m, 5, pgd_steps=2, **opts))
        return _grads(m, loss)

    g_cert = method_grad()  # β = 1 (default): pure certified gradient
    g_nat = _grads(m, F.cross_entropy(m(x), y))
    # β = 1 with GP requested explicitly is the certified gradient
    for a, b in zip(method_grad(cure_gp=1.0), g_cert, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # β = 0 without projection: the natural gradient
    for a, b in zip(method_grad(cure_gp=0.0, cure_gp_project=0), g_nat, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # β = 0 with projection: per tensor, the positive part of the projection of g_nat on g_cert
    for a, gc, gn in zip(method_grad(cure_gp=0.0), g_cert, g_nat, strict=True):
        coef = max(float((gn * gc).sum()), 0.0) / float((gc * gc).sum())
        assert torch.allclose(a, coef * gc, atol=1e-6)
    # mixing is linear in β
    mid = method_grad(cure_gp=0.5, cure_gp_project=0)
    for a, gc, gn in zip(mid, g_cert, g_nat, strict=True):
        assert torch.allclose(a, 0.5 * gc + 0.5 * gn, atol=1e-6)
    assert len(params) == len(mid)


def test_project_and_surrogate_helpers() -> None:
    gc = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    gn = [torch.tensor([3.0, 5.0]), torch.tensor([0.0, -1.0])]  # agrees on tensor 0, opposes on 1
    out = project_gradients(gc, gn, beta=0.0)
    assert torch.allclose(out[0], torch.tensor([3.0, 0.0]))
    assert torch.allclose(out[1], torch.zeros(2))
    p = [torch.randn(2, requires_grad=True), torch.randn(2, requires_grad=True)]
    v = torch.tensor(1.25)
    s = surrogate_loss(p, gc, v)
    assert float(s.detach()) == pytest.approx(1.25)
    s.backward()
    assert torch.equal(p[0].grad, gc[0]) and torch.equal(p[1].grad, gc[1])


def test_single_norm_is_sabr() -> None:
    """With one norm CURE is SABR with the same λ (same attack seed -> same loss)."""
    from certonnx.train.methods.sabr import SABR

    m, x, y = _problem(16)
    bm = BoundedModule(m, (1, 4, 4))
    a, _ = CURE().loss_multi(m, bm, x, y, _ctx(m, 2, norms={"linf": 0.05}, pgd_steps=2, cure_lambda=0.4))
    b, _ = SABR().loss(m, bm, x, y, 0.05, "linf", _ctx(m, 2, norms={"linf": 0.05}, pgd_steps=2, sabr_lambda=0.4))
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6)


def test_bad_options() -> None:
    m, x, y = _problem(8)
    bm = BoundedModule(m, (1, 4, 4))
    for opts in ({"cure_variant": "sum"}, {"cure_gp": 1.5}, {"cure_lambda": 0.0}, {"cure_align_on": "x"},
                 {"cure_gp": 0.5, "cure_gp_project": "maybe"}):
        with pytest.raises(CertonnxError):
            CURE().loss_multi(m, bm, x, y, _ctx(m, **opts))


def test_default_norms() -> None:
    assert default_norms((1, 28, 28)) == {"linf": 0.1, "l2": 0.75, "l1": 1.0}
    assert default_norms((784,), "large") == {"linf": 0.3, "l2": 1.0, "l1": 2.0}
    assert default_norms((3, 32, 32)) == pytest.approx({"linf": 2 / 255, "l2": 0.25, "l1": 0.5})
    assert default_norms((3, 32, 32), "large") == pytest.approx({"linf": 8 / 255, "l2": 0.5, "l1": 1.0})
    assert parse_norms_with_defaults("linf,l2,l1", (1, 28, 28)) == {"linf": 0.1, "l2": 0.75, "l1": 1.0}
    with pytest.raises(CertonnxError, match="give them explicitly"):
        default_norms((5,))
    assert parse_norms_with_defaults("linf,l2", (1, 28, 28)) == {"linf": 0.1, "l2": 0.75}
    assert parse_norms_with_defaults("Linf:0.2, L2", (1, 28, 28)) == {"linf": 0.2, "l2": 0.75}
    assert parse_norms_with_defaults("linf:0.2,l2:0.5", (5,)) == {"linf": 0.2, "l2": 0.5}
    for bad in ("", "l3", "linf,linf:0.1", "linf:abc"):
        with pytest.raises(ValueError):
            parse_norms_with_defaults(bad, (1, 28, 28))
    with pytest.raises(ValueError, match="explicitly"):
        parse_norms_with_defaults("linf", (5,))


def test_registers_and_runs_in_trainer() -> None:
    """End to end through the trainer (one short epoch), as `--method cure` will run."""
    from certonnx.train.loop import TrainConfig, Trainer
    from certonnx.train.methods import REGISTRY

    REGISTRY.setdefault("cure", CURE)
    m, x, y = _problem(64)
    cfg = TrainConfig(norms=dict(NORMS), method="cure", epochs=1, batch_size=32, num_classes=3,
                      options={"cure_variant": "max", "cure_gp": 0.8, "cure_align": 0.5, "pgd_steps": 2})
    log = Trainer(m, x, y, cfg, progress=False).fit()
    assert len(log) == 1 and log[0]["cert_acc"] is not None
    assert torch.isfinite(torch.tensor(log[0]["loss"]))


def test_l1_region_centre_stays_in_the_ball() -> None:
    """SABR/CURE's small L1 region (radius τ around the attack point, moved inward) lies in the
    ε-ball: the centre is within ε - τ in L1 (the L2 rescaling would not guarantee it)."""
    from certonnx.train.methods.sabr import shrink_into_ball

    torch.manual_seed(0)
    x = torch.rand(16, 1, 6, 6)
    x_adv = x + torch.randn_like(x)
    c = shrink_into_ball(x, x_adv, 1.0, 0.4, "l1", (0.0, 1.0))
    assert torch.all((c - x).flatten(1).abs().sum(1) <= 0.6 + 1e-6)


def test_gradient_projection_is_the_official_formula() -> None:
    """θ₀ + β·cos⁺(Δcert, Δnat)·Δnat + (1−β)·Δcert per floating tensor (src/main.py ``gp``):
    a natural update against the certified one contributes nothing; counters follow the
    certified state."""
    from certonnx.train.methods.cure import gradient_projection

    start = {"w": torch.zeros(2), "v": torch.zeros(2), "n": torch.tensor(3)}
    cert = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0, 0.0]), "n": torch.tensor(5)}
    nat = {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([-1.0, 0.0]), "n": torch.tensor(4)}
    out = gradient_projection(start, cert, nat, 0.8)
    cos = 1 / 2 ** 0.5
    assert torch.allclose(out["w"], 0.8 * cos * nat["w"] + 0.2 * cert["w"])
    assert torch.allclose(out["v"], 0.2 * cert["v"])  # cos < 0: the natural update is dropped
    assert int(out["n"]) == 5


def test_official_gradient_projection_runs_once_per_epoch_after_the_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cure_gp_epoch``: after each epoch past warm-up + ramp, a copy of the start-of-epoch
    model trains one natural epoch and the model becomes the projection of both updates."""
    import certonnx.train.methods.cure as cure_mod
    from certonnx.train.loop import TrainConfig, Trainer

    calls: list[tuple[dict, dict, dict]] = []
    real = cure_mod.gradient_projection

    def spy(start, cert, nat, beta):  # type: ignore[no-untyped-def]
        calls.append((start, cert, nat))
        out = real(start, cert, nat, beta)
        calls[-1] = (*calls[-1], out)  # type: ignore[assignment]
        return out

    monkeypatch.setattr(cure_mod, "gradient_projection", spy)
    m, x, y = _problem(64)
    cfg = TrainConfig(norms={"linf": 0.05, "l2": 0.2}, method="cure", epochs=3, batch_size=32, num_classes=3,
                      warmup_epochs=0, ramp_epochs=1, options={"cure_gp_epoch": 0.8, "pgd_steps": 2})
    Trainer(m, x, y, cfg, progress=False).fit()
    assert len(calls) == 2  # epochs 2 and 3: after the one-epoch ramp
    start, cert, nat, out = calls[-1]  # type: ignore[misc]
    w = next(k for k in start if k.endswith("weight"))
    assert not torch.equal(nat[w], cert[w]) and not torch.equal(nat[w], start[w])
    assert torch.equal(m.state_dict()[w], out[w])


def test_official_l2_region_is_a_tiny_box_at_the_l2_attack_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """The official L2 term bounds an L∞ box of radius 1e-5·ε₂ around an L2-PGD point inside the
    ε₂-ball; ``cure_l2_region=ball`` bounds an L2 ball of radius λ·ε₂."""
    import certonnx.train.methods.cure as cure_mod

    seen: list[tuple[str, float, torch.Tensor]] = []
    real = cure_mod.bound_margins

    def spy(bm, inset, y, method, ctx):  # type: ignore[no-untyped-def]
        seen.append((inset.norm, float(inset.eps.max()), inset.x))
        return real(bm, inset, y, method, ctx)

    monkeypatch.setattr(cure_mod, "bound_margins", spy)
    m, x, y = _problem(16)
    bm = BoundedModule(m, (1, 4, 4))
    CURE().loss_multi(m, bm, x, y, _ctx(m, norms={"l2": 0.5}, pgd_steps=3))
    norm, tau, c = seen[-1]
    assert norm == "linf" and tau == pytest.approx(0.5e-5)
    assert torch.all((c - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6)
    CURE().loss_multi(m, bm, x, y, _ctx(m, norms={"l2": 0.5}, pgd_steps=3, cure_l2_region="ball"))
    assert seen[-1][0] == "l2" and seen[-1][1] == pytest.approx(0.2)


def test_alignment_directions() -> None:
    """Official default (``l2``): KL(p₂‖p∞) on the L2-correct samples, gradients into both; the
    ``linf`` direction (``--reverse``): KL(p∞‖p₂), the L∞ side detached."""
    torch.manual_seed(0)
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    bound_alignment(b, a, None, detach_target=False).backward()
    assert a.grad is not None and b.grad is not None and float(b.grad.abs().sum()) > 0
    a.grad = b.grad = None
    bound_alignment(a, b).backward()
    assert a.grad is None and b.grad is not None


def test_presets_follow_the_official_scripts_and_yield_to_explicit_keys() -> None:
    o = CURE.parse_options({"cure_preset": "scratch"})
    assert (o.cure_variant, o.cure_align, o.cure_align_dir, o.cure_gp_epoch, o.cure_l2_region, o.cure_lambda) == \
        ("max", 2.0, "l2", 0.8, "official", 0.4)
    f = CURE.parse_options({"cure_preset": "finetune", "cure_align": "1.5"})
    assert (f.cure_variant, f.cure_align, f.cure_gp_epoch) == ("max", 1.5, 0.0)
    assert CURE.parse_options({}).cure_gp_epoch == 0.0  # no preset: nothing changes
    with pytest.raises(CertonnxError, match="cure_preset"):
        CURE.parse_options({"cure_preset": "fast"})
