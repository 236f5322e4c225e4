"""Erf and GELU end to end: import (opset-20 ``Gelu``, the decomposed erf and tanh patterns of
opsets < 20, ``Erf``) with parity against onnxruntime; the GELU fusion pass on every operand
order it accepts and the patterns it must leave alone; strict soundness of every bound method
under L∞ and L2 against onnxruntime's float32 execution (``tests/soundness_harness.py``: sampled
points, corners, gradient points, PGD iterates, the Lipschitz certificate, no tolerance); the
relaxation and IBP in exact arithmetic on dense grids; CROWN no looser than IBP; the kernels'
measured error inside the allowance of :mod:`certonnx.bounds.rounding`."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from certonnx.bounds import BoundedModule, InputSet
from certonnx.bounds.rounding import GELU_ERROR_ABS, GELU_ERROR_REL, exact_arithmetic
from certonnx.bounds.rules.gelu import CURVES, ERF_LIPSCHITZ, GELU_LIPSCHITZ, ibp_curve, relax_curve
from certonnx.errors import ModelLoadError, UnsupportedOpError
from certonnx.io import load
from certonnx.io import passes as P
from tests.soundness_harness import Case, Config, run_case

SQRT2 = math.sqrt(2.0)
K_TANH = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _export(mod: nn.Module, opset: int, n_in: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod.eval(), (torch.rand(2, n_in),), buf, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _save(m: onnx.ModelProto, tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.onnx"
    onnx.save(m, str(p))
    return p


def _ort(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = P.ort_session(m.SerializeToString())
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0])


def _modules(cm) -> list[nn.Module]:  # type: ignore[no-untyped-def]
    return [cm.module.get_submodule(str(n.target)) for n in cm.module.graph.nodes if n.op == "call_module"]


def _assert_parity(cm, src: onnx.ModelProto, n_in: int, atol: float = 2e-6) -> None:  # type: ignore[no-untyped-def]
    """The imported graph against onnxruntime on the *original* file, at inputs that spread the
    pre-activations over [-6, 6] and beyond."""
    x = (np.random.default_rng(0).standard_normal((64, n_in)) * 3).astype(np.float32)
    with torch.no_grad():
        y = cm.module(torch.from_numpy(x)).numpy()
    ref = _ort(src, x)
    assert np.abs(y - ref).max() <= atol * (1 + np.abs(ref).max())


def _mlp(act: nn.Module, n_in: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 6), act, nn.Linear(6, 3)).eval()


class _Erf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


# --------------------------------------------------------------------------------------------
# import: every form converts, matches onnxruntime, and is bounded as one function
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("approx", "opset", "ops"), [
    ("none", 17, {"Div", "Erf"}), ("tanh", 17, {"Tanh", "Mul"}), ("none", 18, {"Erf"}),
    ("none", 20, {"Gelu"}), ("tanh", 20, {"Gelu"}),
])
def test_gelu_imports_as_one_node(approx: str, opset: int, ops: set[str], tmp_path: Path) -> None:
    src = _export(_mlp(nn.GELU(approximate=approx)), opset, 4)
    assert ops <= set(P.op_counts(src)), "the exporter no longer writes the form this test is about"
    cm = load(str(_save(src, tmp_path, f"gelu_{approx}_{opset}")))
    gelus = [m for m in _modules(cm) if isinstance(m, nn.GELU)]
    assert len(gelus) == 1 and gelus[0].approximate == approx
    assert "fuse GELU" in cm.module.meta["certonnx_import_notes"] or opset >= 20
    _assert_parity(cm, src, 4)
    bm = BoundedModule(cm.module, cm.sample_shape)
    assert {r.label for r in bm.rules.values()} >= {"Gelu"}
    assert not any(r.label == "Mul" for r in bm.rules.values())


@pytest.mark.parametrize("opset", [13, 17, 20])
def test_erf_imports_and_is_bounded(opset: int, tmp_path: Path) -> None:
    src = _export(_mlp(_Erf()), opset, 4)
    assert "Erf" in P.op_counts(src)
    cm = load(str(_save(src, tmp_path, f"erf{opset}")))
    _assert_parity(cm, src, 4)
    bm = BoundedModule(cm.module, cm.sample_shape)
    assert "Erf" in {r.label for r in bm.rules.values()}


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_gelu_export_round_trip(approx: str, tmp_path: Path) -> None:
    """An imported GELU (opset 20) exports as the standard opset-17 decomposition, which imports
    back as one GELU with parity."""
    from certonnx.io import export

    src = _export(_mlp(nn.GELU(approximate=approx)), 20, 4)
    cm = load(str(_save(src, tmp_path, f"rt_{approx}")))
    out = tmp_path / f"rt_{approx}_out.onnx"
    export(cm, out)
    cm2 = load(str(out))
    assert [m.approximate for m in _modules(cm2) if isinstance(m, nn.GELU)] == [approx]
    _assert_parity(cm2, src, 4)


def _pattern_model(nodes: list[onnx.NodeProto], consts: dict[str, float], out: str = "y",
                   extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """input (N, 5) -> MatMul W -> h -> nodes -> out -> MatMul V -> output."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((5, 7)) * 1.5).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((7, 3)).astype(np.float32), "V")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    nodes = [helper.make_node("MatMul", ["input", "W"], ["h"]), *nodes,
             helper.make_node("MatMul", [out, "V"], ["output"])]
    outs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])]
    outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", 7]) for o in extra_outputs]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 5])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def N(op: str, ins: list[str], out: str) -> onnx.NodeProto:  # noqa: N802 - reads like the graph
    return helper.make_node(op, ins, [out])


_ERF_CONSTS = {"s2": SQRT2, "r2": 1 / SQRT2, "one": 1.0, "half": 0.5}
_TANH_CONSTS = {"k": K_TANH, "c": 0.044715, "one": 1.0, "half": 0.5, "three": 3.0}
FUSED = {
    "div, x*a*half": [N("Div", ["h", "s2"], "t"), N("Erf", ["t"], "e"), N("Add", ["e", "one"], "a"),
                      N("Mul", ["h", "a"], "p"), N("Mul", ["p", "half"], "y")],
    "mul 1/sqrt2, consts first, a*x*half": [
        N("Mul", ["r2", "h"], "t"), N("Erf", ["t"], "e"), N("Add", ["one", "e"], "a"),
        N("Mul", ["a", "h"], "p"), N("Mul", ["half", "p"], "y")],
    "(a*half)*x": [N("Div", ["h", "s2"], "t"), N("Erf", ["t"], "e"), N("Add", ["e", "one"], "a"),
                   N("Mul", ["a", "half"], "p"), N("Mul", ["h", "p"], "y")],
    "(x*half)*a": [N("Mul", ["h", "half"], "xh"), N("Div", ["h", "s2"], "t"), N("Erf", ["t"], "e"),
                   N("Add", ["e", "one"], "a"), N("Mul", ["xh", "a"], "y")],
    "tanh, pow": [N("Pow", ["h", "three"], "x3"), N("Mul", ["x3", "c"], "m"), N("Add", ["h", "m"], "s"),
                  N("Mul", ["s", "k"], "z"), N("Tanh", ["z"], "th"), N("Add", ["th", "one"], "a"),
                  N("Mul", ["h", "a"], "p"), N("Mul", ["p", "half"], "y")],
    "tanh, x*(x*x), consts first": [
        N("Mul", ["h", "h"], "x2"), N("Mul", ["h", "x2"], "x3"), N("Mul", ["c", "x3"], "m"),
        N("Add", ["m", "h"], "s"), N("Mul", ["k", "s"], "z"), N("Tanh", ["z"], "th"),
        N("Add", ["one", "th"], "a"), N("Mul", ["half", "h"], "xh"), N("Mul", ["a", "xh"], "y")],
}


@pytest.mark.parametrize("name", list(FUSED))
def test_fuse_gelu_operand_orders(name: str, tmp_path: Path) -> None:
    nodes = FUSED[name]
    src = _pattern_model(nodes, _TANH_CONSTS if "tanh" in name else _ERF_CONSTS)
    fused = P.fuse_gelu(src)
    ops = P.op_counts(fused)
    want = "com.microsoft:FastGelu" if "tanh" in name else "com.microsoft:Gelu"
    assert ops.get(want) == 1 and not {"Erf", "Tanh", "Div", "Pow", "Add"} & set(ops), ops
    assert np.allclose(_ort(fused, np.ones((2, 5))), _ort(src, np.ones((2, 5))), atol=1e-6)
    cm = load(str(_save(src, tmp_path, name.replace(" ", "_").replace("*", "x").replace("/", "_"))))
    _assert_parity(cm, src, 5)
    BoundedModule(cm.module, cm.sample_shape)


def test_fixed_batch_model_with_gelu_becomes_batch_dynamic(tmp_path: Path) -> None:
    """A file exported with batch 1 whose Reshape(1, -1) comes after a GELU: the loader finds the
    Reshape's batch entry by shape inference, which must see through the fused contrib node."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in _ERF_CONSTS.items()]
    inits += [numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
              numpy_helper.from_array(rng.standard_normal((6, 2)).astype(np.float32), "V")]
    nodes = [N("Mul", ["input", "half"], "h"), *FUSED["div, x*a*half"], N("Reshape", ["y", "shape"], "r"),
             N("MatMul", ["r", "V"], "output")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 3])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2])], inits)
    src = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cm = load(str(_save(src, tmp_path, "fixed_batch")))  # the parity gate runs batch 1 and 2
    assert any(isinstance(m, nn.GELU) for m in _modules(cm))
    x = np.random.default_rng(0).standard_normal((1, 2, 3)).astype(np.float32)
    with torch.no_grad():
        y = cm.module(torch.from_numpy(np.concatenate([x, x]))).numpy()
    assert np.allclose(y, np.concatenate([_ort(src, x)] * 2), atol=1e-5)


def test_fuse_gelu_leaves_other_patterns_alone(tmp_path: Path) -> None:
    """A constant off by more than the tolerance, or an intermediate that something else reads,
    is not a GELU: nothing is fused, the model still imports with parity, and the bound engine
    refuses the product of two input-dependent tensors (a sound refusal)."""
    base = FUSED["div, x*a*half"]
    off = _pattern_model(base, {**_ERF_CONSTS, "s2": 1.4142})
    shared = _pattern_model(base, _ERF_CONSTS, extra_outputs=("a",))  # 1 + erf is also an output
    for name, m in (("off", off), ("shared", shared)):
        assert "com.microsoft:Gelu" not in P.op_counts(P.fuse_gelu(m)), name
    cm = load(str(_save(off, tmp_path, "off")))
    _assert_parity(cm, off, 5)
    with pytest.raises(UnsupportedOpError, match="two input-dependent"):
        BoundedModule(cm.module, cm.sample_shape)
    # within tolerance (2^-22 relative): still fused
    near = _pattern_model(base, {**_ERF_CONSTS, "s2": SQRT2 * (1 + 2.0**-23)})
    assert "com.microsoft:Gelu" in P.op_counts(P.fuse_gelu(near))


def test_gelu_to_contrib_keeps_the_function() -> None:
    """Opset-20 Gelu becomes the contrib node (same values in onnxruntime); an approximation ONNX
    does not define is refused with a clear error."""
    for approx, op in (("none", "com.microsoft:Gelu"), ("tanh", "com.microsoft:FastGelu")):
        m = _pattern_model([helper.make_node("Gelu", ["h"], ["y"], approximate=approx)], {})
        m.opset_import[0].version = 20
        out = P.gelu_to_contrib(m)
        assert P.op_counts(out).get(op) == 1 and "Gelu" not in P.op_counts(out)
        x = np.random.default_rng(0).standard_normal((16, 5))
        assert np.allclose(_ort(out, x), _ort(m, x), atol=1e-6)
    bad = _pattern_model([helper.make_node("Gelu", ["h"], ["y"], approximate="erf")], {})
    bad.opset_import[0].version = 20
    with pytest.raises(ModelLoadError, match="approximate"):
        P.gelu_to_contrib(bad)


# --------------------------------------------------------------------------------------------
# strict soundness: every method, L∞ and L2, against onnxruntime (the soundness harness)
# --------------------------------------------------------------------------------------------
CFG = Config()
ACTS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "erf": _Erf,
}


def _net(kind: str, seed: int) -> tuple[nn.Module, int, torch.Tensor, dict[str, float], tuple[float, float] | None]:
    """A random 2-hidden-layer net with the activation, its input width, a centre, radii and a
    domain; weight scales and centres spread the pre-activations over the curves' interesting
    points (the minimum near −0.75, the inflections at ±√2) and over large magnitudes."""
    g = torch.Generator().manual_seed(seed)
    n_in, h = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(3, 13, (1,), generator=g))
    net = nn.Sequential(nn.Linear(n_in, h), ACTS[kind](), nn.Linear(h, h), ACTS[kind](), nn.Linear(h, 3))
    gain = [0.7, 1.5, 3.0, 8.0][seed % 4]
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.8))
    domain = [(0.0, 1.0), None, (-1.0, 1.0)][seed % 3]
    x = torch.rand(1, n_in, generator=g) if domain == (0.0, 1.0) else torch.randn(1, n_in, generator=g) * 2
    if domain is None and seed % 5 == 0:
        x = x * 15  # large pre-activations: the relative part of the kernel error matters
    scale = [0.003, 0.05, 0.3, 1.0][(seed // 4) % 4]
    eps = {"linf": scale, "l2": scale * 2}
    if seed % 11 == 0:
        eps = {"linf": 0.0, "l2": 0.0}  # a single point: the bounds are all rounding allowance
    return net.eval(), n_in, x, eps, domain


SEEDS = range(14)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("kind", list(ACTS))
@pytest.mark.parametrize("seed", SEEDS)
def test_bounds_are_sound_against_onnxruntime(kind: str, opset: int, seed: int, tmp_path: Path) -> None:
    net, n_in, x, eps, domain = _net(kind, seed + 100 * opset)
    case = Case(case_id=f"gelu_erf/{kind}-{opset}-{seed}", family=f"gelu_erf:{kind}", module=net, sample_shape=(n_in,),
                x=x, eps=eps, domain=domain, desc=f"Linear -> {kind} -> Linear -> {kind} -> Linear, opset {opset}",
                opset=opset, mode="onnx" if seed % 7 else "torch")
    res = run_case(case, tmp_path, CFG)
    assert not res.failed, res.report()
    refused = [f for f in res.flags if f.startswith(("refused", "load-refused", "engine-refused", "export-rejected"))]
    assert not refused, res.report()  # bounded, not merely refused
    assert res.checks > 1000


@pytest.mark.parametrize("approx", ["none", "tanh"])
def test_bounds_hold_where_the_kernels_err_most(approx: str, tmp_path: Path) -> None:
    """GELU alone (no layer whose rounding allowance would hide the activation's), centred on the
    inputs where onnxruntime's and torch's kernels err most (measured; see rounding.py), on the
    critical point and the inflections, and on large magnitudes; single points and tiny sets."""
    pts = [5.07501, 4.14392, 4.24137, 3.48102, 1.14912, -0.7517915, -1.4142135, 1.4185040, -5.5, 29.9, -29.9, 0.0]
    x = torch.tensor([pts])
    for eps in (0.0, 1e-6, 1e-3):
        case = Case(case_id=f"gelu_erf/kernel-{approx}-{eps}", family="gelu_erf:kernel",
                    module=nn.Sequential(nn.GELU(approximate=approx)).eval(), sample_shape=(len(pts),), x=x,
                    eps={"linf": eps, "l2": eps}, domain=None, desc=f"GELU({approx!r}) alone", opset=17)
        res = run_case(case, tmp_path, CFG)
        assert not res.failed and not res.refused and "load-refused" not in " ".join(res.flags), res.report()


def test_crown_no_looser_than_ibp_on_average() -> None:
    widths = {m: [] for m in ("ibp", "crown-ibp", "crown", "alpha-crown")}
    for kind in ACTS:
        for seed in range(6):
            net, n_in, x, _, domain = _net(kind, seed)
            bm = BoundedModule(net, (n_in,))
            for norm, e in (("linf", 0.05), ("l2", 0.1)):
                inset = InputSet(x, e, norm, domain)
                for m, w in widths.items():
                    lb, ub = bm.compute(inset, None, m, alpha_steps=5)
                    w.append(float((ub - lb).detach().mean()))
    mean = {m: sum(w) / len(w) for m, w in widths.items()}
    assert mean["crown"] <= mean["ibp"] and mean["crown-ibp"] <= mean["ibp"], mean
    assert mean["alpha-crown"] <= mean["crown"] * (1 + 1e-6), mean
    assert all(c <= i * (1 + 1e-6) + 1e-6 for c, i in zip(widths["crown"], widths["ibp"]))  # intersected with IBP


# --------------------------------------------------------------------------------------------
# the relaxation, IBP and the constants in exact arithmetic
# --------------------------------------------------------------------------------------------
def _intervals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, generator=g, dtype=torch.float64) * 2.5
    r = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 8
    r[:50] = 0.0
    r[50:100] = 1e-9
    # endpoints exactly at the critical point and the inflections
    c[100:110], r[100:110] = -0.75179, 0.0
    c[110:130] = torch.tensor([-SQRT2, SQRT2, -1.4185040087908284, 1.4185040087908284]).repeat(5)
    return c - r, c + r


@pytest.mark.parametrize("approx", list(CURVES))
def test_relaxation_contains_the_curve(approx: str) -> None:
    curve = CURVES[approx]
    l, u = _intervals(4000, 1)
    lw, lb, uw, ub = relax_curve(curve, l, u)
    lo, hi = ibp_curve(curve, l, u)
    X = l[:, None] + (u - l)[:, None] * torch.linspace(0, 1, 2001, dtype=torch.float64)
    F = curve.f(X)
    assert float((lw[:, None] * X + lb[:, None] - F).max()) <= 1e-13
    assert float((F - uw[:, None] * X - ub[:, None]).max()) <= 1e-13
    assert float((lo[:, None] - F).max()) <= 1e-13 and float((F - hi[:, None]).max()) <= 1e-13
    # IBP is exact: the grid's extremes are within its own resolution of the bound
    h = (u - l) / 2000
    assert float((F.amin(1) - lo - 0.5 * h * h).max()) <= 1e-10
    assert float((hi - F.amax(1)).abs().max()) <= 1e-13  # the grid's last point is u up to rounding
    # and the lines are never looser than the box (their mean gap to the curve)
    lines = (F - (lw[:, None] * X + lb[:, None])).mean(1) + ((uw[:, None] * X + ub[:, None]) - F).mean(1)
    box = (F - lo[:, None]).mean(1) + (hi[:, None] - F).mean(1)
    assert bool((lines <= box + 1e-12).all())


@pytest.mark.parametrize("approx", list(CURVES))
def test_relaxation_is_tight_on_convex_and_concave_pieces(approx: str) -> None:
    """Inside one convexity piece the relaxation is the textbook one: chord and midpoint tangent."""
    curve = CURVES[approx]
    p = curve.inflections[1]
    for lo_, hi_, convex in ((-1.0, 1.2, True), (p + 0.1, p + 3.0, False), (-6.0, -p - 0.2, False)):
        l, u = torch.tensor([lo_], dtype=torch.float64), torch.tensor([hi_], dtype=torch.float64)
        lw, lb, uw, ub = relax_curve(curve, l, u)
        chord = (curve.f(u) - curve.f(l)) / (u - l)
        m = (l + u) / 2
        tan_w, tan_b = curve.df(m), curve.f(m) - curve.df(m) * m
        cw, cb = (uw, ub) if convex else (lw, lb)
        tw, tb = (lw, lb) if convex else (uw, ub)
        assert torch.allclose(cw, chord) and torch.allclose(cb, curve.f(l) - chord * l, atol=1e-9)
        assert torch.allclose(tw, tan_w) and torch.allclose(tb, tan_b, atol=1e-7)


def test_lipschitz_constants_bound_the_derivatives() -> None:
    x = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)
    h = float(x[1] - x[0])
    for curve in CURVES.values():
        # between grid points f' moves by at most max|f''|·h/2 (max|f''| = f''(0) = 0.798)
        assert float(curve.df(x).abs().max()) + 0.8 * h / 2 <= GELU_LIPSCHITZ
    assert 2 / math.sqrt(math.pi) <= ERF_LIPSCHITZ


def test_exact_arithmetic_has_no_allowance() -> None:
    net, n_in, x, _, domain = _net("gelu", 3)
    with exact_arithmetic():
        bm = BoundedModule(net, (n_in,))
        lb0, ub0 = bm.compute(InputSet(x, 0.0, "linf", domain), None, "ibp")
    bm = BoundedModule(net, (n_in,))
    lb1, ub1 = bm.compute(InputSet(x, 0.0, "linf", domain), None, "ibp")
    with torch.no_grad():
        y = net(x)
    assert bool((lb1 <= y).all() and (y <= ub1).all())
    assert bool((lb1 < lb0).all() and (ub1 > ub0).all())  # the float allowance widens the bounds


# --------------------------------------------------------------------------------------------
# the kernels' measured error is well inside the allowance
# --------------------------------------------------------------------------------------------
def _kernel_model(op: str, opset: int, domain: str = "", **attrs: str) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=ops)


def test_kernel_errors_within_allowance() -> None:
    """A smaller version of the measurement behind GELU_ERROR_ABS/REL (module docstring of
    certonnx.bounds.rounding): every kernel stays within a quarter of the allowance."""
    from scipy import special

    x = np.concatenate([np.linspace(-30, 30, 600_001), np.linspace(-6, 6, 300_001)]).astype(np.float32)
    x64 = x.astype(np.float64)
    gelu = 0.5 * x64 * special.erfc(-x64 / SQRT2)
    gelu_t = 0.5 * x64 * (1 + np.tanh(K_TANH * (x64 + 0.044715 * x64**3)))
    allowance = (GELU_ERROR_ABS + GELU_ERROR_REL * np.abs(x64)) / 4
    kernels = {
        "Gelu-20": (_kernel_model("Gelu", 20), gelu),
        "Gelu-20 tanh": (_kernel_model("Gelu", 20, approximate="tanh"), gelu_t),
        "com.microsoft:Gelu": (_kernel_model("Gelu", 17, "com.microsoft"), gelu),
        "com.microsoft:FastGelu": (_kernel_model("FastGelu", 17, "com.microsoft"), gelu_t),
    }
    for name, (m, ref) in kernels.items():
        err = np.abs(_ort(m, x).astype(np.float64) - ref)
        assert bool((err <= allowance).all()), (name, float(err.max()))
    t = torch.from_numpy(x)
    for approx, ref in (("none", gelu), ("tanh", gelu_t)):
        err = np.abs(torch.nn.functional.gelu(t, approximate=approx).double().numpy() - ref)
        assert bool((err <= allowance).all()), (approx, float(err.max()))
    err_erf = np.abs(_ort(_kernel_model("Erf", 13), x).astype(np.float64) - special.erf(x64))
    assert float(err_erf.max()) <= 2e-6 / 6  # ACTIVATION_ERROR is more than 6x the measured error
