"""Adversarial differential soundness: random graphs from every op family, exported to ONNX,
imported, bounded by every method under L∞ and L2, and checked against onnxruntime (and a
float64 reference) at sampled, corner, gradient and PGD points; the Lipschitz certificate against
measured ratios and exact operator norms; small ReLU nets against the exact MILP optimum.
The machinery is in ``tests/soundness_harness.py``; ``tools/soundness_fuzz.py`` runs it for hours.

CI runs a fixed, derandomized set of examples per family (``CERTONNX_SOUNDNESS_EXAMPLES`` raises
the count; ``CERTONNX_SOUNDNESS_RANDOM=1`` draws fresh ones) plus one named test per known bug
class. A failure prints the case id (``family/seed``), its construction, by how much which bound
was exceeded, the saved ONNX file and the replay command:
``python tools/soundness_fuzz.py --replay CASE_ID``. A clear ``UnsupportedOpError`` from the engine
is a sound refusal and passes (it is counted in the case's flags).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.soundness_harness import (
    FAMILIES,
    REGRESSIONS,
    Case,
    CaseResult,
    Config,
    Summary,
    build_case,
    run_case,
)

_EXAMPLES = int(os.environ.get("CERTONNX_SOUNDNESS_EXAMPLES", "10"))
RANDOM = os.environ.get("CERTONNX_SOUNDNESS_RANDOM") == "1"
CFG = Config()
SUMMARY = Summary()


def soundness_settings() -> settings:
    """Derandomized in CI (the same cases every run); no shrinking: a case's seed is not a size,
    and every rerun of a failing case costs a full export/import/bound cycle."""
    return settings(
        max_examples=_EXAMPLES,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        print_blob=True,
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the cases' ONNX files go (kept: a failure message names the file)."""
    return tmp_path_factory.mktemp("soundness")


@pytest.fixture(scope="module", autouse=True)
def _module_setup() -> Iterator[None]:
    """One torch thread (tiny graphs: faster, and it leaves the second CI core to the other xdist
    worker); at the end, the per-family table goes to ``$CERTONNX_SOUNDNESS_REPORT`` if set."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    out = os.environ.get("CERTONNX_SOUNDNESS_REPORT")
    if out:
        Path(out).write_text(SUMMARY.table() + "\n")


def check(res: CaseResult, head: str = "") -> None:
    """The one assertion of this file: no violation, no engine crash. The message is the case's
    report (construction, what was exceeded by how much, ONNX file, replay command), nothing else."""
    SUMMARY.add(res)
    if res.failed:
        pytest.fail(head + "\n" + res.report(), pytrace=False)


def run(name: str, workdir: Path) -> CaseResult:
    """The named regression case (``tests/soundness_harness.REGRESSIONS``)."""
    return run_case(REGRESSIONS[name](), workdir, CFG)


# --------------------------------------------------------------------------------------------
# random cases, every family
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_random_cases_are_sound(family: str, workdir: Path) -> None:
    @soundness_settings()
    @given(seed=st.integers(0, 2**31 - 1))
    def case(seed: int) -> None:
        check(run_case(build_case(family, seed), workdir, CFG), f"case seed {seed} (id {family}/{seed})")

    case()


# --------------------------------------------------------------------------------------------
# named regressions: one per known bug class
# --------------------------------------------------------------------------------------------
def test_l2_ball_through_broadcasting_add(workdir: Path) -> None:
    """x (B,1,16) + c (4,16) -> Flatten -> Linear(ones) -> ReLU -> Linear under L2 eps 0.1: the
    added constant copies each input four times, so the L2 radius of the sum is 2·eps; a point
    0.0999 from x takes the ReLU input to 1.598."""
    check(run("l2_broadcast_add", workdir))
    check(run("l2_broadcast_add_torch", workdir))


def test_l2_grayscale_minus_rgb_mean_before_conv(workdir: Path) -> None:
    check(run("l2_gray_minus_rgb_mean", workdir))


def _gain(res: CaseResult, label: str, norm: str = "l2") -> float:
    gains = [m for op, n, _, m in res.op_gains if op == label and n == norm]
    assert gains, f"no {label}/{norm} constant was checked: {res.op_gains} flags {res.flags}"
    return max(gains)


@pytest.mark.parametrize(("name", "label", "true_gain"), [
    ("lip_conv2d_dilation", "Conv", 6.372281323269014),
    ("lip_conv1d_dilation", "Conv", 1.9021130325903075),
    ("lip_maxpool_dilation", "MaxPool", 2.0),
    ("lip_avgpool_ceil", "AvgPool", 1.0),
    ("lip_adaptive_upsample", "AvgPool", 1.5),
    ("lip_gather_repeat", None, 2.0),
    ("lip_gather_repeat_onnx", None, 2.0),
])
def test_lipschitz_constant_of_op(name: str, label: str | None, true_gain: float, workdir: Path) -> None:
    """Each op's constant must be at least its true L2 gain (measured here exactly, from the op's
    Jacobian); the composed certificate must hold for onnxruntime's outputs."""
    res = run(name, workdir)
    check(res)
    if "no-lipschitz/l2" in res.flags or res.refused:
        return  # refusing a constant is sound
    claimed = [c for op, n, c, _ in res.op_gains if n == "l2" and (label is None or op == label)]
    measured = _gain(res, label, "l2") if label else max(m for _, n, _, m in res.op_gains if n == "l2")
    assert measured == pytest.approx(true_gain, rel=1e-6), "the harness must measure the true gain"
    assert max(claimed) >= true_gain * (1 - 1e-6)


def test_wide_linear_float_rounding(workdir: Path) -> None:
    """Linear(4096->1) + ReLU, bias at the rounding threshold of the maximising corner: the bounds
    must contain onnxruntime's float32 output and the float64 output at that corner."""
    check(run("float_wide_linear_relu", workdir))


def test_cast_to_float16_and_back(workdir: Path) -> None:
    """(x.half().float() - x) * 1e4 reaches about ±2.44 in onnxruntime; [0, 0] is unsound."""
    check(run("cast_fp16_roundtrip", workdir))


def test_clip_with_min_above_max(workdir: Path) -> None:
    check(run("clip_min_gt_max", workdir))


@pytest.mark.parametrize("name", ["clip_infinite_limit", "clip_infinite_limit_torch"])
def test_clip_with_an_infinite_limit(name: str, workdir: Path) -> None:
    """clamp(x, -0.5, inf): no NaN bounds (found by the fuzzer in the torch path)."""
    check(run(name, workdir))


def test_crown_on_wide_clip_is_intersected_with_ibp(workdir: Path) -> None:
    """Sound, and CROWN's final bound no wider than IBP's (both are sound: the intersection is)."""
    res = run("wide_clip", workdir)
    check(res)
    for norm in ("linf", "l2"):
        ibp = res.widths[f"{norm}/ibp"]
        for method in ("crown-ibp", "crown", "alpha-crown"):
            key = f"{norm}/{method}"
            if key in res.widths:
                assert res.widths[key] <= ibp * (1 + 1e-6) + 1e-6, f"{key} width {res.widths[key]} > IBP {ibp}"


def test_onnx_tanh_node(workdir: Path) -> None:
    """An ONNX Tanh node (opset 18): bounded correctly or refused with UnsupportedOpError."""
    check(run("onnx_tanh", workdir))


@pytest.mark.parametrize("name", ["lip_broadcast_sub", "lip_broadcast_outer_add"])
def test_lipschitz_of_add_sub_with_a_broadcast_operand(name: str, workdir: Path) -> None:
    """Add/Sub of two perturbed operands where one is broadcast (copied): the composed constant
    L_a + L_b ignores the copies (found by the fuzzer: ``x[..., :1] - x``, ``x[:, None] + x[:, :, None]``)."""
    check(run(name, workdir))


def test_lipschitz_radius_holds_in_onnxruntime(workdir: Path) -> None:
    """The certificate end to end: no onnxruntime point within ``lipschitz_radius`` of x may change
    the predicted class (here the radius is built on the broadcast-Sub constant above)."""
    check(run("lip_radius_broadcast_sub", workdir))


@pytest.mark.parametrize("name", ["gather_scalar_index", "gather_scalar_index_torch"])
def test_scalar_index_output_is_bounded_or_refused(name: str, workdir: Path) -> None:
    """``x[:, 3]`` leaves one value per sample (output shape (B,)): bound it or refuse it, no crash."""
    check(run(name, workdir))


def test_model_that_mixes_samples_is_refused(workdir: Path) -> None:
    """``x.flip(0)``: per-sample bounds of a model that reverses the batch are meaningless."""
    check(run("batch_mixing_flip", workdir))


def test_float16_overflow_gives_infinite_not_nan_bounds(workdir: Path) -> None:
    """A set that reaches float16 overflow: sound bounds are a finite lower bound and +inf. NaN
    claims nothing and compares false, so ``not (lb < 0)``-style checks would pass on it."""
    res = run("cast_fp16_overflow_edge", workdir)
    check(res)
    nan = {k: v for k, v in res.widths.items() if math.isnan(v)}
    assert not nan, f"NaN bounds (widths {nan})\n" + res.report()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_relu_nets_against_milp(seed: int, workdir: Path) -> None:
    res = run_case(build_case("milp", seed), workdir, CFG)
    check(res)
    assert res.checks > 0


# --------------------------------------------------------------------------------------------
# the harness itself: its checks must not be vacuous
# --------------------------------------------------------------------------------------------
def test_harness_catches_bounds_that_are_too_tight(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from certonnx.bounds import engine

    real = engine.BoundedModule.compute

    def shrunk(self, *a, **k):  # type: ignore[no-untyped-def]
        lb, ub = real(self, *a, **k)
        mid = (lb + ub) / 2
        return lb + 0.05 * (mid - lb) + 1e-3, ub - 0.05 * (ub - mid) - 1e-3

    monkeypatch.setattr(engine.BoundedModule, "compute", shrunk)
    res = run_case(build_case("relu", 5), workdir, CFG)
    assert any(v.check == "bound" and v.reference == "ort" for v in res.violations), res.report()


def test_harness_catches_a_lipschitz_constant_that_is_too_small(workdir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from certonnx.bounds.rules import linear

    real = linear.LinearRule.lipschitz
    monkeypatch.setattr(linear.LinearRule, "lipschitz", lambda self, vals, norm: 0.5 * real(self, vals, norm))
    lin = torch.nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(18.0).view(3, 6) / 10 - 0.8)
    case = Case("selftest/lipschitz", "selftest", lin.eval(), (6,), torch.full((1, 6), 0.5), {"linf": 0.1, "l2": 0.2},
                (0.0, 1.0), "Linear(6->3) with fixed weights")
    res = run_case(case, workdir, CFG)
    checks = {v.check for v in res.violations}
    assert {"op-lipschitz", "jacobian"} <= checks, res.report()


def test_every_registered_family_builds() -> None:
    """Each family yields cases (and the ids rebuild the same construction)."""
    for fam in FAMILIES:
        a, b = build_case(fam, 11), build_case(fam, 11)
        assert a.case_id == f"{fam}/11" and a.desc == b.desc
        assert torch.equal(a.x, b.x)


@pytest.mark.parametrize("how", ["data_copy", "data_assign", "inplace_no_grad", "bias_inplace"])
def test_bounds_follow_in_place_weight_updates(how: str) -> None:
    """A BoundedModule that lives across weight updates (training, then certification) must bound
    the model as it is now. Updates through ``.data`` (weight clipping, EMA, ``dist.broadcast(
    t.data)``) do not bump the parameter's version counter, so caches keyed on it go stale."""
    from torch import nn

    from certonnx.bounds import BoundedModule, InputSet

    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        net[1].running_var.fill_(1.0)
    bm = BoundedModule(net, (4,))
    x = torch.rand(1, 4, generator=g)
    inset = InputSet(x, 0.1, "linf")
    with torch.no_grad():
        bm.compute(inset, None, "ibp")  # fills the caches
        if how == "data_copy":
            net[0].weight.data.copy_(net[0].weight.data * 3)
            net[1].running_mean.data.add_(1.0)
        elif how == "data_assign":
            net[0].weight.data = net[0].weight.data * 3
        elif how == "bias_inplace":  # the bias of the layer folded into the BatchNorm (IBP)
            net[0].bias.add_(5.0)
        else:
            net[0].weight.mul_(3)
        y = net(x)
        for method in ("ibp", "crown"):
            lb, ub = bm.compute(inset, None, method)
            assert bool((lb <= y).all() and (y <= ub).all()), (
                f"{method} after a {how} weight update: output {y.tolist()} outside [{lb.tolist()}, {ub.tolist()}]")
