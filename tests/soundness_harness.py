"""Adversarial differential soundness harness: shared by ``tests/test_soundness_differential.py``
(CI) and ``tools/soundness_fuzz.py`` (long offline runs). It holds no tests.

Why *differential*: the bound engine works on the torch graph that :func:`certonnx.load` builds,
but a certificate is a claim about the ONNX file as it is deployed. So every case is

1. a small random torch module built around one op family of the registry
   (``certonnx/bounds/rules/*.py``), deterministically from ``(family, seed)`` (:data:`FAMILIES`;
   ``onnx_raw`` writes ONNX graphs by hand, with attributes torch's exporter never emits);
2. exported with ``torch.onnx.export(dynamo=False)`` (opset 17 or 18) and imported with
   :func:`certonnx.load`; a construction the exporter rejects, or that the loader refuses, is
   counted and then checked on the torch module itself (the engine accepts plain modules too,
   through other matching paths: ``F.relu``, ``torch.clamp``, ``x[...]``); a fifth of the cases
   use the torch module directly anyway;
3. bounded with every method in :data:`certonnx.bounds.METHODS` under L∞ and L2 (the set
   intersected with the case's domain), for a batch of one or two centres (per-sample radii);
4. checked against *ground truth that does not come from the engine*: onnxruntime's float32
   outputs on the ONNX file (and a float64 run of the imported graph) at points sampled in the set
   (box corners, sphere, axis and diagonal points), one-step gradient points, exact extreme corners
   where they are known (``points_fn``), and every iterate of a PGD attack towards each output bound
   (run in torch on the imported graph, evaluated in onnxruntime). Every value must lie in
   ``[lb, ub]`` up to ``rel_tol * (1 + max |output|)``: by default 0, strict containment (the
   engine's bounds include float32 rounding, so no tolerance is owed);
5. checked for the Lipschitz certificate (:func:`certonnx.bounds.lipschitz.node_constants`): the
   composed constant against onnxruntime ratios ``||f(a) - f(b)|| / ||a - b||`` on sampled and
   Jacobian-direction pairs and against the operator norm of the Jacobian; each op's own constant
   against the exact operator norm of its Jacobian (its linear map, for affine ops; spike inputs
   for max pooling); and :func:`certonnx.bounds.lipschitz.lipschitz_radius` end to end: no
   onnxruntime point inside the certified ball may change the predicted class;
6. for small Linear/ReLU nets, checked against the exact optimum from
   :func:`certonnx.bounds.milp.exact_min`;
7. checked to be per-sample: a model whose outputs mix samples of the batch must be refused.

An :class:`~certonnx.errors.UnsupportedOpError` from the engine (or "no Lipschitz constant") is a
sound refusal: counted, never a failure. Any other engine exception is a failure (``crash``), and
so is a NaN bound for a model whose outputs are finite. :data:`REGRESSIONS` holds one deterministic
case per known bug class (``regress/NAME`` ids).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import math
import os
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, ...]

#: documented float tolerance of the engine (tests/bounds_util.TOL), relative to 1 + max |output|
REL_TOL = 1e-5
#: keep inputs small so that a case costs tens of milliseconds
MAX_NUMEL = 320


# ============================================================================================
# random draws
# ============================================================================================
class Rng:
    """numpy's Generator with the handful of draws the builders need, so builders read as prose.

    numpy (not torch's global RNG) makes a case a pure function of its seed on every platform.
    """

    def __init__(self, seed: int) -> None:
        self.g = np.random.default_rng(seed)

    def int(self, lo: int, hi: int) -> int:
        """Uniform integer in ``[lo, hi]`` (both included)."""
        return int(self.g.integers(lo, hi + 1))

    def coin(self, p: float = 0.5) -> bool:
        return bool(self.g.random() < p)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.g.integers(0, len(seq)))]

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.g.uniform(lo, hi))

    def logu(self, lo: float, hi: float) -> float:
        """Log-uniform in ``[lo, hi]``: scales spread over orders of magnitude."""
        return float(math.exp(self.g.uniform(math.log(lo), math.log(hi))))

    # (``builtins.int`` below: inside this class body ``int`` is the method above)
    def normal(self, shape: Sequence[builtins.int], scale: float = 1.0) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.g.standard_normal(tuple(shape)) * scale, dtype=np.float32))

    def rand(self, shape: Sequence[builtins.int], lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.g.uniform(lo, hi, tuple(shape)), dtype=np.float32))

    def seed(self) -> builtins.int:
        return int(self.g.integers(0, 2**31 - 1))


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


# ============================================================================================
# modules
# ============================================================================================
class Lambda(nn.Module):
    """One op (or a few) written as a plain function of the input and the module's constant buffers.

    Plain torch calls inside ``forward`` are what both ``torch.onnx.export`` and ``torch.fx`` see, so
    one definition serves the ONNX path and the direct-torch path.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], desc: str, **consts: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.desc = desc
        for k, v in consts.items():
            self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)

    def extra_repr(self) -> str:
        return self.desc


@dataclass
class Block:
    """A module with its per-sample input and output shapes and a one-line description."""

    module: nn.Module
    in_shape: Shape
    out_shape: Shape
    desc: str


def _out_shape(mod: nn.Module, shape: Shape) -> Shape | None:
    """Per-sample output shape of ``mod`` on a batch of 2, None when it fails (bad attributes)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = mod(torch.rand(2, *shape))
    except Exception:  # noqa: BLE001 - an invalid random configuration: the builder draws again
        return None
    if not isinstance(y, torch.Tensor) or y.ndim == 0 or y.shape[0] != 2 or y.numel() == 0:
        return None
    return tuple(int(d) for d in y.shape[1:])


def _block(mod: nn.Module, shape: Shape, desc: str) -> Block | None:
    mod.eval()
    out = _out_shape(mod, shape)
    if out is None or numel(out) > 4 * MAX_NUMEL:
        return None
    return Block(mod, shape, out, desc)


def randomize(mod: nn.Module, r: Rng, gain: float | None = None) -> None:
    """Random weights with spread-out scales; now and then integer or sparse weights (exactly
    representable values, exact zeros), which stress ties and degenerate rows."""
    g = r.logu(0.3, 2.5) if gain is None else gain
    style = r.choice(["normal"] * 6 + ["integer", "sparse"])
    with torch.no_grad():
        for p in mod.parameters(recurse=False):
            if p.ndim >= 2:
                fan_in = max(1, p[0].numel())
                w = r.normal(p.shape, g / math.sqrt(fan_in))
            else:
                w = r.normal(p.shape, 0.5 * g)
            if style == "integer":  # small integers times a power of two: exact, with ties
                step = 2.0 ** round(math.log2(max(float(w.abs().mean()), 1e-3)))
                w = torch.from_numpy(r.g.integers(-3, 4, tuple(p.shape)).astype(np.float32)) * step
            elif style == "sparse":
                w = w * (r.rand(p.shape) < 0.5)
            p.copy_(w)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(r.normal(mod.running_mean.shape, 0.5))  # type: ignore[union-attr]
            mod.running_var.copy_(r.rand(mod.running_var.shape, 0.05, 3.0))  # type: ignore[union-attr]


# ============================================================================================
# op-family blocks: (rng, input shape or None) -> Block or None (None: not applicable / invalid)
# ============================================================================================
BlockFn = Callable[[Rng, Shape | None], Block | None]


def _shape_vec(r: Rng) -> Shape:
    return (r.int(2, 32),)


def _shape_any(r: Rng) -> Shape:
    return r.choice([(r.int(2, 32),), (r.int(1, 4), r.int(2, 16)), (r.int(1, 3), r.int(2, 6), r.int(2, 6))])


def b_linear(r: Rng, shape: Shape | None) -> Block | None:
    """nn.Linear on the last dim: ONNX Gemm for 2-D inputs, MatMul + Add for 3-D ones."""
    shape = r.choice([_shape_vec(r), (r.int(1, 4), r.int(2, 24))]) if shape is None else shape
    n, m = shape[-1], r.int(1, 16)
    lin = nn.Linear(n, m, bias=r.coin(0.85))
    randomize(lin, r)
    return _block(lin, shape, f"Linear({n}->{m}{'' if lin.bias is not None else ', no bias'}) on {shape}")


def b_matmul(r: Rng, shape: Shape | None) -> Block | None:
    """x @ W with a constant W (ONNX MatMul by an initializer); now and then W @ x (constant on the
    left, which the engine must refuse or bound correctly)."""
    shape = r.choice([_shape_vec(r), (r.int(1, 4), r.int(2, 16))]) if shape is None else shape
    n, m = shape[-1], r.int(1, 12)
    if len(shape) >= 2 and r.coin(0.15):
        w = r.normal((r.int(1, 4), shape[-2]), 1.0)
        return _block(Lambda(lambda s, x: s.w @ x, f"W{tuple(w.shape)} @ x", w=w), shape,
                      f"W{tuple(w.shape)} @ x{shape}")
    w = r.normal((n, m), r.logu(0.3, 2) / math.sqrt(n))
    return _block(Lambda(lambda s, x: torch.matmul(x, s.w), f"x @ W{tuple(w.shape)}", w=w), shape,
                  f"x{shape} @ W({n}x{m})")


def _conv(r: Rng, shape: Shape | None, nd: int) -> Block | None:
    """Conv1d/2d with awkward attributes: per-dim stride, padding, dilation, groups, padding modes."""
    if shape is None or len(shape) != nd + 1:
        if shape is not None:
            return None
        shape = (r.int(1, 4), *[r.int(3, 12 if nd == 1 else 7) for _ in range(nd)])
        if nd == 1:
            shape = (shape[0], r.int(3, 24))
    cin = shape[0]
    groups = r.choice([g for g in (1, 2, 3, 4) if cin % g == 0])
    cout = groups * r.int(1, max(1, 4 // groups))
    k = tuple(r.int(1, 4) for _ in range(nd))
    s = tuple(r.int(1, 3) for _ in range(nd))
    d = tuple(r.choice([1, 1, 2, 3]) for _ in range(nd))
    p = tuple(r.int(0, max(0, (kk - 1) * dd // 2 + 1)) for kk, dd in zip(k, d))
    mode = r.choice(["zeros"] * 5 + ["reflect", "replicate", "circular"])
    if mode != "zeros" and any(pp >= sz for pp, sz in zip(p, shape[1:])):
        mode = "zeros"
    cls = nn.Conv1d if nd == 1 else nn.Conv2d
    conv = cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups, bias=r.coin(0.8), padding_mode=mode)
    randomize(conv, r)
    return _block(conv, shape, f"Conv{nd}d({cin}->{cout}, k={k}, s={s}, p={p}, d={d}, groups={groups}, "
                               f"padding_mode={mode}) on {shape}")


def b_conv1d(r: Rng, shape: Shape | None) -> Block | None:
    return _conv(r, shape, 1)


def b_conv2d(r: Rng, shape: Shape | None) -> Block | None:
    return _conv(r, shape, 2)


def b_batchnorm(r: Rng, shape: Shape | None) -> Block | None:
    """BatchNorm in eval mode with random statistics and (possibly negative) scales; as a primary
    block it sometimes follows a Conv/Linear directly (the engine's IBP folds that pair)."""
    own = shape is None
    if shape is None:
        shape = r.choice([(r.int(1, 6),), (r.int(1, 4), r.int(2, 10)), (r.int(1, 4), r.int(2, 5), r.int(2, 5))])
    if len(shape) > 3:
        return None
    bn = (nn.BatchNorm1d if len(shape) <= 2 else nn.BatchNorm2d)(shape[0], eps=r.choice([1e-5, 1e-3, 0.1]),
                                                                 affine=r.coin(0.9))
    randomize(bn, r)
    desc = f"BatchNorm{'1d' if len(shape) <= 2 else '2d'}({shape[0]}, eval) on {shape}"
    if own and r.coin(0.4) and len(shape) >= 2:
        conv = (nn.Conv1d if len(shape) == 2 else nn.Conv2d)(shape[0], shape[0], 1, bias=r.coin())
        randomize(conv, r)
        return _block(nn.Sequential(conv, bn), shape, f"Conv 1x1 -> {desc}")
    if own and r.coin(0.4) and len(shape) == 1:
        if r.coin():
            lin = nn.Linear(shape[0], shape[0])
            randomize(lin, r)
            return _block(nn.Sequential(lin, bn), shape, f"Linear -> {desc}")
        w = r.normal((shape[0], shape[0]), 1.0 / math.sqrt(shape[0]))
        mm = Lambda(lambda s, x: x @ s.w, "x @ W", w=w)
        return _block(nn.Sequential(mm, bn), shape, f"x @ W -> {desc}")
    return _block(bn, shape, desc)


def _const_shape(r: Rng, shape: Shape) -> Shape | str:
    """A constant shape that broadcasts against ``(B, *shape)``: a Python scalar, 0-d, same shape,
    with 1s, of lower rank, or one that *enlarges* the perturbed tensor (its 1-dims become > 1,
    e.g. x (B,1,16) + c (4,16), or x (B,1,H,W) - mean (1,3,1,1))."""
    kind = r.choice(["py", "0d", "same", "ones", "suffix", "grow", "grow", "lead1"])
    if kind == "py":
        return "py"
    if kind == "0d":
        return ()
    if kind == "same":
        return shape
    if kind == "ones":
        return tuple(1 if r.coin() else d for d in shape)
    if kind == "suffix":
        return shape[r.int(0, len(shape) - 1):]
    if kind == "grow":
        return tuple(r.int(2, 4) if d == 1 and r.coin(0.8) else (1 if r.coin(0.3) else d) for d in shape)
    return (1, *tuple(r.int(2, 3) if d == 1 else d for d in shape))  # "lead1": (1, ...) like a mean


def b_arith_const(r: Rng, shape: Shape | None) -> Block | None:
    """Add/Sub/Mul/Div by constants of every rank, on either side (``c - x``), with broadcasting
    that may enlarge the perturbed tensor; Div only by constants (``c / x`` must be refused)."""
    if shape is None:
        shape = r.choice([(1, r.int(2, 16)), (r.int(1, 3), r.int(2, 8)), (1, r.int(2, 5), r.int(2, 5)),
                          (r.int(2, 16),), (r.int(1, 3), 1, r.int(2, 6))])
    op = r.choice(["add", "sub", "rsub", "mul", "div", "radd", "rmul", "rdiv"])
    cs = _const_shape(r, shape)
    if cs == "py":
        c: Any = r.choice([0.5, -1.5, 2.0, 0.0, -0.25, 3.0]) if op != "div" else r.choice([0.5, -2.0, 4.0, -0.3])
        cdesc = f"{c}"
    else:
        t = r.normal(cs, r.logu(0.2, 3.0))
        if op in ("div", "rdiv"):
            floor = r.choice([0.1, 0.1, 1e-3])  # tiny divisors: huge values, large rounding
            t = torch.where(t.abs() < floor, torch.full_like(t, 0.5), t)
        c = t
        cdesc = f"c{tuple(cs)}"
    fns: dict[str, Callable[[Any, torch.Tensor, Any], torch.Tensor]] = {
        "add": lambda s, x, c: x + c, "radd": lambda s, x, c: c + x, "sub": lambda s, x, c: x - c,
        "rsub": lambda s, x, c: c - x, "mul": lambda s, x, c: x * c, "rmul": lambda s, x, c: c * x,
        "div": lambda s, x, c: x / c, "rdiv": lambda s, x, c: c / x,
    }
    sym = {"add": f"x + {cdesc}", "radd": f"{cdesc} + x", "sub": f"x - {cdesc}", "rsub": f"{cdesc} - x",
           "mul": f"x * {cdesc}", "rmul": f"{cdesc} * x", "div": f"x / {cdesc}", "rdiv": f"{cdesc} / x"}[op]
    f = fns[op]
    if isinstance(c, torch.Tensor):
        mod = Lambda(lambda s, x: f(s, x, s.c), sym, c=c)
    else:
        mod = Lambda(lambda s, x: f(s, x, c), sym)
    return _block(mod, shape, f"{sym} with x{shape}")


def b_arith_pert(r: Rng, shape: Shape | None) -> Block | None:
    """Add/Sub of two perturbed tensors: residuals reusing one value (``x + relu(x)``, ``x - x``),
    and two perturbed operands that broadcast against each other."""
    shape = _shape_any(r) if shape is None else shape
    kind = r.choice(["x+x", "x-x", "res_relu", "res_lin", "sub_relu", "bcast", "slice_sub"])
    n = shape[-1]
    if kind == "x+x":
        return _block(Lambda(lambda s, x: x + x, "x + x"), shape, f"x + x on {shape}")
    if kind == "x-x":
        return _block(Lambda(lambda s, x: x - x * 1.0 + x * 0.5, "x - 1.0*x + 0.5*x"), shape,
                      f"x - 1.0*x + 0.5*x on {shape}")
    if kind == "res_relu":
        return _block(Lambda(lambda s, x: x + torch.relu(x), "x + relu(x)"), shape, f"x + relu(x) on {shape}")
    if kind == "sub_relu":
        return _block(Lambda(lambda s, x: torch.relu(x) - x, "relu(x) - x"), shape, f"relu(x) - x on {shape}")
    if kind == "res_lin":
        lin = nn.Linear(n, n)
        randomize(lin, r)

        class Res(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = lin

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x - torch.relu(self.lin(x))

        return _block(Res(), shape, f"x - relu(Linear({n}->{n})(x)) on {shape}")
    if kind == "bcast" and len(shape) == 1 and n <= 16:
        return _block(Lambda(lambda s, x: x.unsqueeze(1) + x.unsqueeze(2), "x[:, None, :] + x[:, :, None]"), shape,
                      f"x.unsqueeze(1) + x.unsqueeze(2) on {shape} (two perturbed operands broadcast)")
    if n >= 2:
        return _block(Lambda(lambda s, x: x[..., :1] - x, "x[..., :1] - x"), shape, f"x[..., :1] - x on {shape}")
    return None


def b_neg(r: Rng, shape: Shape | None) -> Block | None:
    shape = _shape_any(r) if shape is None else shape
    if r.coin():
        return _block(Lambda(lambda s, x: -x, "-x"), shape, f"-x on {shape}")
    return _block(Lambda(lambda s, x: torch.neg(x) * 2.0 - 0.5, "neg(x)*2 - 0.5"), shape, f"neg(x)*2 - 0.5 on {shape}")


def b_affine_ew(r: Rng, shape: Shape | None) -> Block | None:
    """Element-wise ``x * a + b`` (same-shape constants): spreads pre-activation ranges over zero."""
    shape = _shape_any(r) if shape is None else shape
    a = r.normal(shape, r.logu(0.5, 4.0))
    b = r.normal(shape, r.logu(0.1, 2.0))
    return _block(Lambda(lambda s, x: x * s.a + s.b, "x * a + b", a=a, b=b), shape, f"x * a + b on {shape}")


def _act(r: Rng, shape: Shape | None, make: Callable[[Rng], tuple[nn.Module, str]]) -> Block | None:
    """An activation; as a primary block it follows a Linear or element-wise affine map so that its
    input range straddles the interesting points (0, the clip limits)."""
    mod, desc = make(r)
    if shape is not None:
        return _block(mod, shape, f"{desc} on {shape}")
    shape = _shape_any(r)
    if r.coin(0.6):
        lin = nn.Linear(shape[-1], shape[-1])
        randomize(lin, r, r.logu(0.5, 4))
        return _block(nn.Sequential(lin, mod), shape, f"Linear -> {desc} on {shape}")
    pre = b_affine_ew(r, shape)
    assert pre is not None
    return _block(nn.Sequential(pre.module, mod), shape, f"x*a+b -> {desc} on {shape}")


def _relu(r: Rng) -> tuple[nn.Module, str]:
    return r.choice([(nn.ReLU(), "nn.ReLU"), (Lambda(lambda s, x: F.relu(x), "F.relu"), "F.relu"),
                     (Lambda(lambda s, x: x.relu(), "x.relu()"), "x.relu()")])


def _leaky(r: Rng) -> tuple[nn.Module, str]:
    a = r.choice([0.0, 0.01, 0.1, 0.2, 0.5, 0.9, 1.0, 1.5, -0.3])
    return (nn.LeakyReLU(a), f"LeakyReLU({a})") if r.coin(0.7) else (
        Lambda(lambda s, x: F.leaky_relu(x, a), f"F.leaky_relu({a})"), f"F.leaky_relu({a})")


def _sigmoid(r: Rng) -> tuple[nn.Module, str]:
    if r.coin():
        return nn.Sigmoid(), "nn.Sigmoid"
    return Lambda(lambda s, x: torch.sigmoid(x), "sigmoid"), "torch.sigmoid"


def _tanh(r: Rng) -> tuple[nn.Module, str]:
    return (nn.Tanh(), "nn.Tanh") if r.coin() else (Lambda(lambda s, x: torch.tanh(x), "tanh"), "torch.tanh")


def _gelu(r: Rng) -> tuple[nn.Module, str]:
    """GELU in both forms and both spellings: ONNX export writes the decomposed erf/tanh pattern
    (opset < 20) that the loader fuses back into one node."""
    approx = r.choice(["none", "none", "tanh"])
    if r.coin(0.7):
        return nn.GELU(approximate=approx), f"nn.GELU({approx!r})"
    return Lambda(lambda s, x: F.gelu(x, approximate=approx), f"F.gelu({approx!r})"), f"F.gelu(x, {approx!r})"


def _erf(r: Rng) -> tuple[nn.Module, str]:
    if r.coin():
        return Lambda(lambda s, x: torch.erf(x), "erf"), "torch.erf"
    return Lambda(lambda s, x: torch.special.erf(x), "special.erf"), "torch.special.erf"


def _clip(r: Rng) -> tuple[nn.Module, str]:
    """Clip in all its spellings, with limits in any order (min > max: every output is max)."""
    a, b = sorted([round(r.uniform(-2, 2), 2), round(r.uniform(-2, 2), 2)])
    kind = r.choice(["clamp", "clamp", "clamp_rev", "min_only", "max_only", "hardtanh", "relu6", "equal", "inf"])
    if kind == "inf":  # infinite (or float32-max, as some exporters write) limits: clamp(x, -inf, b) is min(x, b)
        big = r.choice([float("inf"), 3.4028234663852886e38])
        lo_, hi_ = r.choice([(-big, b), (a, big), (-big, big)])
        return Lambda(lambda s, x: torch.clamp(x, lo_, hi_), f"clamp({lo_}, {hi_})"), f"torch.clamp(x, {lo_}, {hi_})"
    if kind == "clamp":
        return Lambda(lambda s, x: torch.clamp(x, a, b), f"clamp({a}, {b})"), f"torch.clamp(x, {a}, {b})"
    if kind == "clamp_rev":
        desc = f"torch.clamp(x, min={b}, max={a}) (min > max)"
        return Lambda(lambda s, x: torch.clamp(x, b, a), f"clamp({b}, {a})"), desc
    if kind == "equal":
        return Lambda(lambda s, x: torch.clamp(x, a, a), f"clamp({a}, {a})"), f"torch.clamp(x, {a}, {a})"
    if kind == "min_only":
        return Lambda(lambda s, x: torch.clamp(x, min=a), f"clamp(min={a})"), f"torch.clamp(x, min={a})"
    if kind == "max_only":
        return Lambda(lambda s, x: torch.clamp(x, max=b), f"clamp(max={b})"), f"torch.clamp(x, max={b})"
    if kind == "hardtanh" and a < b:
        return nn.Hardtanh(a, b), f"nn.Hardtanh({a}, {b})"
    return (nn.ReLU6(), "nn.ReLU6") if r.coin() else (Lambda(lambda s, x: F.relu6(x), "F.relu6"), "F.relu6")


def b_relu(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _relu)


def b_leakyrelu(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _leaky)


def b_sigmoid(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _sigmoid)


def b_tanh(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _tanh)


def b_clip(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _clip)


def b_gelu(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _gelu)


def b_erf(r: Rng, shape: Shape | None) -> Block | None:
    return _act(r, shape, _erf)


def _spatial(r: Rng, shape: Shape | None, nd: int, lo: int = 2, hi: int = 8) -> Shape | None:
    if shape is None:
        return (r.int(1, 3), *[r.int(lo, hi) for _ in range(nd)])
    return shape if len(shape) == nd + 1 else None


def b_avgpool(r: Rng, shape: Shape | None) -> Block | None:
    """AvgPool1d/2d with padding, ceil_mode, count_include_pad (partial and padded windows)."""
    nd = r.choice([1, 2, 2]) if shape is None else len(shape) - 1
    if nd not in (1, 2):
        return None
    shape = _spatial(r, shape, nd, 2, 9)
    if shape is None:
        return None
    k = tuple(r.int(1, min(4, sz)) for sz in shape[1:])
    s = tuple(r.int(1, 3) for _ in range(nd))
    p = tuple(r.int(0, kk // 2) for kk in k)
    ceil, cip = r.coin(), r.coin()
    cls = nn.AvgPool1d if nd == 1 else nn.AvgPool2d
    mod = cls(k, s, p, ceil_mode=ceil, count_include_pad=cip)
    return _block(mod, shape, f"AvgPool{nd}d(k={k}, s={s}, p={p}, ceil_mode={ceil}, count_include_pad={cip}) on {shape}")


def b_adaptive(r: Rng, shape: Shape | None) -> Block | None:
    """Adaptive average pooling (including upsampling 2->3, overlapping windows), global average
    pooling and ``mean`` over some dims."""
    kind = r.choice(["adaptive", "adaptive", "global", "mean"])
    if kind == "mean":
        shape = (r.int(1, 3), r.int(2, 6), r.int(2, 6)) if shape is None else shape
        if len(shape) < 2:
            return None
        dims = r.choice([(-1,), (-2, -1), (1,)]) if len(shape) >= 2 else (-1,)
        dims = tuple(d for d in dims if -len(shape) <= d <= len(shape))
        keep = r.coin()
        return _block(Lambda(lambda s, x: x.mean(dim=dims, keepdim=keep), f"mean{dims}"), shape,
                      f"x.mean(dim={dims}, keepdim={keep}) on {shape}")
    nd = r.choice([1, 2]) if shape is None else len(shape) - 1
    if nd not in (1, 2):
        return None
    shape = _spatial(r, shape, nd, 1, 6)
    if shape is None:
        return None
    if kind == "global":
        mod: nn.Module = nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool1d(1)
        return _block(mod, shape, f"global average pool on {shape}")
    out = tuple(r.int(1, sz + 2) for sz in shape[1:])
    mod = nn.AdaptiveAvgPool1d(out[0]) if nd == 1 else nn.AdaptiveAvgPool2d(out)
    return _block(mod, shape, f"AdaptiveAvgPool{nd}d({out}) on {shape}")


def b_maxpool(r: Rng, shape: Shape | None) -> Block | None:
    """MaxPool2d (and 1d, functional) with dilation, padding, stride, ceil_mode."""
    nd = r.choice([2, 2, 2, 1]) if shape is None else len(shape) - 1
    if nd not in (1, 2):
        return None
    shape = _spatial(r, shape, nd, 3, 9)
    if shape is None:
        return None
    k = tuple(r.int(1, 3) for _ in range(nd))
    s = tuple(r.int(1, 3) for _ in range(nd))
    d = tuple(r.choice([1, 1, 2, 3]) for _ in range(nd))
    # dilation has no effect along an axis with kernel 1, and PyTorch 2.14's max_pool backward
    # corrupts the heap there (docs/reliability.md): keep it 1 on such axes
    d = tuple(1 if kk == 1 else dd for kk, dd in zip(k, d))
    p = tuple(r.int(0, kk // 2) for kk in k)
    ceil = r.coin(0.2)
    if nd == 1:
        mod: nn.Module = nn.MaxPool1d(k[0], s[0], p[0], d[0], ceil_mode=ceil)
    elif r.coin(0.8):
        mod = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
    else:
        mod = Lambda(lambda s_, x: F.max_pool2d(x, k, s, p, d, ceil_mode=ceil), "F.max_pool2d")
    return _block(mod, shape, f"MaxPool{nd}d(k={k}, s={s}, p={p}, d={d}, ceil_mode={ceil}) on {shape}")


def b_reshape(r: Rng, shape: Shape | None) -> Block | None:
    """Flatten / view / unsqueeze / squeeze: re-views of each sample."""
    shape = _shape_any(r) if shape is None else shape
    kind = r.choice(["flatten", "view", "unsqueeze", "squeeze", "nn_flatten"])
    n = numel(shape)
    if kind == "flatten":
        return _block(Lambda(lambda s, x: torch.flatten(x, 1), "flatten(1)"), shape, f"torch.flatten(x, 1) on {shape}")
    if kind == "nn_flatten":
        return _block(nn.Flatten(), shape, f"nn.Flatten on {shape}")
    if kind == "unsqueeze":
        d = r.int(1, len(shape) + 1)
        return _block(Lambda(lambda s, x: x.unsqueeze(d), f"unsqueeze({d})"), shape, f"x.unsqueeze({d}) on {shape}")
    if kind == "squeeze" and 1 in shape:
        d = 1 + shape.index(1)
        return _block(Lambda(lambda s, x: x.squeeze(d), f"squeeze({d})"), shape, f"x.squeeze({d}) on {shape}")
    divs = [a for a in range(1, n + 1) if n % a == 0]
    a = r.choice(divs)
    return _block(Lambda(lambda s, x: x.reshape(x.shape[0], a, n // a), f"reshape(B, {a}, {n // a})"), shape,
                  f"x.reshape(B, {a}, {n // a}) on {shape}")


def b_transpose(r: Rng, shape: Shape | None) -> Block | None:
    if shape is None:
        shape = r.choice([(r.int(1, 4), r.int(2, 8)), (r.int(1, 3), r.int(2, 5), r.int(2, 5))])
    if len(shape) < 2:
        return None
    perm = [int(i) + 1 for i in r.g.permutation(len(shape))]
    if r.coin():
        return _block(Lambda(lambda s, x: x.permute(0, *perm), f"permute(0, {perm})"), shape,
                      f"x.permute(0, *{perm}) on {shape}")
    a, b = perm[0], perm[-1]
    return _block(Lambda(lambda s, x: x.transpose(a, b), f"transpose({a}, {b})"), shape,
                  f"x.transpose({a}, {b}) on {shape}")


def b_slice(r: Rng, shape: Shape | None) -> Block | None:
    """Slices with steps and negative starts/stops on several dims; ``narrow``."""
    shape = _shape_any(r) if shape is None else shape
    idx: list[slice] = []
    for sz in shape:
        if sz < 2 or r.coin(0.3):
            idx.append(slice(None))
            continue
        start = r.int(-sz, sz - 1)
        stop = r.choice([None, r.int(-sz + 1, sz)])
        step = r.choice([1, 1, 2, 3])
        if len(range(sz)[slice(start, stop, step)]) == 0:
            start, stop = 0, None
        idx.append(slice(start, stop, step))
    key = (slice(None), *idx)
    if r.coin(0.2) and shape[-1] >= 2:
        st = r.int(0, shape[-1] - 1)
        ln = r.int(1, shape[-1] - st)
        d = len(shape)
        return _block(Lambda(lambda s, x: x.narrow(d, st, ln), f"narrow({d}, {st}, {ln})"), shape,
                      f"x.narrow({d}, {st}, {ln}) on {shape}")
    return _block(Lambda(lambda s, x: x[key], f"x[{key}]"), shape, f"x[:, {idx}] on {shape}")


def b_pad(r: Rng, shape: Shape | None) -> Block | None:
    """F.pad: constant (any value, negative pads crop), reflect, replicate."""
    if shape is None:
        shape = r.choice([(r.int(1, 3), r.int(3, 10)), (r.int(1, 3), r.int(3, 6), r.int(3, 6))])
    if len(shape) not in (2, 3):
        return None
    nd = len(shape) - 1
    mode = r.choice(["constant", "constant", "reflect", "replicate"])
    lo = -1 if mode == "constant" else 0
    pads = [r.int(lo, 2) for _ in range(2 * nd)]
    if mode == "reflect":
        pads = [min(p, sz - 1) for p, sz in zip(pads, [shape[-1 - i // 2] for i in range(2 * nd)])]
    value = r.choice([0.0, 0.5, -1.0]) if mode == "constant" else None
    if mode == "constant":
        mod = Lambda(lambda s, x: F.pad(x, pads, value=value), f"pad({pads}, value={value})")
    else:
        mod = Lambda(lambda s, x: F.pad(x, pads, mode=mode), f"pad({pads}, {mode})")
    extra = f", value={value}" if value is not None else ""
    return _block(mod, shape, f"F.pad(x, {pads}, mode={mode}{extra}) on {shape}")


def b_gather(r: Rng, shape: Shape | None) -> Block | None:
    """Indexing with repeated and negative indices (ONNX Gather), index_select, a scalar index."""
    shape = _shape_any(r) if shape is None else shape
    ax = r.int(0, len(shape) - 1)
    sz = shape[ax]
    idx = [r.int(-sz, sz - 1) for _ in range(r.int(1, 6))]
    if r.coin(0.3):
        idx = [idx[0]] * r.int(2, 5)  # repeated: x[:, [0, 0, 0, 0]]
    kind = r.choice(["list", "list", "index_select", "scalar"])
    pre = (slice(None),) * (ax + 1)
    if kind == "index_select":
        t = torch.tensor([i % sz for i in idx])
        mod = Lambda(lambda s, x: torch.index_select(x, ax + 1, s.idx), f"index_select({ax + 1}, {t.tolist()})", idx=t)
        return _block(mod, shape, f"torch.index_select(x, {ax + 1}, {t.tolist()}) on {shape}")
    if kind == "scalar":
        i = idx[0]
        return _block(Lambda(lambda s, x: x[(*pre, i)], f"x[..., {i}]"), shape,
                      f"x[{':, ' * (ax + 1)}{i}] on {shape} (scalar index)")
    return _block(Lambda(lambda s, x: x[(*pre, idx)], f"x[..., {idx}]"), shape,
                  f"x[{':, ' * (ax + 1)}{idx}] on {shape}")


def b_concat(r: Rng, shape: Shape | None) -> Block | None:
    """Concat of perturbed pieces (the same value twice, scaled, activated) and constants."""
    shape = _shape_any(r) if shape is None else shape
    d = r.int(1, len(shape))
    dneg = d - len(shape) - 1 if r.coin(0.3) else d
    kind = r.choice(["xx", "x_relu", "x_const", "three"])
    cshape = list(shape)
    cshape[d - 1] = r.int(1, 3)
    c = r.normal(cshape)
    if kind == "xx":
        fn, desc = (lambda s, x: torch.cat([x, x], dneg)), f"cat([x, x], {dneg})"
    elif kind == "x_relu":
        fn, desc = (lambda s, x: torch.cat([2.0 * x, torch.relu(x)], dneg)), f"cat([2x, relu(x)], {dneg})"
    elif kind == "x_const":
        fn, desc = ((lambda s, x: torch.cat([x, s.c.expand(x.shape[0], *s.c.shape[1:])], dneg)),
                    f"cat([x, const], {dneg})")
        c = c.unsqueeze(0)
    else:
        fn, desc = (lambda s, x: torch.cat([x, -x, x * 0.5], dneg)), f"cat([x, -x, 0.5x], {dneg})"
    return _block(Lambda(fn, desc, c=c), shape, f"{desc} on {shape}")


def b_expand(r: Rng, shape: Shape | None) -> Block | None:
    """Expand: copies along 1-dims (each element used several times)."""
    if shape is None:
        shape = r.choice([(1, r.int(2, 12)), (r.int(2, 4), 1, r.int(2, 5)), (r.int(2, 12),)])
    k = r.int(2, 4)
    if 1 in shape:
        tgt = tuple(k if s == 1 else -1 for s in shape)
        return _block(Lambda(lambda s, x: x.expand(-1, *tgt), f"expand(-1, {tgt})"), shape,
                      f"x.expand(-1, *{tgt}) on {shape}")
    return _block(Lambda(lambda s, x: x.unsqueeze(1).expand(-1, k, *shape), f"unsqueeze(1).expand(-1, {k}, ...)"), shape,
                  f"x.unsqueeze(1).expand(-1, {k}, *{shape}) on {shape}")


def b_cast(r: Rng, shape: Shape | None) -> Block | None:
    """Cast to float16/bfloat16 and back to float32: not the identity (rounding, overflow to inf)."""
    shape = _shape_any(r) if shape is None else shape
    dt = r.choice([torch.float16, torch.float16, torch.bfloat16])
    name = str(dt).replace("torch.", "")
    kind = r.choice(["amplify", "scaled", "plain", "overflow"])
    if kind == "amplify":  # the rounding error itself, amplified: the engine's identity gives 0
        k = r.choice([1e2, 1e3, 1e4])
        fn, desc = (lambda s, x: (x.to(dt).to(torch.float32) - x) * k), f"(x.to({name}).float() - x) * {k:g}"
    elif kind == "scaled":
        k = r.choice([3.0, 100.0, 1000.0])
        fn, desc = (lambda s, x: (x * k).to(dt).to(torch.float32) / k), f"(x*{k:g}).to({name}).float() / {k:g}"
    elif kind == "overflow":
        k = 7.0e4
        fn, desc = ((lambda s, x: (x * k + k).to(dt).to(torch.float32) * 1e-4),
                    f"(x*{k:g}+{k:g}).to({name}).float() * 1e-4")
    else:
        fn, desc = (lambda s, x: x.to(dt).to(torch.float32)), f"x.to({name}).float()"
    return _block(Lambda(fn, desc), shape, f"{desc} on {shape}")


def b_batch_mixing(r: Rng, shape: Shape | None) -> Block | None:
    """Ops that mix samples of the batch (concatenation or reversal along the batch axis, a
    constant whose leading dims broadcast against the batch, selecting sample 0 for all): a
    per-sample bound means nothing for them, so the engine must refuse them."""
    shape = (r.int(1, 3), r.int(2, 8)) if shape is None else shape
    kind = r.choice(["cat0", "flip0", "bcast_lead", "sample0", "transpose0"])
    if kind == "cat0":
        fn, desc = (lambda s, x: torch.cat([x, 2.0 * x], 0)), "torch.cat([x, 2x], dim=0)"
    elif kind == "flip0":
        fn, desc = (lambda s, x: x.flip(0)), "x.flip(0)"
    elif kind == "sample0":
        fn, desc = (lambda s, x: x[0:1].expand_as(x) + 0.0 * x), "x[0:1].expand_as(x)"
    elif kind == "transpose0":
        fn, desc = (lambda s, x: x.transpose(0, 1)), "x.transpose(0, 1)"
    else:
        c = r.normal((2, 1, *shape))
        return _block(Lambda(lambda s, x: x + s.c, f"x + c{tuple(c.shape)}", c=c), shape,
                      f"x + c{tuple(c.shape)} (the constant's leading 2 meets the batch) on {shape}")
    return Block(Lambda(fn, desc).eval(), shape, shape, f"{desc} on {shape} (mixes samples)")


BLOCKS: dict[str, BlockFn] = {
    "linear": b_linear, "matmul": b_matmul, "conv1d": b_conv1d, "conv2d": b_conv2d, "batchnorm": b_batchnorm,
    "arith_const": b_arith_const, "arith_pert": b_arith_pert, "neg": b_neg,
    "relu": b_relu, "leakyrelu": b_leakyrelu, "sigmoid": b_sigmoid, "tanh": b_tanh, "clip": b_clip,
    "avgpool": b_avgpool, "adaptive_avgpool": b_adaptive, "maxpool": b_maxpool,
    "reshape": b_reshape, "transpose": b_transpose, "slice": b_slice, "pad": b_pad, "gather": b_gather,
    "concat": b_concat, "expand": b_expand, "cast": b_cast, "batch_mixing": b_batch_mixing,
    "gelu": b_gelu, "erf": b_erf,
}
#: blocks never drawn as random extras (they make the whole case about one thing); gelu and erf
#: are left out too so that adding them kept every other family's cases (seeds) unchanged
_NOT_EXTRA = ("batch_mixing", "gelu", "erf")
#: families built by their own generators (not single blocks)
SPECIAL_FAMILIES = ("mixed", "float_wide", "milp", "onnx_raw")
FAMILIES: tuple[str, ...] = (*BLOCKS, *SPECIAL_FAMILIES)


# ============================================================================================
# cases
# ============================================================================================
@dataclass
class Case:
    """One self-contained soundness case. ``case_id`` (``family/seed`` or ``regress/name``) rebuilds it."""

    case_id: str
    family: str
    module: nn.Module | None  # None only for hand-written ONNX cases (``onnx``)
    sample_shape: Shape
    x: torch.Tensor  # (B, *sample_shape), B = 1 or 2: the centres
    eps: dict[str, Any]  # per norm: a float, or one float per sample
    domain: tuple[float, float] | None
    desc: str
    opset: int = 17
    mode: str = "onnx"  # "onnx": export + certonnx.load + onnxruntime; "torch": the module itself
    #: extra points for a set (exact extreme corners, a known counterexample), (n, *sample_shape)
    points_fn: Callable[[Any], torch.Tensor] | None = None
    #: a Linear/ReLU nn.Sequential equal to ``module``: compare bounds with the exact MILP optimum
    milp_net: nn.Module | None = None
    norms: tuple[str, ...] = ("linf", "l2", "l1")  # those of them with an ε in ``eps``
    #: a hand-written ONNX file (family ``onnx_raw``): used instead of exporting ``module`` (None)
    onnx: bytes | None = None


def _center(r: Rng, shape: Shape, domain: tuple[float, float] | None) -> torch.Tensor:
    """A centre inside the domain; some coordinates exactly on its boundary (the domain clip then
    cuts the set, which the engine must handle)."""
    if domain is None:  # unbounded inputs, now and then large ones (rounding grows with magnitude)
        return r.normal((1, *shape), 30.0 if r.coin(0.25) else 0.7) + 0.5
    lo, hi = domain
    if r.coin(0.04):  # outside the domain (unnormalised data): the set still contains x
        return r.rand((1, *shape), hi, hi + 0.5)
    x = r.rand((1, *shape), lo, hi)
    if r.coin(0.3):
        m = r.rand((1, *shape)) < 0.2
        x = torch.where(m, torch.where(r.rand((1, *shape)) < 0.5, torch.full_like(x, lo), torch.full_like(x, hi)), x)
    return x


def _tail(r: Rng, shape: Shape) -> Block | None:
    """Often a dense head after the family's block (the first dense layer is where an L2 ball is
    turned into a dual-norm bound, so mistakes in ball bookkeeping surface there)."""
    n = numel(shape)
    if n > 48 or r.coin(0.45):
        k = r.int(1, 6)
        lin = nn.Linear(n, k)
        randomize(lin, r)
        if r.coin(0.35):
            lin2 = nn.Linear(k, r.int(1, 4))
            randomize(lin2, r)
            return _block(nn.Sequential(nn.Flatten(), lin, nn.ReLU(), lin2), shape,
                          f"Flatten -> Linear({n}->{k}) -> ReLU -> Linear")
        return _block(nn.Sequential(nn.Flatten(), lin), shape, f"Flatten -> Linear({n}->{k})")
    return None


def _draw_block(r: Rng, family: str, shape: Shape | None, tries: int = 12) -> Block | None:
    """A valid block of ``family`` (for ``shape``, or its own); builders may fail on shapes they do
    not handle (0-d samples, rank 1), which only means drawing again."""
    for _ in range(tries):
        try:
            b = BLOCKS[family](r, shape)
        except (IndexError, ValueError, ZeroDivisionError):
            b = None
        if b is not None and numel(b.in_shape) <= MAX_NUMEL:
            return b
    return None


def _chain(blocks: list[Block]) -> nn.Module:
    return nn.Sequential(*[b.module for b in blocks]) if len(blocks) > 1 else blocks[0].module


def _finish(r: Rng, family: str, seed: int, blocks: list[Block], extra: str = "") -> Case:
    domain = r.choice([(0.0, 1.0)] * 7 + [None, None, (-1.0, 1.0)])
    shape = blocks[0].in_shape
    t = _tail(r, blocks[-1].out_shape)
    if t is not None:
        blocks = [*blocks, t]
    mod = _chain(blocks).eval()
    batch = 2 if r.coin(0.15) else 1  # a batch of two exercises the engine's per-sample bookkeeping
    x = torch.cat([_center(r, shape, domain) for _ in range(batch)], 0)
    eps: dict[str, Any] = {"linf": r.logu(1e-3, 0.5), "l2": r.logu(1e-2, 2.0), "l1": r.logu(1e-2, 4.0)}
    if r.coin(0.1):  # a (nearly) single-point set: the bounds are then all rounding allowance
        eps = {n: r.choice([0.0, 1e-7, 1e-5]) for n in eps}
    if batch == 2 and r.coin(0.5):  # per-sample radii
        eps = {n: [e, e * r.uniform(0.3, 2.0)] for n, e in eps.items()}
    return Case(case_id=f"{family}/{seed}", family=family, module=mod, sample_shape=shape, x=x, eps=eps,
                domain=domain, desc=" -> ".join(b.desc for b in blocks) + extra, opset=r.choice([17, 17, 17, 18]),
                mode="torch" if r.coin(0.2) else "onnx")


def _block_case(family: str, seed: int) -> Case:
    """The family's block, sometimes after an element-wise pre-block, sometimes followed by another
    random block that accepts its output shape."""
    r = Rng(seed)
    for _ in range(20):
        b = _draw_block(r, family, None)
        if b is None:
            continue
        blocks = [b]
        if r.coin(0.2):
            pre = b_affine_ew(r, b.in_shape)
            if pre is not None:
                blocks.insert(0, pre)
        if r.coin(0.3):
            post = _draw_block(r, r.choice([f for f in BLOCKS if f not in _NOT_EXTRA]), b.out_shape, tries=3)
            if post is not None:
                blocks.append(post)
        return _finish(r, family, seed, blocks)
    raise RuntimeError(f"could not build a {family} case from seed {seed}")


def _mixed_case(seed: int) -> Case:
    """A random chain of 2-4 blocks from any families (shapes permitting)."""
    r = Rng(seed)
    shape = r.choice([_shape_vec(r), (r.int(1, 3), r.int(3, 8)), (r.int(1, 3), r.int(3, 6), r.int(3, 6))])
    blocks: list[Block] = []
    for _ in range(r.int(2, 4)):
        cur = blocks[-1].out_shape if blocks else shape
        if numel(cur) > MAX_NUMEL:
            break
        for _try in range(6):
            b = _draw_block(r, r.choice([f for f in BLOCKS if f not in _NOT_EXTRA]), cur, tries=1)
            if b is not None:
                blocks.append(b)
                break
    if not blocks:
        b = b_relu(r, shape)
        assert b is not None
        blocks = [b]
    return _finish(r, "mixed", seed, blocks)


def _milp_case(seed: int) -> Case:
    """A small Linear/ReLU net whose exact extreme outputs over the box come from a MILP."""
    r = Rng(seed)
    n0, h1, h2, k = r.int(2, 6), r.int(3, 10), r.int(3, 10), r.int(1, 3)
    layers: list[nn.Module] = [nn.Linear(n0, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, k)]
    if r.coin(0.4):
        layers = layers[:3]
    for m in layers:
        if isinstance(m, nn.Linear):
            randomize(m, r, r.logu(0.7, 3))
    net = nn.Sequential(*layers).eval()
    x = _center(r, (n0,), (0.0, 1.0))
    return Case(case_id=f"milp/{seed}", family="milp", module=net, sample_shape=(n0,), x=x,
                eps={"linf": r.logu(0.02, 0.4), "l2": r.logu(0.05, 1.0)}, domain=(0.0, 1.0),
                desc=" -> ".join(f"Linear({m.in_features}->{m.out_features})" if isinstance(m, nn.Linear)
                                 else type(m).__name__ for m in layers),
                milp_net=net, mode="torch" if r.coin(0.2) else "onnx")


def linear_corners(w: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """For each row of ``w`` (m, n) the box corners that maximise and minimise ``w · x`` exactly:
    ``upper`` where ``w > 0`` (``lower`` where ``w < 0``) and the reverse; shape ``(2m, n)``."""
    lo, hi = lower.flatten(), upper.flatten()
    pos = w > 0
    return torch.cat([torch.where(pos, hi, lo), torch.where(pos, lo, hi)], 0)


def threshold_bias(w: torch.Tensor, corner: torch.Tensor, delta: float) -> float:
    """A float32 bias that puts ``w · corner + b`` at ``delta`` in exact arithmetic, up to the rounding
    of b itself: the adversarial "bias at the rounding threshold" (products of two float32 numbers
    are exact in float64, ``math.fsum`` adds them exactly)."""
    exact = math.fsum((w.double() * corner.double()).tolist())
    return float(np.float32(-exact + delta))


def _float_wide_case(seed: int) -> Case:
    """Float-rounding adversary: wide dot products (up to 4096 terms, N(0,1) weights), cancelling
    sums (weights up to 1e3), biases at the rounding threshold of the extreme point of the set;
    float32 results (onnxruntime's or the engine's) then differ from exact arithmetic by many ulps
    of the *intermediate* magnitude while the output itself is tiny.

    The first layer is a Linear, a 3-D MatMul or a wide Conv whose output units are single dot
    products; its rows (exact: read off the Jacobian) give the exact maximising corner of the box
    (L∞) or direction (L2), and each unit's bias is set, in exact arithmetic (``math.fsum``), to
    put that maximum at a tiny ``delta``; an eval BatchNorm may sit between it and the ReLU."""
    r = Rng(seed)
    target = r.choice(["linf", "linf", "l2"])
    kind = r.choice(["linear", "linear", "conv", "matmul"])
    scale = r.choice([1.0, 1.0, 1.0, 1e2, 1e3])  # large weights: cancelling sums
    m = r.choice([1, 1, 2, 3])
    if kind == "conv":
        c, k = r.choice([(64, 3), (128, 3), (256, 2), (16, 5)])
        shape: Shape = (c, k, k)
        first: nn.Module = nn.Conv2d(c, m, k)
    elif kind == "matmul":
        n = r.choice([512, 1024])
        shape = (2, n)
        first = Lambda(lambda s_, x: x @ s_.w, "x @ W", w=torch.zeros(n, m))
    else:
        n = r.choice([256, 1024, 2048, 4096])
        shape = (n,)
        first = nn.Linear(n, m)
    with torch.no_grad():
        for p_ in first.parameters():
            p_.zero_()
        w = r.normal(first.w.shape if kind == "matmul" else first.weight.shape, scale)  # type: ignore[union-attr]
        (first.w if kind == "matmul" else first.weight).copy_(w)  # type: ignore[union-attr]
    x = r.rand((1, *shape), 0.0, 1.0)
    eps_linf = r.choice([0.5, 0.5, r.logu(1e-3, 0.5)])
    eps_l2 = r.logu(0.05, 1.0)
    lo, hi = torch.clamp(x - eps_linf, 0.0, 1.0), torch.clamp(x + eps_linf, 0.0, 1.0)
    n_out = m * (2 if kind == "matmul" else 1)
    with torch.no_grad():
        J = jacobian(first, x, n_out).double()  # (units, n_in): each unit is one exact dot product
    bn = nn.BatchNorm1d(m).eval() if kind != "conv" and kind != "matmul" and r.coin(0.3) else None
    if bn is not None:
        randomize(bn, r)
        with torch.no_grad():  # an invertible scale: the threshold is solved through it
            bn.weight.copy_(torch.where(bn.weight.abs() < 0.1, torch.full_like(bn.weight, 0.5), bn.weight))
    deltas = [r.choice([2.6e-4, 1e-6, 0.0, -1e-5, 1e-3]) for _ in range(m)]
    with torch.no_grad():
        biases = []
        for j in range(m):
            row = J[j]
            if target == "linf":
                ext = math.fsum((row * torch.where(row > 0, hi.flatten(), lo.flatten()).double()).tolist())
            else:
                ext = math.fsum((row * x.flatten().double()).tolist()) + eps_l2 * float(row.norm())
            if bn is not None:  # s * (ext + b) + t = delta
                sc = float(bn.weight[j] / torch.sqrt(bn.running_var[j] + bn.eps))
                sh = float(bn.bias[j]) - float(bn.running_mean[j]) * sc
                biases.append(float(np.float32((deltas[j] - sh) / sc - ext)))
            else:
                biases.append(float(np.float32(deltas[j] - ext)))
        bias = torch.tensor(biases)
    if kind == "linear":
        with torch.no_grad():
            first.bias.copy_(bias)  # type: ignore[union-attr]
        layers: list[nn.Module] = [first]
    elif kind == "conv":
        with torch.no_grad():
            first.bias.copy_(bias)  # type: ignore[union-attr]
        layers = [first, nn.Flatten()]
    else:
        layers = [first, Lambda(lambda s_, x: x + s_.b, "x + b", b=bias), nn.Flatten()]
    if bn is not None:
        layers.append(bn)
    layers.append(nn.ReLU())
    desc = (f"{kind} first layer on {shape} ({m} units, N(0,{scale:g}) weights) with biases at the {target} "
            f"rounding threshold (+{deltas}){' -> BatchNorm' if bn is not None else ''} -> ReLU")
    if r.coin(0.3):
        head = nn.Linear(n_out, 1)
        with torch.no_grad():
            head.weight.fill_(1.0)
            head.bias.zero_()
        layers.append(head)
        desc += " -> Linear(ones)"
    mod = nn.Sequential(*layers).eval()
    rows = J.float()

    def points(inset: Any) -> torch.Tensor:
        """The exact extreme points of every unit (max and min) for this set."""
        if inset.norm == "linf":
            return linear_corners(rows, inset.lower[0], inset.upper[0]).view(-1, *shape)
        d = (rows / rows.norm(dim=1, keepdim=True)).view(-1, *shape)
        e = float(inset.eps[0]) * (1 - 1e-6)
        pts = torch.cat([inset.x + e * d, inset.x - e * d], 0)
        return torch.maximum(torch.minimum(pts, inset.upper), inset.lower)

    return Case(case_id=f"float_wide/{seed}", family="float_wide", module=mod, sample_shape=shape, x=x,
                eps={"linf": eps_linf, "l2": eps_l2}, domain=(0.0, 1.0), desc=desc, points_fn=points,
                opset=17, mode="torch" if r.coin(0.2) else "onnx")


# ============================================================================================
# hand-written ONNX graphs: attributes and op forms torch's exporter never writes
# ============================================================================================
def _onnx_bytes(nodes: list[Any], inits: list[Any], in_shape: Shape, opset: int) -> bytes:
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [inp], [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    try:  # the checker wants an output shape: let shape inference write it
        import onnx

        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - an invalid template: the loader reports it
        pass
    return m.SerializeToString()


def _onnx_raw_case(seed: int) -> Case:
    """One of a set of ONNX graph templates with random attributes: Gemm alpha/beta/transB and
    every bias shape, Conv auto_pad and asymmetric pads, pools with asymmetric pads, Pad edge/
    reflect/negative, Slice with negative steps, Gather with 2-D and negative indices, Clip with an
    omitted min, Flatten/Reshape forms, variadic Sum/Mean, Max/Min with constants, Cast round trips,
    Identity/Dropout, and ops the engine should refuse (Abs, Softplus, c / x). A Gemm head may
    follow. The loader or the engine may refuse; a wrong bound is the failure."""
    from onnx import TensorProto, helper, numpy_helper

    r = Rng(seed)
    inits: list[Any] = []

    def const(arr: np.ndarray | torch.Tensor, name: str | None = None) -> str:
        name = name or f"c{len(inits)}"
        a = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        inits.append(numpy_helper.from_array(a, name))
        return name

    def node(op: str, ins: list[str], outs: list[str] | None = None, **attrs: Any) -> Any:
        return helper.make_node(op, ins, outs or [f"t{r.seed()}"], **attrs)

    kind = r.choice(["gemm", "conv", "pool", "pad", "slice", "gather", "clip", "reshape", "variadic", "maxmin",
                     "cast", "bn", "identity", "arith", "refuse"])
    nodes: list[Any] = []
    opset = 17
    if kind == "gemm":
        n, m = r.int(2, 16), r.int(1, 8)
        shape: Shape = (n,)
        tb = r.int(0, 1)
        w = r.normal((m, n) if tb else (n, m), 1.0 / math.sqrt(n))
        cshape = r.choice([(m,), (1, m), (), (1, 1), None])
        alpha, beta = r.choice([1.0, 0.5, -2.0]), r.choice([1.0, 0.0, 0.3, -1.0])
        ins = ["input", const(w)] + ([const(r.normal(cshape))] if cshape is not None else [])
        nodes.append(node("Gemm", ins, alpha=alpha, beta=beta, transB=tb))
        desc = f"Gemm(alpha={alpha}, beta={beta}, transB={tb}, C{cshape}) on {shape}"
    elif kind == "conv":
        c, hw = r.int(1, 3), r.int(4, 7)
        shape = (c, hw, hw)
        k, st, d = r.int(1, 3), r.int(1, 2), r.choice([1, 2])
        w = r.normal((r.int(1, 3), c, k, k), 1.0 / k)
        pad = r.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "explicit"])
        attrs: dict[str, Any] = {"strides": [st, st], "dilations": [d, d]}
        if pad == "explicit":
            attrs["pads"] = [r.int(0, 2) for _ in range(4)]
        else:
            attrs["auto_pad"] = pad
            if pad != "VALID":
                attrs.pop("dilations")
        nodes.append(node("Conv", ["input", const(w), const(r.normal((w.shape[0],)))], **attrs))
        desc = f"Conv(k={k}, {attrs}) on {shape}"
    elif kind == "pool":
        c, hw = r.int(1, 2), r.int(4, 7)
        shape = (c, hw, hw)
        k = r.int(2, 3)
        attrs = {"kernel_shape": [k, k], "strides": [r.int(1, 2)] * 2, "pads": [r.int(0, k - 1) for _ in range(4)],
                 "ceil_mode": r.int(0, 1)}
        op = r.choice(["AveragePool", "MaxPool"])
        if op == "AveragePool":
            attrs["count_include_pad"] = r.int(0, 1)
        elif r.coin():
            attrs["dilations"] = [2, 2]
        nodes.append(node(op, ["input"], **attrs))
        desc = f"{op}({attrs}) on {shape}"
    elif kind == "pad":
        c, ln = r.int(1, 3), r.int(3, 8)
        shape = (c, ln)
        mode = r.choice(["constant", "edge", "reflect"])
        lo = -1 if mode == "constant" else 0
        pads = [0, 0, r.int(lo, 2), 0, 0, r.int(lo, 2)]
        if mode == "reflect":
            pads = [min(p_, ln - 1) for p_ in pads]
        ins = ["input", const(np.array(pads, dtype=np.int64))]
        if mode == "constant":
            ins.append(const(np.array(r.choice([0.0, 0.7, -2.0]), dtype=np.float32)))
        nodes.append(node("Pad", ins, mode=mode))
        desc = f"Pad(mode={mode}, pads={pads}) on {shape}"
    elif kind == "slice":
        shape = (r.int(2, 4), r.int(3, 9))
        ax = r.choice([1, 2, -1])
        size = shape[ax - 1] if ax > 0 else shape[-1]
        step = r.choice([1, 2, -1, -2])
        start, end = (r.int(0, size - 1), size + 3) if step > 0 else (r.int(0, size - 1), -size - 5)
        ins = ["input"] + [const(np.array([v], dtype=np.int64)) for v in (start, end, ax, step)]
        nodes.append(node("Slice", ins))
        desc = f"Slice(start={start}, end={end}, axis={ax}, step={step}) on {shape}"
    elif kind == "gather":
        shape = (r.int(2, 4), r.int(2, 6))
        ax = r.choice([1, 2, -1])
        size = shape[ax - 1] if ax > 0 else shape[-1]
        rows, cols = r.int(1, 2), r.int(1, 3)
        idx = np.array([[r.int(-size, size - 1) for _ in range(cols)] for _ in range(rows)], dtype=np.int64)
        if r.coin(0.3):
            idx = idx.reshape(-1)[:1].reshape(())
        nodes.append(node("Gather", ["input", const(idx)], axis=ax))
        desc = f"Gather(axis={ax}, indices={idx.tolist()}) on {shape}"
    elif kind == "clip":
        shape = (r.int(2, 12),)
        lo_, hi_ = sorted([round(r.uniform(-1, 1.5), 2) for _ in range(2)])
        form = r.choice(["max_only", "min_only", "both", "rev"])
        mn = "" if form == "max_only" else const(np.array(lo_ if form != "rev" else hi_, dtype=np.float32))
        mx = "" if form == "min_only" else const(np.array(hi_ if form != "rev" else lo_, dtype=np.float32))
        pre = node("Gemm", ["input", const(r.normal((shape[0], shape[0]), 1.0)), const(r.normal((shape[0],)))])
        nodes += [pre, node("Clip", [pre.output[0], mn, mx])]
        shown_min = "-" if not mn else (lo_ if form != "rev" else hi_)
        shown_max = "-" if not mx else (hi_ if form != "rev" else lo_)
        desc = f"Gemm -> Clip(min={shown_min}, max={shown_max}) on {shape}"
    elif kind == "reshape":
        shape = (r.int(1, 3), r.int(2, 4), r.int(2, 4))
        form = r.choice(["flatten1", "flatten2", "reshape0", "reshape_split"])
        if form.startswith("flatten"):
            nodes.append(node("Flatten", ["input"], axis=int(form[-1])))
        elif form == "reshape0":
            nodes.append(node("Reshape", ["input", const(np.array([0, -1], dtype=np.int64))]))
        else:
            nodes.append(node("Reshape", ["input", const(np.array([0, shape[0], -1], dtype=np.int64))]))
        desc = f"{form} on {shape}"
    elif kind == "variadic":
        shape = (r.int(2, 10),)
        rel = node("Relu", ["input"])
        op = r.choice(["Sum", "Mean"])
        nodes += [rel, node(op, ["input", rel.output[0], const(r.normal(shape))])]
        desc = f"{op}(x, relu(x), c) on {shape}"
    elif kind == "maxmin":
        shape = (r.int(2, 10),)
        op = r.choice(["Max", "Min"])
        cval = r.choice([np.array(0.0, dtype=np.float32), np.array(-0.0, dtype=np.float32),
                         np.array(0.3, dtype=np.float32), np.zeros((1, 1, 1), dtype=np.float32)])
        nodes.append(node(op, ["input", const(cval)]))
        desc = f"{op}(x, c{cval.shape}={float(cval.reshape(-1)[0])}) on {shape}"
    elif kind == "cast":
        shape = (r.int(2, 10),)
        to = r.choice([TensorProto.DOUBLE, TensorProto.FLOAT16])
        c1 = node("Cast", ["input"], to=to)
        nodes += [c1, node("Cast", [c1.output[0]], to=TensorProto.FLOAT)]
        desc = f"Cast(to={TensorProto.DataType.Name(to)}) -> Cast(to=FLOAT) on {shape}"
    elif kind == "bn":
        c = r.int(1, 4)
        shape = (c, r.int(2, 5))
        var = np.asarray(r.rand((c,), 0.0, 2.0))
        nodes.append(node("BatchNormalization", ["input", const(r.normal((c,))), const(r.normal((c,))),
                                                 const(r.normal((c,))), const(var)], epsilon=r.choice([1e-5, 1e-2])))
        desc = f"BatchNormalization(var in [0, 2]) on {shape}"
    elif kind == "identity":
        shape = (r.int(2, 10),)
        i1 = node("Identity", ["input"])
        nodes += [i1, node("Dropout", [i1.output[0]])]
        desc = f"Identity -> Dropout on {shape}"
    elif kind == "arith":
        shape = (1, r.int(2, 6))
        op = r.choice(["Add", "Sub", "Mul", "Div"])
        c = const(r.normal(r.choice([(3, r.int(1, 1) * shape[1]), (shape[1],), (1, 1, 1), ()])) + 2.0)
        ins = ["input", c] if r.coin(0.7) or op == "Div" else [c, "input"]
        nodes.append(node(op, ins))
        desc = f"{op}({', '.join('x' if i == 'input' else 'c' for i in ins)}) on {shape}"
    else:
        shape = (r.int(2, 8),)
        op = r.choice(["Abs", "Softplus", "DivByX", "Exp"])
        if op == "DivByX":
            nodes.append(node("Div", [const(np.array(1.0, dtype=np.float32)), "input"]))
        else:
            nodes.append(node(op, ["input"]))
        desc = f"{op} on {shape} (the engine should refuse)"
    last = nodes[-1].output[0]
    if r.coin(0.4):
        fl = node("Flatten", [last])
        nodes.append(fl)
        nodes.append(node("Relu", [fl.output[0]]))
        desc += " -> Flatten -> Relu"
        last = nodes[-1].output[0]
    nodes[-1].output[0] = "output"
    for nd in nodes:  # rename references to the renamed output
        for i, v in enumerate(nd.input):
            if v == last and nd is not nodes[-1]:
                nd.input[i] = "output"
    domain = r.choice([(0.0, 1.0), (0.0, 1.0), None])
    x = _center(r, shape, domain)
    return Case(case_id=f"onnx_raw/{seed}", family="onnx_raw", module=None, sample_shape=shape, x=x,
                eps={"linf": r.logu(1e-3, 0.5), "l2": r.logu(1e-2, 2.0)}, domain=domain, desc=desc, opset=opset,
                onnx=_onnx_bytes(nodes, inits, shape, opset))


def build_case(family: str, seed: int) -> Case:
    """The case ``family/seed`` (deterministic)."""
    if family == "mixed":
        return _mixed_case(seed)
    if family == "milp":
        return _milp_case(seed)
    if family == "float_wide":
        return _float_wide_case(seed)
    if family == "onnx_raw":
        return _onnx_raw_case(seed)
    if family not in BLOCKS:
        raise KeyError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    return _block_case(family, seed)


def case_from_id(case_id: str) -> Case:
    """``family/seed`` or ``regress/name`` back to the case."""
    fam, _, rest = case_id.partition("/")
    if fam == "regress":
        return REGRESSIONS[rest]()
    return build_case(fam, int(rest))


def derive_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a run with ``seed`` (independent streams per case)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


# ============================================================================================
# regression cases (known bug classes), deterministic
# ============================================================================================
def _reg(name: str, module: nn.Module, shape: Shape, x: torch.Tensor, eps: dict[str, float], desc: str,
         domain: tuple[float, float] | None = (0.0, 1.0), mode: str = "onnx", **kw: Any) -> Case:
    return Case(case_id=f"regress/{name}", family=f"regress:{name}", module=module.eval(), sample_shape=shape, x=x,
                eps=eps, domain=domain, desc=desc, mode=mode, **kw)


def reg_l2_broadcast_add(mode: str = "onnx") -> Case:
    """x (B,1,16) + c (4,16) copies each input 4 times: an L2 ball of radius eps becomes a set of
    radius 2 eps, but the engine kept ``(centre + c, eps)`` as the ball for the first dense layer."""
    c = torch.linspace(-0.5, 0.5, 64).view(4, 16)
    lin = nn.Linear(64, 1)
    head = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(-32.0)  # pre-activation 0 at the centre x = 0.5
        head.weight.fill_(1.0)
        head.bias.fill_(0.0)
    mod = nn.Sequential(Lambda(lambda s, x: x + s.c, "x + c(4,16)", c=c), nn.Flatten(), lin, nn.ReLU(), head)
    x = torch.full((1, 1, 16), 0.5)

    def points(inset: Any) -> torch.Tensor:
        e = float(inset.eps[0])
        return (inset.x + 0.999 * e * torch.ones_like(inset.x) / 4.0).clamp(inset.lower, inset.upper)

    return _reg("l2_broadcast_add" + ("" if mode == "onnx" else "_torch"), mod, (1, 16), x, {"l2": 0.1, "linf": 0.02},
                "x(B,1,16) + c(4,16) -> Flatten -> Linear(64->1, ones, bias -32) -> ReLU -> Linear(1->1)",
                mode=mode, points_fn=points, norms=("l2", "linf"))


def reg_l2_gray_minus_rgb_mean() -> Case:
    """A grayscale (B,1,H,W) input minus an RGB mean (1,3,1,1): three copies of the perturbation
    reach the conv, whose L2 ball radius must grow by sqrt(3)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    conv = nn.Conv2d(3, 2, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.ones_like(conv.weight) * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    mod = nn.Sequential(Lambda(lambda s, x: x - s.mean, "x - mean(1,3,1,1)", mean=mean), conv)
    return _reg("l2_gray_minus_rgb_mean", mod, (1, 5, 5), torch.full((1, 1, 5, 5), 0.5), {"l2": 0.1, "linf": 0.02},
                "x(B,1,5,5) - mean(1,3,1,1) -> Conv2d(3->2, k=3, all +-1 kernels)")


def _plain_lipschitz(name: str, mod: nn.Module, shape: Shape, desc: str, mode: str = "onnx") -> Case:
    return _reg(name, mod, shape, torch.full((1, *shape), 0.5), {"l2": 0.1, "linf": 0.05}, desc, mode=mode)


def reg_lip_conv2d_dilation() -> Case:
    """Conv2d k=3, s=2, d=2, all-ones on 9x9: true L2 gain 6.372; the unfold multiplicity must use the
    dilated extent d(k-1)+1 = 5 (ceil(5/2)^2 = 9), not k (ceil(3/2)^2 = 4, which gives 6)."""
    conv = nn.Conv2d(1, 1, 3, stride=2, dilation=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return _plain_lipschitz("lip_conv2d_dilation", conv, (1, 9, 9),
                            "Conv2d(1->1, k=3, s=2, d=2, ones) on (1,9,9); true L2 gain 6.372")


def reg_lip_conv1d_dilation() -> Case:
    """Conv1d k=2, s=2, d=2, all-ones on length 9: true L2 gain 1.902 (engine's formula: sqrt 2)."""
    conv = nn.Conv1d(1, 1, 2, stride=2, dilation=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return _plain_lipschitz("lip_conv1d_dilation", conv, (1, 9),
                            "Conv1d(1->1, k=2, s=2, d=2, ones) on (1,9); true L2 gain 1.902")


def reg_lip_maxpool_dilation() -> Case:
    """MaxPool2d k=2, s=2, d=2 on 6x6: element (2,2) lies in 4 windows, true L2 gain 2 (formula: 1)."""
    return _plain_lipschitz("lip_maxpool_dilation", nn.MaxPool2d(2, stride=2, dilation=2), (1, 6, 6),
                            "MaxPool2d(k=2, s=2, d=2) on (1,6,6); true L2 gain 2")


def reg_lip_avgpool_ceil() -> Case:
    """AvgPool2d k=2, s=2, ceil_mode on 5x5: the corner window averages one element, true gain 1
    (formula for full windows: 1/2)."""
    return _plain_lipschitz("lip_avgpool_ceil", nn.AvgPool2d(2, 2, ceil_mode=True), (1, 5, 5),
                            "AvgPool2d(k=2, s=2, ceil_mode=True) on (1,5,5); true L2 gain 1")


def reg_lip_adaptive_upsample() -> Case:
    """AdaptiveAvgPool2d 2x2 -> 3x3 (overlapping windows, upsampling): true L2 gain 1.5. The
    TorchScript exporter rejects it, so it is checked on the torch module."""
    return _plain_lipschitz("lip_adaptive_upsample", nn.AdaptiveAvgPool2d(3), (1, 2, 2),
                            "AdaptiveAvgPool2d(3) on (1,2,2); true L2 gain 1.5", mode="torch")


def reg_lip_gather_repeat(mode: str = "torch") -> Case:
    """``x[:, [0, 0, 0, 0]]`` copies x_0 four times: true L2 gain 2."""
    return _plain_lipschitz("lip_gather_repeat" + ("" if mode == "torch" else "_onnx"),
                            Lambda(lambda s, x: x[:, [0, 0, 0, 0]], "x[:, [0,0,0,0]]"), (5,),
                            "x[:, [0, 0, 0, 0]] on (5,); true L2 gain 2", mode=mode)


def reg_float_wide_linear_relu() -> Case:
    """Linear(4096->1) + ReLU, N(0,1) weights, bias just above the rounding threshold of the
    maximising corner of the box [0,1]^4096 (x = 0.5, L∞ eps 0.5): exact value there ~2.6e-4, but
    float32 sums of ~1600 (ulp 1.2e-4) put the engine's upper bound and onnxruntime's output far
    apart."""
    n = 4096
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(n, 1)
    x = torch.full((1, n), 0.5)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, n, generator=g))
        corner = (lin.weight[0] > 0).float()
        lin.bias.fill_(threshold_bias(lin.weight[0], corner, 2.6e-4))
    w = lin.weight.detach().clone()

    def points(inset: Any) -> torch.Tensor:
        if inset.norm == "linf":
            return linear_corners(w, inset.lower[0], inset.upper[0])
        d = w / w.norm()
        return (inset.x + float(inset.eps[0]) * (1 - 1e-6) * d).clamp(inset.lower, inset.upper)

    return _reg("float_wide_linear_relu", nn.Sequential(lin, nn.ReLU()), (n,), x, {"linf": 0.5, "l2": 1.0},
                "Linear(4096->1, N(0,1), bias at the max-corner threshold + 2.6e-4) -> ReLU; box [0,1]^4096",
                points_fn=points)


def reg_cast_fp16_roundtrip() -> Case:
    """(x.half().float() - x) * 1e4: float16 rounding error amplified (up to +-2.44 on [0.5, 1]); an
    engine that treats Cast as the identity bounds it by [0, 0] (CROWN: the two branches cancel)."""
    mod = Lambda(lambda s, x: (x.half().float() - x) * 1e4, "(x.half().float() - x) * 1e4")
    return _reg("cast_fp16_roundtrip", mod, (8,), torch.full((1, 8), 0.7), {"linf": 0.3, "l2": 0.5},
                "(x.to(float16).to(float32) - x) * 1e4 on (8,), x = 0.7")


def reg_clip_min_gt_max() -> Case:
    """torch.clamp(h, min=0.7, max=0.2) is the constant 0.2 (ONNX and torch agree); the relaxation
    ``a + relu(x - a) - relu(x - b)`` assumes a <= b."""
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 1.0], [-1.5, 2.0, 1.0, -0.5], [1.0, 1.0, 1.0, 1.0]]))
        lin.bias.copy_(torch.tensor([-0.5, 0.0, -1.0]))
    mod = nn.Sequential(lin, Lambda(lambda s, x: torch.clamp(x, 0.7, 0.2), "clamp(0.7, 0.2)"), nn.Linear(3, 2))
    with torch.no_grad():
        mod[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.3, -1.0]]))
        mod[2].bias.zero_()
    return _reg("clip_min_gt_max", mod, (4,), torch.full((1, 4), 0.5), {"linf": 0.4, "l2": 0.8},
                "Linear(4->3) -> torch.clamp(x, min=0.7, max=0.2) -> Linear(3->2)")


def reg_clip_infinite_limit(mode: str = "onnx") -> Case:
    """torch.clamp(h, -0.5, inf) is max(h, -0.5); the two-ReLU relaxation with b = inf gives
    inf - inf = NaN in CROWN's lines (IBP is fine)."""
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.5, 0.5, -1.0, 1.0], [-1.0, 0.0, 1.0, 1.0]]))
        lin.bias.zero_()
    mod = nn.Sequential(lin, Lambda(lambda s, x: torch.clamp(x, -0.5, float("inf")), "clamp(-0.5, inf)"), nn.Linear(3, 2))
    with torch.no_grad():
        mod[2].weight.copy_(torch.tensor([[1.0, -1.0, 1.0], [0.5, 1.0, -0.5]]))
        mod[2].bias.zero_()
    return _reg("clip_infinite_limit" + ("" if mode == "onnx" else "_torch"), mod, (4,), torch.full((1, 4), 0.5),
                {"linf": 0.5, "l2": 1.0}, "Linear(4->3) -> torch.clamp(x, -0.5, inf) -> Linear(3->2)", mode=mode)


def reg_wide_clip() -> Case:
    """Linear -> Clip(-1, 1) with pre-activations far wider than the clip range: IBP is tight
    ([-1, 1]); CROWN's two-ReLU relaxation is much looser unless intersected with IBP."""
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-6, 6, 24).view(4, 6))
        lin.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    mod = nn.Sequential(lin, nn.Hardtanh(-1.0, 1.0))
    return _reg("wide_clip", mod, (6,), torch.full((1, 6), 0.5), {"linf": 0.5, "l2": 1.5},
                "Linear(6->4, weights up to 6) -> Hardtanh(-1, 1) with pre-activation range ~[-20, 20]")


def reg_onnx_tanh() -> Case:
    """An ONNX Tanh node: onnx2torch converts it to OnnxFunction(torch.tanh), which the engine may
    bound (TanhRule) or refuse; either is fine, a wrong bound is not."""
    l1, l2 = nn.Linear(6, 5), nn.Linear(5, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in (l1, l2):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    mod = nn.Sequential(l1, nn.Tanh(), l2)
    return _reg("onnx_tanh", mod, (6,), torch.full((1, 6), 0.5), {"linf": 0.2, "l2": 0.5},
                "Linear(6->5) -> Tanh (ONNX node, opset 18) -> Linear(5->2)", opset=18)


def reg_lip_broadcast_sub() -> Case:
    """``x[..., :1] - x`` on (9,): two perturbed operands, one broadcast (x_0 copied 9 times): true L2
    gain 3, while summing the operands' constants gives 1 + 1 = 2."""
    return _plain_lipschitz("lip_broadcast_sub", Lambda(lambda s, x: x[..., :1] - x, "x[..., :1] - x"), (9,),
                            "x[..., :1] - x on (9,); true L2 gain 3")


def reg_lip_broadcast_outer_add() -> Case:
    """``x.unsqueeze(1) + x.unsqueeze(2)`` on (4,): every element used 8 times, true L2 gain 4 (claimed 2)."""
    return _plain_lipschitz("lip_broadcast_outer_add",
                            Lambda(lambda s, x: x.unsqueeze(1) + x.unsqueeze(2), "x[:, None] + x[:, :, None]"), (4,),
                            "x.unsqueeze(1) + x.unsqueeze(2) on (4,); true L2 gain 4")


def reg_lip_radius_broadcast_sub() -> Case:
    """A two-class model ``Linear(x[..., :1] - x)`` whose margin gradient has norm 15.5 while the
    certificate uses 2 * ||w_1 - w_0|| = 8: the certified L2 radius is about twice too large, and a
    gradient step of that length flips the prediction in onnxruntime."""
    lin = nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(16), torch.ones(16)]))
        lin.bias.copy_(torch.tensor([0.5, 0.0]))
    mod = nn.Sequential(Lambda(lambda s, x: x[..., :1] - x, "x[..., :1] - x"), lin)
    return _reg("lip_radius_broadcast_sub", mod, (16,), torch.full((1, 16), 0.5), {"l2": 0.05, "linf": 0.01},
                "x[..., :1] - x on (16,) -> Linear(16->2, rows 0 and 1, biases 0.5, 0): margin 0.5 at x = 0.5",
                domain=None)


def reg_gather_scalar_index(mode: str = "onnx") -> Case:
    """``x[:, 3]``: a scalar index leaves a 0-d output per sample (ONNX Gather with a 0-d index)."""
    return _reg("gather_scalar_index" + ("" if mode == "onnx" else "_torch"),
                Lambda(lambda s, x: x[:, 3] * 2.0, "x[:, 3] * 2"), (8,), torch.full((1, 8), 0.5),
                {"linf": 0.1, "l2": 0.1}, "x[:, 3] * 2 on (8,): output shape (B,)", mode=mode)


def reg_batch_mixing_flip() -> Case:
    """``x.flip(0)`` reverses the batch (ONNX Slice with step -1 on axis 0): sample i's output is
    sample B-1-i's input, so per-sample bounds are meaningless; the engine must refuse."""
    return _reg("batch_mixing_flip", nn.Sequential(Lambda(lambda s, x: x.flip(0), "x.flip(0)"), nn.Linear(4, 2)),
                (4,), torch.full((1, 4), 0.5), {"linf": 0.1, "l2": 0.1}, "x.flip(0) -> Linear(4->2)")


def reg_cast_fp16_overflow_edge() -> Case:
    """(x*40 + 65480).half().float() - 65480 on x in [0.8, 1]: float16 overflows to inf only at
    x = 1 (the loader's random parity inputs never reach it), so the true bounds are a finite
    lower bound and +inf; NaN bounds claim nothing (and compare false in every test)."""
    mod = Lambda(lambda s, x: (x * 40.0 + 65480.0).half().float() - 65480.0, "(x*40 + 65480).half().float() - 65480")
    return _reg("cast_fp16_overflow_edge", mod, (3,), torch.full((1, 3), 0.9), {"linf": 0.1, "l2": 0.1},
                "(x*40 + 65480).to(float16).to(float32) - 65480 on (3,), x = 0.9: inf at x = 1")


REGRESSIONS: dict[str, Callable[[], Case]] = {
    "l2_broadcast_add": reg_l2_broadcast_add,
    "l2_broadcast_add_torch": lambda: reg_l2_broadcast_add("torch"),
    "l2_gray_minus_rgb_mean": reg_l2_gray_minus_rgb_mean,
    "lip_conv2d_dilation": reg_lip_conv2d_dilation,
    "lip_conv1d_dilation": reg_lip_conv1d_dilation,
    "lip_maxpool_dilation": reg_lip_maxpool_dilation,
    "lip_avgpool_ceil": reg_lip_avgpool_ceil,
    "lip_adaptive_upsample": reg_lip_adaptive_upsample,
    "lip_gather_repeat": reg_lip_gather_repeat,
    "lip_gather_repeat_onnx": lambda: reg_lip_gather_repeat("onnx"),
    "float_wide_linear_relu": reg_float_wide_linear_relu,
    "cast_fp16_roundtrip": reg_cast_fp16_roundtrip,
    "clip_min_gt_max": reg_clip_min_gt_max,
    "clip_infinite_limit": reg_clip_infinite_limit,
    "clip_infinite_limit_torch": lambda: reg_clip_infinite_limit("torch"),
    "wide_clip": reg_wide_clip,
    "onnx_tanh": reg_onnx_tanh,
    "lip_broadcast_sub": reg_lip_broadcast_sub,
    "lip_broadcast_outer_add": reg_lip_broadcast_outer_add,
    "lip_radius_broadcast_sub": reg_lip_radius_broadcast_sub,
    "gather_scalar_index": reg_gather_scalar_index,
    "gather_scalar_index_torch": lambda: reg_gather_scalar_index("torch"),
    "batch_mixing_flip": reg_batch_mixing_flip,
    "cast_fp16_overflow_edge": reg_cast_fp16_overflow_edge,
}


# ============================================================================================
# results
# ============================================================================================
@dataclass
class Violation:
    """One unsound claim, with enough context to reproduce and size it."""

    check: str  # bound | nan-bound | milp | lipschitz | jacobian | op-lipschitz | crash
    method: str  # bound method, "lipschitz", or the op label for op-lipschitz
    norm: str
    reference: str  # ort | f64 | torch | milp | jacobian | exact-op | ...
    excess: float  # by how much the claim is exceeded (absolute)
    claimed: float
    found: float
    detail: str = ""

    def line(self) -> str:
        return (f"{self.check:12s} {self.method:12s} {self.norm:4s} vs {self.reference:8s} "
                f"claimed {self.claimed:.6g}, found {self.found:.6g} (exceeded by {self.excess:.3g}) {self.detail}")


@dataclass
class CaseResult:
    """Outcome of one case: violations, what was refused, and counters (plain data: picklable)."""

    case_id: str
    family: str
    desc: str
    mode: str = "onnx"
    violations: list[Violation] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # export-rejected, load-refused, engine-refused, ...
    checks: int = 0  # individual containment/ratio comparisons made
    onnx_path: str | None = None
    seconds: float = 0.0
    op_gains: list[tuple[str, str, float, float]] = field(default_factory=list)  # (op, norm, claimed, measured)
    widths: dict[str, float] = field(default_factory=dict)  # "norm/method" -> max bound width
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    worst_rel_excess: float = 0.0  # largest (value - bound) / (1 + max|output|) seen, even within tolerance

    @property
    def failed(self) -> bool:
        return bool(self.violations)

    @property
    def refused(self) -> bool:
        return "engine-refused" in self.flags

    def report(self) -> str:
        head = f"case {self.case_id} [{self.mode}] {self.desc}"
        if self.onnx_path:
            head += f"\n  onnx: {self.onnx_path}"
        if self.flags:
            head += f"\n  flags: {', '.join(self.flags)}"
        lines = [head] + ["  " + v.line() for v in self.violations]
        lines.append(f"  replay: python tools/soundness_fuzz.py --replay {self.case_id}")
        return "\n".join(lines)

    def flag(self, text: str) -> None:
        if text not in self.flags:
            self.flags.append(text)

    def add(self, v: Violation) -> None:
        """Keep the worst violation per (check, method, norm, reference)."""
        for i, o in enumerate(self.violations):
            if (o.check, o.method, o.norm, o.reference) == (v.check, v.method, v.norm, v.reference):
                if v.excess > o.excess:
                    self.violations[i] = v
                return
        self.violations.append(v)


@dataclass
class Config:
    """Budgets per case: small enough for >= 20 cases/s on one core."""

    n_samples: int = 256
    pgd_steps: int = 20
    pgd_outputs: int = 16  # at most this many output coordinates attacked (both directions)
    alpha_steps: int = 3  # any alpha in [0, 1] is sound: a few steps move them off CROWN's start
    rel_tol: float = 0.0  # strict: the bounds cover float32 execution (certonnx.bounds.rounding)
    #: float noise allowed on ORT outputs in Lipschitz ratios (the constants bound exact arithmetic)
    lip_rel_tol: float = REL_TOL
    lipschitz: bool = True
    op_lipschitz: bool = True
    methods: tuple[str, ...] | None = None  # None: every method in certonnx.bounds.METHODS
    keep_onnx: bool = True


# ============================================================================================
# the pipeline pieces
# ============================================================================================
class ExportRejected(Exception):
    """torch.onnx.export refused the construction (counted, then checked in torch)."""


@contextlib.contextmanager
def _quiet_stdout_fd() -> Any:
    """Silence file descriptor 1: the TorchScript exporter prints the whole IR graph from C++ on
    stdout when it rejects a model, which would flood the fuzzer's progress output."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def export_onnx(case: Case, path: Path) -> bytes:
    """TorchScript exporter (``dynamo=False``), dynamic batch; the bytes are also written to ``path``."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), _quiet_stdout_fd():
            warnings.simplefilter("ignore")
            torch.onnx.export(case.module, (case.x[:1].expand(2, *case.sample_shape).clone(),), buf, dynamo=False,
                              opset_version=case.opset, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ExportRejected(" ".join(str(e).split())[:200]) from e
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def ort_session(data: bytes, optimize: bool = True) -> Any:
    """onnxruntime on one thread, default graph optimisations: what a deployment runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class Evaluator:
    """Ground-truth outputs at points: onnxruntime on the file (or the torch module in torch mode)
    and a float64 copy of the graph the engine bounds (None where the graph cannot run in float64,
    e.g. around a Cast)."""

    def __init__(self, model: nn.Module, sess: Any | None) -> None:
        self.model = model
        self.sess = sess
        self.iname = sess.get_inputs()[0].name if sess is not None else None
        # float64 copies of the parameters and buffers, swapped in by functional_call (cheaper
        # than deep-copying the graph module); a float32 constant left elsewhere in the graph
        # makes the float64 run fail, and then there is simply no float64 reference
        self.state64: dict[str, torch.Tensor] | None = {
            k: v.detach().double() if v.is_floating_point() else v
            for k, v in [*model.named_parameters(), *model.named_buffers()]}

    def primary(self, X: torch.Tensor) -> tuple[str, torch.Tensor]:
        """("ort", outputs) on the ONNX file, or ("torch", outputs) of the module in torch mode."""
        if self.sess is not None:
            out = self.sess.run(None, {self.iname: X.detach().numpy().astype(np.float32)})[0]
            return "ort", torch.from_numpy(np.asarray(out, dtype=np.float64)).reshape(X.shape[0], -1)
        with torch.no_grad():
            return "torch", self.model(X).double().reshape(X.shape[0], -1)

    def f64(self, X: torch.Tensor) -> torch.Tensor | None:
        if self.state64 is None:
            return None
        try:
            with torch.no_grad():
                y = torch.func.functional_call(self.model, self.state64, (X.double(),))
            if isinstance(y, torch.Tensor) and y.dtype == torch.float64:
                return y.reshape(X.shape[0], -1)
        except Exception:  # noqa: BLE001 - mixed dtypes (casts, float32 constants) in the graph
            pass
        self.state64 = None
        return None


def sample_points(inset: Any, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` points of the set around sample 0, shape ``(n, *s)``, inside the domain.

    L∞: a quarter corners, a quarter mixed corners (each coordinate at lower, centre or upper), the
    rest uniform. L2: half on the sphere, axis points ``x ± eps e_i``, diagonal points ``x ± eps
    sign/sqrt(n)``, the rest inside; clipped to the domain box (which keeps them in the ball, the
    centre being in the box)."""
    x, lo, hi = inset.x[:1], inset.lower[:1], inset.upper[:1]
    s = x.shape[1:]
    d = int(numel(s))
    if inset.norm == "linf":
        u = torch.rand((n, *s), generator=gen)
        q = n // 4
        u[:q] = u[:q].round()
        m = torch.randint(0, 3, (q, *s), generator=gen).float() / 2
        u[q:2 * q] = m
        # lo + (hi - lo)·1 rounds above hi when |lo| ≫ |hi| (seen: 17 ulps with lo = -0.61,
        # hi = 0.0075): clamp, so that every point is in the set it tests
        return torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)
    eps = float(inset.eps[0])
    if inset.norm == "l1":
        # half vertices x ± eps e_i (where linear functions take their extremes), then points
        # between two vertices, then Laplace-spread points of the ball; clipped to the domain
        g = torch.zeros((n, d))
        h = n // 2
        g[torch.arange(h), torch.randint(0, d, (h,), generator=gen)] = torch.where(
            torch.rand(h, generator=gen) < 0.5, -1.0, 1.0)
        q = n // 4
        t = torch.rand(q, generator=gen)
        g[h:h + q, :] = 0.0
        g[torch.arange(h, h + q), torch.randint(0, d, (q,), generator=gen)] += t
        g[torch.arange(h, h + q), torch.randint(0, d, (q,), generator=gen)] -= 1 - t
        lap = torch.randn((n - h - q, d), generator=gen).sign() * -torch.log(torch.rand((n - h - q, d), generator=gen))
        g[h + q:] = lap / lap.abs().sum(1, keepdim=True) * torch.rand(n - h - q, 1, generator=gen)
        g = g / g.abs().sum(1, keepdim=True).clamp(min=1.0)
        pts = x + (eps * (1 - 1e-6)) * g.view(n, *s)
        return torch.maximum(torch.minimum(pts, hi), lo)
    g = torch.randn((n, d), generator=gen)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rad = torch.rand(n, 1, generator=gen) ** (1.0 / max(d, 1))
    rad[: n // 2] = 1.0
    na = min(n // 8, 2 * d)
    if na:
        ax = torch.randint(0, d, (na,), generator=gen)
        g[n // 2: n // 2 + na] = 0.0
        g[torch.arange(n // 2, n // 2 + na), ax] = torch.where(torch.rand(na, generator=gen) < 0.5, -1.0, 1.0)
        rad[n // 2: n // 2 + na] = 1.0
    nd = n // 8
    sg = torch.where(torch.rand((nd, d), generator=gen) < 0.5, -1.0, 1.0) / math.sqrt(d)
    g[n // 2 + na: n // 2 + na + nd] = sg[: max(0, min(nd, n - n // 2 - na))]
    rad[n // 2 + na: n // 2 + na + nd] = 1.0
    pts = x + (eps * (1 - 1e-7)) * (rad * g).view(n, *s)
    return torch.maximum(torch.minimum(pts, hi), lo)


def project(inset: Any, xs: torch.Tensor) -> torch.Tensor:
    """Project points ``(n, *s)`` onto the set: the ball (L2, L1), then the domain box."""
    x, lo, hi = inset.x[:1], inset.lower[:1], inset.upper[:1]
    if inset.norm == "l1":
        from certonnx.attacks.pgd import project_l1

        e = torch.full((xs.shape[0],), float(inset.eps[0]) * (1 - 1e-6))
        xs = x + project_l1(xs - x, e)
    elif inset.norm == "l2":
        dlt = (xs - x).flatten(1)
        nrm = dlt.norm(dim=1, keepdim=True).clamp_min(1e-12)
        fac = torch.clamp(float(inset.eps[0]) * (1 - 1e-7) / nrm, max=1.0)
        xs = x + (dlt * fac).view_as(xs)
    return torch.maximum(torch.minimum(xs, hi), lo)


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, k: int) -> torch.Tensor:
    """Jacobian ``(k, n)`` of a per-sample function with ``k`` outputs at one point ``p`` (1, *s),
    in one backward pass: the point repeated k times, output j's cotangent on copy j."""
    z = p.detach().expand(k, *p.shape[1:]).clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(z).reshape(k, -1)
        (g,) = torch.autograd.grad(out, z, torch.eye(k, dtype=out.dtype), allow_unused=True)
    if g is None:
        return torch.zeros(k, p[0].numel())
    return g.reshape(k, -1)


def op_norm(J: torch.Tensor, norm: str) -> float:
    """Induced operator norm with the same norm on both sides: spectral (L2), max row sum (L∞)."""
    J = J.detach().double()
    if J.numel() == 0:
        return 0.0
    if norm == "l2":
        return float(torch.linalg.matrix_norm(J, 2))
    return float(J.abs().sum(1).max())


def pgd_points(fn: Callable[[torch.Tensor], torch.Tensor], insets: list[Any], outs: torch.Tensor, steps: int,
               gen: torch.Generator) -> list[torch.Tensor]:
    """Every iterate of PGD towards the lower and upper bound of each output in ``outs``, for all
    sets at once (one batched forward/backward per step, the step and projection vectorised over
    all points). Two starts per (output, direction): the centre and a random point of the set.
    Signed steps for L∞, normalised gradient steps for L2, a random step where the gradient
    vanishes (dead ReLUs, flat clips). Returns, per set, all iterates
    ``((steps + 1) * 4 * len(outs), *s)``."""
    k = outs.numel()
    starts, centre, lo, hi, step, eps, l2, l1 = [], [], [], [], [], [], [], []
    for inset in insets:
        n = 4 * k
        starts.append(torch.cat([inset.x[:1].expand(2 * k, *inset.x.shape[1:]), sample_points(inset, 2 * k, gen)], 0))
        centre.append(inset.x[:1].expand(n, *inset.x.shape[1:]))
        lo.append(inset.lower[:1].expand(n, *inset.x.shape[1:]))
        hi.append(inset.upper[:1].expand(n, *inset.x.shape[1:]))
        e = float(inset.eps[0])
        step.append(torch.full((n, 1), max(2.5 * e / steps, 1e-6)))
        eps.append(torch.full((n, 1), e * (1 - 1e-7)))
        l2.append(torch.full((n, 1), inset.norm == "l2"))
        l1.append(torch.full((n, 1), inset.norm == "l1"))
    X = torch.cat(starts, 0)
    C, LO, HI = (torch.cat(t, 0).flatten(1) for t in (centre, lo, hi))
    STEP, EPS, L2, L1 = torch.cat(step, 0), torch.cat(eps, 0), torch.cat(l2, 0), torch.cat(l1, 0)
    sign = torch.tensor([1.0, -1.0]).repeat_interleave(k).repeat(2 * len(insets))
    coord = outs.repeat(4 * len(insets))
    hist = [X.clone()]
    for _ in range(steps):
        Xg = X.detach().requires_grad_(True)
        with torch.enable_grad():
            y = fn(Xg).reshape(X.shape[0], -1)
            obj = (y.gather(1, coord.view(-1, 1)).squeeze(1) * sign).sum()
            (g,) = torch.autograd.grad(obj, Xg, allow_unused=True)
        gf = torch.zeros_like(X).flatten(1) if g is None else g.flatten(1)
        flat = gf.abs().amax(1) == 0
        if flat.any():
            gf = gf.clone()
            gf[flat] = torch.randn((int(flat.sum()), gf.shape[1]), generator=gen)
        d = torch.where(L2, gf / gf.norm(dim=1, keepdim=True).clamp_min(1e-30), gf.sign())
        # L1: steepest ascent moves the one coordinate of largest |gradient|
        top = gf.abs().argmax(1, keepdim=True)
        d = torch.where(L1, torch.zeros_like(gf).scatter(1, top, gf.gather(1, top).sign()), d)
        Z = X.flatten(1) + STEP * d
        dz = Z - C  # L2: back into the ball, then (all) the domain box, which keeps it in the ball
        fac = torch.clamp(EPS / dz.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
        Z = torch.where(L2, C + dz * fac, Z)
        if bool(L1.any()):
            from certonnx.attacks.pgd import project_l1

            Z = torch.where(L1, C + project_l1(dz, EPS.squeeze(1)), Z)
        X = torch.maximum(torch.minimum(Z, HI), LO).view_as(X).detach()
        hist.append(X.clone())
    H = torch.stack(hist, 0)  # (steps+1, P, *s)
    return [h.reshape(-1, *h.shape[2:]) for h in torch.split(H, 4 * k, dim=1)]


def _dist(inset: Any, X: torch.Tensor) -> torch.Tensor:
    d = (X - inset.x[:1]).flatten(1).double()
    if inset.norm == "l1":
        return d.abs().sum(1)
    return d.norm(dim=1) if inset.norm == "l2" else d.abs().amax(1)


def _gradient_points(fn: Callable[[torch.Tensor], torch.Tensor], inset: Any, k: int) -> torch.Tensor:
    """One full step from the centre along ± each output's gradient: the exact extreme points of a
    linear model (sign(grad) corners for L∞, grad/||grad|| for L2)."""
    J = jacobian(fn, inset.x[:1], k).float()
    if inset.norm == "linf":
        D = J.sign()
        step = float(inset.eps[0])
    elif inset.norm == "l1":  # the vertex ± eps e_j at the largest |∂f/∂x_j|
        top = J.abs().argmax(1, keepdim=True)
        D = torch.zeros_like(J).scatter(1, top, J.gather(1, top).sign())
        step = float(inset.eps[0]) * (1 - 1e-6)
    else:
        D = J / J.norm(dim=1, keepdim=True).clamp_min(1e-30)
        step = float(inset.eps[0]) * (1 - 1e-6)
    D = torch.cat([D, -D], 0).view(-1, *inset.x.shape[1:])
    return project(inset, inset.x[:1] + step * D)


# ============================================================================================
# one case
# ============================================================================================
def _methods(cfg: Config) -> tuple[str, ...]:
    from certonnx.bounds import METHODS

    return tuple(cfg.methods) if cfg.methods is not None else tuple(METHODS)


def prepare(case: Case, workdir: Path, res: CaseResult) -> tuple[nn.Module, Shape, Any | None]:
    """Export + load (ONNX mode) or the module itself (torch mode, or when export/load refuses).
    Returns the model the engine bounds, its sample shape, and an onnxruntime session or None."""
    from certonnx.errors import CertonnxError

    if case.mode == "onnx":
        path = workdir / (case.case_id.replace("/", "_") + ".onnx")
        try:
            if case.onnx is not None:
                data = case.onnx
                path.write_bytes(data)
            else:
                data = export_onnx(case, path)
        except ExportRejected as e:
            res.flag(f"export-rejected: {e}")
        else:
            res.onnx_path = str(path)
            try:
                import certonnx

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cm = certonnx.load(str(path), n_parity=2, domain=case.domain or (0.0, 1.0))
                try:
                    sess = ort_session(data)
                except Exception as e:  # noqa: BLE001 - e.g. a shape inference failure in an optimiser pass
                    # the loader checks with optimisations off; that is then the only way to run it
                    res.flag(f"ort-optimised-rejected: {' '.join(str(e).split())[:120]}")
                    sess = ort_session(data, optimize=False)
                return cm.module, cm.sample_shape, sess
            except CertonnxError as e:
                res.flag(f"load-refused: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
    if case.module is None:
        raise _Refused()
    res.mode = "torch"
    return case.module, case.sample_shape, None


class _Refused(Exception):
    """A hand-written ONNX case the loader refused: nothing else to run it on (a sound outcome)."""


def run_case(case: Case, workdir: Path, cfg: Config | None = None) -> CaseResult:
    """Run every check of the module docstring on one case; never raises (an unexpected harness
    error is reported as a ``crash`` violation of reference ``harness``)."""
    cfg = cfg or Config()
    t0 = time.perf_counter()
    res = CaseResult(case.case_id, case.family, case.desc, case.mode)
    try:
        _run(case, workdir, cfg, res)
    except Exception as e:  # noqa: BLE001 - a harness bug must not stop a long run
        res.add(Violation("crash", "harness", "-", "harness", float("inf"), 0.0, 0.0,
                          f"{type(e).__name__}: {e} | {traceback.format_exc(limit=-3).strip().splitlines()[-2:]}"))
    res.seconds = time.perf_counter() - t0
    return res


def _engine_call(res: CaseResult, what: str, norm: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Call into the engine; UnsupportedOpError is a sound refusal (flag), anything else a crash."""
    from certonnx.errors import UnsupportedOpError

    try:
        return True, fn()
    except UnsupportedOpError as e:
        res.flag(f"refused {what}/{norm}: {' '.join(str(e).split())[:140]}")
    except ValueError as e:
        if "no Lipschitz constant" in str(e):
            res.flag(f"no-lipschitz/{norm}")
        else:
            res.add(Violation("crash", what, norm, "engine", float("inf"), 0.0, 0.0, f"ValueError: {str(e)[:200]}"))
    except Exception as e:  # noqa: BLE001 - engine crash: a bug, recorded
        res.add(Violation("crash", what, norm, "engine", float("inf"), 0.0, 0.0, f"{type(e).__name__}: {str(e)[:200]}"))
    return False, None


def _eps_of(case: Case, norm: str) -> float | torch.Tensor:
    e = case.eps[norm]
    return torch.tensor(e, dtype=torch.float32) if isinstance(e, (list, tuple)) else e


def _run(case: Case, workdir: Path, cfg: Config, res: CaseResult) -> None:
    from certonnx.bounds import BoundedModule, InputSet

    clock = _Clock(res)
    try:
        model, shape, sess = prepare(case, workdir, res)
    except _Refused:
        return
    model.eval()
    ok, bm = _engine_call(res, "BoundedModule", "-", lambda: BoundedModule(model, shape))
    clock("import")
    gen = torch.Generator().manual_seed(zlib.crc32(case.case_id.encode()))
    if _mixes_samples(model, shape, case.domain, gen):
        res.flag("mixes-samples")
        if ok:  # the engine must refuse, at the latest when asked for bounds of a batch of two
            x2 = torch.cat([case.x[:1], case.x[:1] * 0.5 + 0.25], 0).float()
            pair = InputSet(x2, 0.01, "linf", case.domain)
            ok2, _ = _engine_call(res, "ibp", "linf", lambda: bm.compute(pair, None, "ibp"))
            if ok2:
                res.add(Violation("batch-mixing", "ibp", "linf", "engine", float("inf"), 0.0, 0.0,
                                  "bounds computed for a model whose output for one sample depends on the other "
                                  "samples of the batch (per-sample bounds are meaningless there)"))
        return
    if not ok:
        if not res.violations:
            res.flag("engine-refused")
        return
    ev = Evaluator(model, sess)
    x = case.x.float()
    B = x.shape[0]
    # the engine bounds the whole batch at once (per-sample eps included); the points are drawn
    # and checked per sample, in a set of their own
    norms = tuple(n for n in case.norms if n in case.eps)
    full = {n: InputSet(x, _eps_of(case, n), n, case.domain) for n in norms}
    groups = [(n, b, InputSet(x[b:b + 1], full[n].eps[b:b + 1], n, case.domain)) for n in norms for b in range(B)]
    with torch.no_grad():
        y0 = model(x[:1])
    K, two_d = y0[0].numel(), y0.ndim == 2
    outs = torch.randperm(K, generator=gen)[: cfg.pgd_outputs]

    # -- points: samples, gradient steps, special points, PGD iterates; their reference values --
    pgd = pgd_points(model, [g[2] for g in groups], outs, cfg.pgd_steps, gen)
    point_sets: list[torch.Tensor] = []
    for (_, b, inset), hist in zip(groups, pgd):
        parts = [sample_points(inset, cfg.n_samples, gen), _gradient_points(model, inset, K), hist, x[b:b + 1]]
        if case.points_fn is not None:
            parts.append(case.points_fn(inset).reshape(-1, *shape).float())
        point_sets.append(torch.cat(parts, 0))
    clock("points")
    refs: list[dict[str, torch.Tensor]] = []
    for P in point_sets:
        name, v = ev.primary(P)
        r = {name: v}
        v64 = ev.f64(P)
        if v64 is not None:
            r["f64"] = v64
        refs.append(r)
    clock("reference")

    # -- bounds of every method ----------------------------------------------------------------
    for norm in norms:
        for method in _methods(cfg):
            ok, bounds = _engine_call(res, method, norm, lambda norm=norm, method=method: bm.compute(
                full[norm], None, method, alpha_steps=cfg.alpha_steps))
            if not ok:
                continue
            LB, UB = (t.detach().double().reshape(B, -1) for t in bounds)
            res.widths[f"{norm}/{method}"] = float((UB - LB).max())
            for (gn, b, inset), P, r in zip(groups, point_sets, refs):
                if gn != norm:
                    continue
                main = r.get("ort", r.get("torch"))
                assert main is not None
                finite = main[torch.isfinite(main)]
                scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
                tol = cfg.rel_tol * scale
                lb, ub = LB[b], UB[b]
                nan = torch.isnan(lb) | torch.isnan(ub)
                if nan.any() and bool(torch.isfinite(main).all()):
                    # a NaN bound claims nothing; it is a bug where every output is finite
                    res.add(Violation("nan-bound", method, norm, "engine", float("inf"), float("nan"), 0.0,
                                      f"NaN bounds at outputs {torch.nonzero(nan).flatten()[:8].tolist()} of sample "
                                      f"{b}, whose outputs are all finite"))
                torch_vals = _Lazy(lambda P=P: _torch_values(model, P)) if "ort" in r else None
                for ref, V in r.items():
                    _check_bounds(res, method, inset, ref, V, lb, ub, tol, scale, P, torch_vals)
    if case.milp_net is not None and "linf" in full:
        for gn, _b, inset in groups:
            if gn == "linf":
                _check_milp(res, case, bm, inset, cfg)
    clock("bounds")

    # -- Lipschitz certificate -------------------------------------------------------------------
    if cfg.lipschitz:
        cache: dict[str, Any] = {}
        for (gn, b, inset), P, r in zip(groups, point_sets, refs):
            if gn == "l1":  # the Lipschitz certificate is for linf and l2
                continue
            _check_lipschitz(res, case, bm, model, inset, P, r, K, cfg, ev, cache)
            if K >= 2 and two_d and b == 0:  # lipschitz_radius is for classifiers: logits (B, K)
                _check_lipschitz_radius(res, bm, model, inset, ev, cfg, gen)
        if cfg.op_lipschitz:
            _check_op_lipschitz(res, bm, groups[0][2], tuple(n for n in norms if n != "l1"))
        clock("lipschitz")


def _mixes_samples(model: nn.Module, shape: Shape, domain: tuple[float, float] | None, gen: torch.Generator) -> bool:
    """Whether the model's output for one sample depends on the others (or the batch size): the
    same batch of three is run with sample 0, then samples 1-2, replaced; the outputs of the
    untouched samples must not move. (The batch size stays fixed: batched kernels may round
    differently for other sizes, and a rounding-amplifying graph, such as a float16 round trip
    times 1000, would then look batch-dependent.)"""
    lo, hi = domain if domain is not None else (0.0, 1.0)

    def draw(n: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)

    X = draw(3)
    Xb, Xc = X.clone(), X.clone()
    Xb[0] = draw(1)[0]
    Xc[1:] = draw(2)
    try:
        with torch.no_grad():
            Y, Yb, Yc = model(X), model(Xb), model(Xc)
            Y1 = model(X[:1])
    except Exception:  # noqa: BLE001 - a batch-size-dependent graph
        return True
    if not (Y.shape == Yb.shape == Yc.shape) or Y.ndim == 0 or Y.shape[0] != 3:
        return True
    if Y1.ndim == 0 or Y1.shape[0] != 1:  # e.g. a transpose of the batch axis into a constant
        return True

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        fin = torch.isfinite(a) & torch.isfinite(b)
        return bool(torch.equal(fin, torch.isfinite(a))) and bool(torch.allclose(a[fin], b[fin], rtol=1e-5, atol=1e-6))

    return not (same(Y[1:], Yb[1:]) and same(Y[:1], Yc[:1]))


class _Clock:
    """Accumulates wall time per phase into ``CaseResult.timings`` (the tool reports where time goes)."""

    def __init__(self, res: CaseResult) -> None:
        self.res = res
        self.t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.res.timings[phase] = self.res.timings.get(phase, 0.0) + now - self.t
        self.t = now


class _Lazy:
    """A value computed on first use (torch outputs are needed only to explain a violation)."""

    def __init__(self, fn: Callable[[], torch.Tensor]) -> None:
        self.fn = fn
        self.v: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.v is None:
            self.v = self.fn()
        return self.v


def _torch_values(model: nn.Module, P: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(P).double().reshape(P.shape[0], -1)


def _check_bounds(res: CaseResult, method: str, inset: Any, ref: str, V: torch.Tensor, lb: torch.Tensor,
                  ub: torch.Tensor, tol: float, scale: float, P: torch.Tensor, torch_vals: _Lazy | None) -> None:
    """Every reference value must lie in [lb - tol, ub + tol]; records the worst offender. Excesses
    within the tolerance are kept as ``worst_rel_excess`` (what a strict, zero-tolerance run sees)."""
    res.checks += V.numel()
    with torch.no_grad():
        # a NaN bound claims nothing (reported separately); inf outputs must be inside inf bounds;
        # NaN outputs cannot be bounded (and the loader refuses models that produce them)
        lbc = torch.where(torch.isnan(lb), float("-inf"), lb)
        ubc = torch.where(torch.isnan(ub), float("inf"), ub)
        hi = torch.nan_to_num(V - ubc, nan=0.0)  # > 0: above the upper bound; inf - finite = inf
        lo = torch.nan_to_num(lbc - V, nan=0.0)
    for side, E, bound in (("upper", hi, ub), ("lower", lo, lb)):
        worst = float(E.max())
        if worst > 0:
            res.worst_rel_excess = max(res.worst_rel_excess, worst / scale)
        if worst <= tol:
            continue
        idx = int(E.argmax())
        i, k = divmod(idx, V.shape[1])
        dist = float(_dist(inset, P[i: i + 1])[0])
        note = ""
        if torch_vals is not None and ref == "ort":
            tv = float(torch_vals.get()[i, k])
            inside = float(lb[k]) - tol <= tv <= float(ub[k]) + tol
            note = f"; torch f32 there {tv:.6g} ({'inside: an import/ORT mismatch' if inside else 'outside too'})"
        res.add(Violation("bound", method, inset.norm, ref, worst, float(bound[k]), float(V[i, k]),
                          f"{side} bound of output {k} at a point {dist:.4g} from x (tol {tol:.2g}){note}"))


def _check_milp(res: CaseResult, case: Case, bm: Any, inset: Any, cfg: Config) -> None:
    """Bounds against the exact extreme outputs over the L∞ box (scipy MILP on the torch net)."""
    from certonnx.bounds.milp import exact_min

    lo, hi = inset.lower[0].double().numpy().ravel(), inset.upper[0].double().numpy().ravel()
    K = case.milp_net[-1].out_features  # type: ignore[index]
    exact = []
    for k in range(K):
        c = np.zeros(K)
        c[k] = 1.0
        try:
            mn = exact_min(case.milp_net, lo, hi, c, time_limit=10.0)  # type: ignore[arg-type]
            mx = -exact_min(case.milp_net, lo, hi, -c, time_limit=10.0)  # type: ignore[arg-type]
        except (RuntimeError, ValueError) as e:
            res.flag(f"milp-skipped: {str(e)[:80]}")
            return
        exact.append((mn, mx))
    tol = cfg.rel_tol * (1.0 + max(max(abs(a), abs(b)) for a, b in exact))
    for method in _methods(cfg):
        ok, b = _engine_call(res, method, "linf", lambda method=method: bm.compute(inset, None, method,
                                                                                   alpha_steps=cfg.alpha_steps))
        if not ok:
            continue
        lb, ub = (t.detach().double().reshape(-1) for t in b)
        for k, (mn, mx) in enumerate(exact):
            res.checks += 2
            if float(lb[k]) > mn + tol:
                res.add(Violation("milp", method, "linf", "milp", float(lb[k]) - mn, float(lb[k]), mn,
                                  f"lower bound of output {k} above the exact minimum"))
            if float(ub[k]) < mx - tol:
                res.add(Violation("milp", method, "linf", "milp", mx - float(ub[k]), float(ub[k]), mx,
                                  f"upper bound of output {k} below the exact maximum"))


def _vec_norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d.norm(dim=1) if norm == "l2" else d.abs().amax(1)


def _check_lipschitz(res: CaseResult, case: Case, bm: Any, model: nn.Module, inset: Any, P: torch.Tensor,
                     r: dict[str, torch.Tensor], K: int, cfg: Config, ev: Evaluator, cache: dict[str, Any]) -> None:
    """The composed constant against ratios (ORT) and the Jacobian's operator norm."""
    from certonnx.bounds.lipschitz import node_constants

    norm = inset.norm
    if norm not in cache:  # once per norm, not per sample
        cache[norm] = _engine_call(res, "lipschitz", norm, lambda: node_constants(bm, norm))
    ok, consts = cache[norm]
    if ok:
        L = float(consts[bm.output_node])
        main_name = "ort" if "ort" in r else "torch"
        V = r[main_name]
        fin = V[torch.isfinite(V)]
        scale = 1.0 + (float(fin.abs().max()) if fin.numel() else 0.0)
        # pairs (centre, every point): ratio must not exceed L beyond float noise on the outputs
        x0 = inset.x[:1]
        _, v0 = ev.primary(x0)
        dX = (P - x0).flatten(1).double()
        dY = V - v0
        dn = _vec_norm(dX, norm)
        keep = (dn > 1e-6) & torch.isfinite(dY).all(1)  # inf outputs (overflow) have no ratio
        if keep.any():
            ratio = _vec_norm(dY[keep], norm) / dn[keep]
            slack = 2 * cfg.lip_rel_tol * scale / dn[keep]
            res.checks += int(keep.sum())
            exc = torch.nan_to_num(ratio - L * (1 + 1e-6) - slack, nan=float("inf"))
            if float(exc.max()) > 0:
                i = int(exc.argmax())
                res.add(Violation("lipschitz", "lipschitz", norm, main_name, float(ratio[i] - L), L, float(ratio[i]),
                                  f"||f(x') - f(x)|| / ||x' - x|| at distance {float(dn[keep][i]):.3g}"))
        # the Jacobian's operator norm at the centre and at one point of the set (a lower bound of
        # the true constant each); then onnxruntime pairs along the worst direction at two lengths
        for j, p in enumerate([x0, *P[torch.randperm(P.shape[0] - 1)[:1]].split(1)]):
            try:
                J = jacobian(model, p, K).double()
            except Exception:  # noqa: BLE001 - a graph autograd cannot differentiate: skip
                break
            if not torch.isfinite(J).all():
                break  # overflow (inf outputs): no finite gain to compare
            g = op_norm(J, norm)
            res.checks += 1
            if g > L * (1 + 1e-5) + 1e-6:
                res.add(Violation("jacobian", "lipschitz", norm, "jacobian", g - L, L, g,
                                  f"operator norm of the model's Jacobian at point {j}"))
            if g <= 0:
                continue
            if norm == "l2":
                v = torch.linalg.svd(J, full_matrices=False)[2][0]
            else:
                v = J[int(J.abs().sum(1).argmax())].sign()
            v = (v / max(float(_vec_norm(v.view(1, -1), norm)[0]), 1e-30)).view_as(p).float()
            Q = torch.cat([p, p + 1e-2 * v, p + 1e-1 * v], 0)
            _, vq = ev.primary(Q)
            for i in (1, 2):
                dn2 = float(_vec_norm((Q[i:i + 1] - p).flatten(1).double(), norm)[0])
                rat = float(_vec_norm(vq[i:i + 1] - vq[:1], norm)[0]) / dn2 if dn2 > 0 else float("nan")
                if not math.isfinite(rat):
                    continue
                res.checks += 1
                if rat > L * (1 + 1e-6) + 2 * cfg.lip_rel_tol * scale / dn2:
                    res.add(Violation("lipschitz", "lipschitz", norm, main_name + "-pair", rat - L, L, rat,
                                      f"pair along the Jacobian's worst direction, distance {dn2:.3g}"))


def _check_lipschitz_radius(res: CaseResult, bm: Any, model: nn.Module, inset: Any, ev: Evaluator, cfg: Config,
                            gen: torch.Generator) -> None:
    """The certificate itself: within :func:`certonnx.bounds.lipschitz.lipschitz_radius` of x the
    deployed model (onnxruntime) must predict the class the engine certified. PGD on every margin
    inside that ball, plus sphere points; a strictly larger other logit is a violation."""
    from certonnx.bounds import InputSet
    from certonnx.bounds.lipschitz import lipschitz_radius

    x0 = inset.x[:1]
    with torch.no_grad():
        y = model(x0).reshape(1, -1).argmax(1)
    ok, rad = _engine_call(res, "lip-radius", inset.norm, lambda: lipschitz_radius(bm, x0, y, inset.norm))
    if not ok:
        return
    r = float(rad.reshape(-1)[0])
    if not (r > 0 and math.isfinite(r)):
        return
    ball = InputSet(x0, r, inset.norm, None)
    k = int(y[0])

    def margins(z: torch.Tensor) -> torch.Tensor:
        out = model(z).reshape(z.shape[0], -1)
        return out[:, k:k + 1] - out

    K = int(model(x0).numel())
    others = torch.tensor([j for j in range(K) if j != k])[: cfg.pgd_outputs // 2]
    hist = pgd_points(margins, [ball], others[:3], max(3, cfg.pgd_steps // 5), gen)[0]
    P = torch.cat([hist, _gradient_points(margins, ball, K), sample_points(ball, 32, gen)], 0)
    _, V = ev.primary(P)
    m = V[:, k:k + 1] - V
    m[:, k] = float("inf")
    res.checks += P.shape[0]
    worst = float(torch.nan_to_num(m, nan=float("inf")).min())
    if worst < 0:
        i = int(m.min(1).values.argmin())
        res.add(Violation("lip-radius", "lipschitz", inset.norm, ev.primary(x0)[0], -worst, r,
                          float(_dist(ball, P[i:i + 1])[0]),
                          f"certified radius {r:.4g} around class {k}, but another logit is larger by {-worst:.3g} "
                          f"at a point {float(_dist(ball, P[i:i + 1])[0]):.4g} from x"))


def _check_op_lipschitz(res: CaseResult, bm: Any, inset: Any, norms: Sequence[str]) -> None:
    """Each op's constant (``Rule.lipschitz``) against the exact operator norm of its Jacobian, for
    every norm from the same Jacobians: at 0 for affine ops (exact: their linear map); for
    nonlinear ones also at a point of the reachable interval and, when they are not element-wise,
    at spike inputs (a max pool's worst case is one element winning every window it is in)."""
    from certonnx.bounds import Interval

    try:
        ctx = bm.ibp_pass(type(inset)(inset.x[:1], float(inset.eps[0]), "linf", None))
    except Exception:  # noqa: BLE001 - covered by the bound checks
        return
    gen = torch.Generator().manual_seed(1)
    for node in bm.pert:
        rule = bm.rules.get(node)
        if rule is None or getattr(rule, "shape_only", False) or len(getattr(rule, "pert", ())) != 1:
            continue
        try:
            vals = bm._resolve(rule, ctx.values)
            claimed = {n: rule.lipschitz(vals, n) for n in norms}
        except Exception:  # noqa: BLE001 - the rule's own business; the graph-level check covers it
            continue
        claimed = {n: float(c) for n, c in claimed.items() if c is not None}
        i = rule.pert[0]
        itv = vals[i]
        if not claimed or not isinstance(itv, Interval):
            continue
        in_shape = tuple(itv.lower.shape[1:])
        n_in = numel(in_shape)
        try:
            out0 = rule.call_with(vals, {i: torch.zeros(1, *in_shape)})
        except Exception:  # noqa: BLE001
            continue
        n_out = out0[0].numel()
        if n_in * n_out > 4_000_000 or n_out > 4096:
            continue

        def f(z: torch.Tensor, rule: Any = rule, vals: Any = vals, i: int = i) -> torch.Tensor:
            return rule.call_with(vals, {i: z})

        pts = [torch.zeros(1, *in_shape)]
        if not rule.affine:
            lo, hi = itv.lower[:1], itv.upper[:1]
            pts.append(lo + (hi - lo) * torch.rand(lo.shape, generator=gen))
            if n_in != n_out:  # not element-wise
                base = torch.rand(1, *in_shape, generator=gen)
                pos = range(n_in) if n_in <= 64 else torch.randint(0, n_in, (16,), generator=gen).tolist()
                for j in pos:
                    sp = base.clone().view(-1)
                    sp[j] = 100.0
                    pts.append(sp.view(1, *in_shape))
        measured = dict.fromkeys(claimed, 0.0)
        try:
            for p in pts:
                J = jacobian(f, p, n_out)
                if torch.isfinite(J).all():
                    for n in measured:
                        measured[n] = max(measured[n], op_norm(J, n))
        except Exception:  # noqa: BLE001 - batch-dependent constants in the op: skip the op
            continue
        for n, m in measured.items():
            res.op_gains.append((rule.label, n, claimed[n], m))
            res.checks += 1
            if m > claimed[n] * (1 + 1e-5) + 1e-6:
                res.add(Violation("op-lipschitz", rule.label, n, "exact-op", m - claimed[n], claimed[n], m,
                                  f"node {node.name!r} ({rule.describe()}): operator norm of its Jacobian"))


# ============================================================================================
# summaries
# ============================================================================================
@dataclass
class Summary:
    """Per-family counters for the offline tool's table."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    by_kind: dict[tuple[str, str, str], list[Any]] = field(default_factory=dict)

    def add(self, res: CaseResult) -> None:
        row = self.rows.setdefault(res.family, dict.fromkeys(
            ("cases", "ok", "violating", "crash", "export_rejected", "load_refused", "engine_refused",
             "torch_mode", "checks", "seconds", "within_tol", "max_rel_excess"), 0.0))
        row["cases"] += 1
        crash = any(v.check == "crash" for v in res.violations)
        row["violating"] += bool(res.violations) and not crash
        row["crash"] += crash
        row["ok"] += not res.violations
        row["export_rejected"] += any(f.startswith("export-rejected") for f in res.flags)
        row["load_refused"] += any(f.startswith("load-refused") for f in res.flags)
        row["engine_refused"] += res.refused
        row["torch_mode"] += res.mode == "torch"
        row["checks"] += res.checks
        row["seconds"] += res.seconds
        row["within_tol"] += 0.0 < res.worst_rel_excess and not res.violations
        row["max_rel_excess"] = max(row["max_rel_excess"], res.worst_rel_excess)
        seen: set[tuple[str, str, str]] = set()
        for v in res.violations:
            key = (res.family, v.check, v.reference)
            cur = self.by_kind.setdefault(key, [0, 0.0, res.case_id, set(), set()])
            if key not in seen:
                cur[0] += 1
                seen.add(key)
            cur[3].add(v.method)
            cur[4].add(v.norm)
            if v.excess > cur[1] or cur[1] != cur[1]:
                cur[1], cur[2] = v.excess, res.case_id

    def table(self) -> str:
        cols = ("cases", "ok", "violating", "crash", "export_rejected", "load_refused", "engine_refused", "torch_mode",
                "within_tol")
        short = {"export_rejected": "export-rej", "load_refused": "load-ref", "engine_refused": "refused",
                 "torch_mode": "torch-mode", "within_tol": "in-tol>0"}
        head = (f"{'family':18s}" + "".join(f"{short.get(c, c):>11s}" for c in cols)
                + f"{'max rel exc':>12s}{'checks':>12s}{'ms/case':>9s}")
        lines = [head, "-" * len(head)]
        tot = dict.fromkeys((*cols, "checks", "seconds"), 0.0)
        worst = 0.0
        for fam in sorted(self.rows):
            row = self.rows[fam]
            for c in tot:
                tot[c] += row[c]
            worst = max(worst, row["max_rel_excess"])
            lines.append(f"{fam:18s}" + "".join(f"{int(row[c]):11d}" for c in cols) + f"{row['max_rel_excess']:12.3g}"
                         + f"{int(row['checks']):12d}{1000 * row['seconds'] / max(row['cases'], 1):9.1f}")
        lines.append("-" * len(head))
        lines.append(f"{'total':18s}" + "".join(f"{int(tot[c]):11d}" for c in cols) + f"{worst:12.3g}"
                     + f"{int(tot['checks']):12d}{1000 * tot['seconds'] / max(tot['cases'], 1):9.1f}")
        lines.append("in-tol>0: cases whose outputs exceed a bound by less than the tolerance (seen by --rel-tol 0); "
                     "max rel exc: largest (value - bound) / (1 + max|output|)")
        if self.by_kind:
            lines.append("")
            lines.append("violations by family / check / reference: cases, worst excess, worst case, methods, norms")
            for (fam, chk, ref), (n, worst, cid, methods, norms) in sorted(self.by_kind.items()):
                lines.append(f"  {fam:18s} {chk:12s} {ref:10s} {n:6d}  {worst:10.4g}  {cid:24s} "
                             f"{','.join(sorted(methods))}  {','.join(sorted(norms))}")
        return "\n".join(lines)
