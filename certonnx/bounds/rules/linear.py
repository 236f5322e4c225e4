"""Affine layers with weights: Linear/Gemm, MatMul by a constant, Conv, BatchNorm (eval)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn import grad as nn_grad

from certonnx.bounds.core import AMat, Folded, Interval
from certonnx.bounds.rounding import U32, engine_gamma
from certonnx.bounds.rule import AffineLayer, BackwardResult, ChannelAffine, Value, register
from certonnx.bounds.rules.common import stack_A, sum_bias, unstack_A, window_multiplicity, with_rounding
from certonnx.errors import UnsupportedOpError


def _ball_radius(itv: Interval, rownorm: torch.Tensor, center_out: torch.Tensor) -> Interval | None:
    """Dual-norm bound of the first layer on a ball: ``W x0 + b ± eps ||W_row||_*`` with the
    dual norm ``rownorm`` of each output's row (L2 for an L2 ball, max |w| for an L1 ball)."""
    if itv.ball is None:
        return None
    _, eps, _ = itv.ball
    r = eps.view(-1, *([1] * (center_out.ndim - 1))) * rownorm
    return Interval.from_center(center_out, r)


def module_weights(m: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of a Linear/Conv module (bias ``None`` when it has none)."""
    assert m is not None
    w, b = m.weight, getattr(m, "bias", None)
    assert isinstance(w, torch.Tensor) and (b is None or isinstance(b, torch.Tensor))
    return w, b


class _WeightedRule(AffineLayer):
    """Shared IBP for affine layers: centre through the layer, radius through |W|."""

    def abs_weight(self, w: torch.Tensor) -> torch.Tensor:
        """|W|, recomputed on every call. A cache keyed on the tensor's version counter went
        stale when weights were changed through ``.data`` (which has a version counter of its
        own: ``w.data.copy_(...)``, ``dist.broadcast(w.data)``), giving bounds of the old
        weights; |W| costs one pass over the weights, little beside the product it feeds."""
        return w.abs()

    def weight_bias(self, vals: Sequence[Value]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def rownorm(self, w: torch.Tensor) -> torch.Tensor:
        """L2 norm of each output's row of weights (the dual norm of an L2 ball)."""
        raise NotImplementedError

    def rowmax(self, w: torch.Tensor) -> torch.Tensor:
        """Largest |weight| of each output's row (the dual norm of an L1 ball), shaped like
        :meth:`rownorm`."""
        raise NotImplementedError

    def ball_dual(self, w: torch.Tensor, norm: str, in_shape: Sequence[int]) -> torch.Tensor:
        """Per output, the dual norm of its row of weights for a ``norm`` ball (inputs of one
        sample of shape ``in_shape``), broadcastable against the output: :meth:`rowmax` for L1,
        :meth:`rownorm` for L2."""
        return self.rowmax(w) if norm == "l1" else self.rownorm(w)

    def per_output(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per output channel) shaped to broadcast against ``w``: outputs are
        ``w``'s first axis for Linear/Conv."""
        return v.view(-1, *([1] * (w.ndim - 1)))

    def check(self, gm: fx.GraphModule) -> None:
        if len(self.pert) != 1 or self.pert[0] != 0:
            raise UnsupportedOpError(self.label, self.node.name, "weights must not depend on the input")

    def fused_weight_bias(self, vals: Sequence[Value], scale: torch.Tensor, shift: torch.Tensor,
                          shift_mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights and bias of this layer followed by a per-output-channel affine map (an eval-mode
        BatchNorm): ``W' = s ⊙ W``, ``b' = s ⊙ b + t``, and the bias *magnitude*
        ``|s|·|b| + |β| + |μ s|`` for the rounding error (``b'`` may cancel to ~0 while the ops,
        run separately, round ``s·b``, ``μ·s`` and ``β``). IBP then spends no element-wise passes on the
        BatchNorm. Not cached, for the reason given in :meth:`abs_weight`."""
        w, b = self.weight_bias(vals)
        wf = w * self.per_output(scale, w)
        bf = shift if b is None else b * scale + shift
        bmag = shift_mag if b is None else (b * scale).abs() + shift_mag
        return wf, bf, bmag

    def fan_in(self, vals: Sequence[Value]) -> int:
        w, _ = self.weight_bias(vals)
        return self.terms(w) + 1

    def terms(self, w: torch.Tensor) -> int:
        """Products summed into one output (the contraction length)."""
        return int(w[0].numel())

    def _err(self, m_out: torch.Tensor, bmag: torch.Tensor | None) -> torch.Tensor:
        """Rounding bound ``γ (|W| m + |b|) + tiny`` from ``m_out = |W| m``."""
        e = m_out if bmag is None else m_out + self.bias_view(bmag, m_out)
        return e * self.gamma + self.tiny

    def bias_view(self, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-output bias shaped to broadcast against an output tensor ``like``."""
        return b

    def patch_norm(self, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """L2 norm of the inputs each output reads, broadcastable against the output (for a
        dense layer: the whole last axis)."""
        return m.norm(dim=-1, keepdim=True)

    def rounding(self, itv: Interval, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Per output element: how far the float32 result (the model's, and the engine's own)
        can be from the exact ``W x + b`` for any ``x`` in ``itv``. Cached per input interval."""
        c = self._round_cache
        if c is not None and c[0] is itv and c[1] is w:
            return c[2]
        m = itv.center.abs() + itv.radius
        err = self._err(self.apply(m, self.abs_weight(w), None), b.abs() if b is not None else None)
        self._round_cache = (itv, w, err)
        return err

    _round_cache: tuple[Interval, torch.Tensor, torch.Tensor] | None = None

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor:
        w, b = self.weight_bias(vals)
        return self.rounding(vals[0], w, b)

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        w, _ = self.weight_bias(vals)
        return self.apply(errs[0], self.abs_weight(w), None)

    def ibp(self, vals: Sequence[Value], wb: tuple[torch.Tensor, torch.Tensor | None] | None = None,
            bmag: torch.Tensor | None = None) -> Interval:
        itv: Interval = vals[0]
        w, b = self.weight_bias(vals) if wb is None else wb
        if bmag is None and b is not None:
            bmag = b.abs()
        c = self.apply(itv.center, w, b)
        aw = self.abs_weight(w)
        if torch.is_grad_enabled() and w.requires_grad:
            # training: |W| m ≤ ‖W_row‖₂ ‖m_patch‖₂ (Cauchy–Schwarz) costs no second product;
            # the allowance is a little larger, and still sound
            r = self.apply(itv.radius, aw, None)
            with torch.no_grad():
                m_out = self.rownorm(w.detach()) * self.patch_norm((itv.center.abs() + itv.radius).detach(), w)
        else:
            # radius and magnitude through |W| in one call: (r, |c| + r) stacked on the batch axis
            n = itv.radius.shape[0]
            both = self.apply(torch.cat([itv.radius, itv.center.abs() + itv.radius]), aw, None)
            r, m_out = both[:n], both[n:]
        err = self._err(m_out, bmag)
        self._round_cache = (itv, w, err) if wb is None else None
        out = Interval.from_center(c, r + err)
        if itv.ball is not None:
            center, _, norm = itv.ball
            c_ball = self.apply(center, w, b)
            ball = _ball_radius(itv, self.ball_dual(w, norm, tuple(center.shape[1:])), c_ball)
            if ball is not None:
                out = out.intersect(ball.widen(err))
                out.ball = None
        return out


@register
class LinearRule(_WeightedRule):
    """``y = x Wᵀ + b`` (nn.Linear, F.linear; ONNX Gemm after conversion)."""

    label = "Linear"
    dense = True
    module_types = (nn.Linear,)
    functions = (F.linear,)

    def weight_bias(self, vals: Sequence[Value]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.module is not None:
            return module_weights(self.module)
        return vals[1], (vals[2] if len(vals) > 2 else None)

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def rownorm(self, w: torch.Tensor) -> torch.Tensor:
        return w.norm(dim=1)

    def rowmax(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax(dim=1)

    def dense_matrix(self, vals: Sequence[Value]) -> torch.Tensor:
        return self.weight_bias(vals)[0]

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        w, b = self.weight_bias(vals)
        A, sizes = stack_A(lA, uA)
        nA = A.matmul(w)
        bias = sum_bias(A, b) if b is not None else torch.zeros(A.shape[:2], device=A.device, dtype=A.dtype)
        nl, nu = unstack_A(nA, sizes, lA, uA)
        bl, bu = unstack_A(bias, sizes, lA, uA)
        bl_, bu_ = with_rounding(bl if bl is not None else 0.0, bu if bu is not None else 0.0, lA, uA,
                                 self.rounding(vals[0], w, b))
        return [(nl, nu)], bl_, bu_

    def backward_rows(self, idx: torch.Tensor, sign: torch.Tensor, lower: bool, upper: bool,
                      vals: Sequence[Value], batch: int) -> BackwardResult | None:
        w, b = self.weight_bias(vals)
        if w.ndim != 2 or len(self.in_shapes[0]) != 1 or len(self.out_shape) != 1:
            return None
        sg = sign.to(w.dtype)
        if idx.ndim == 2:  # per-sample rows (B, K)
            A = sg[..., None] * w[idx]
            bias = sg * b[idx] if b is not None else torch.zeros(idx.shape, device=w.device, dtype=w.dtype)
            e = self.rounding(vals[0], w, b).detach().expand(batch, -1).gather(1, idx)
        else:
            A = (sg[:, None] * w[idx]).unsqueeze(0).expand(batch, -1, -1)
            bias = (sg * b[idx]).unsqueeze(0).expand(batch, -1) if b is not None else \
                torch.zeros(batch, idx.numel(), device=w.device, dtype=w.dtype)
            # |row| · err of a one-hot row is the selected neuron's error (rounding_term's value)
            e = self.rounding(vals[0], w, b)[:, idx].detach()
        return [(A if lower else None, A if upper else None)], (bias - e if lower else 0.0), \
            (bias + e if upper else 0.0)

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        w, _ = self.weight_bias(vals)
        w = w.detach().double()
        if norm == "l2":
            return float(torch.linalg.matrix_norm(w, 2))  # exact: largest singular value
        return float(w.abs().sum(1).max())  # induced L∞ norm: max row sum


@register
class MatMulRule(_WeightedRule):
    """``y = x @ W`` with constant ``W`` (ONNX MatMul by an initializer)."""

    label = "MatMul"
    dense = True
    onnx2torch_names = ("OnnxMatMul",)
    functions = (torch.matmul, operator.matmul)

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)

    def weight_bias(self, vals: Sequence[Value]) -> tuple[torch.Tensor, None]:
        w = vals[1]
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise UnsupportedOpError(self.label, self.node.name, "only a constant 2-D right operand is supported")
        return w, None

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        # b is None for the op itself, but a folded BatchNorm (fused_weight_bias) brings a shift
        return x.matmul(w) if b is None else x.matmul(w) + b

    def rownorm(self, w: torch.Tensor) -> torch.Tensor:
        return w.norm(dim=0)

    def rowmax(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax(dim=0)

    def dense_matrix(self, vals: Sequence[Value]) -> torch.Tensor:
        return self.weight_bias(vals)[0].t()  # x @ W: W's columns are the outputs

    def ball_dual(self, w: torch.Tensor, norm: str, in_shape: Sequence[int]) -> torch.Tensor:
        """Per output, the dual norm of its row of weights for a ``norm`` ball (inputs of one
        sample of shape ``in_shape``), broadcastable against the output: :meth:`rowmax` for L1,
        :meth:`rownorm` for L2."""
        return self.rowmax(w) if norm == "l1" else self.rownorm(w)

    def per_output(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1)  # x @ W: outputs are W's columns

    def terms(self, w: torch.Tensor) -> int:
        return int(w.shape[0])

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        w, _ = self.weight_bias(vals)
        A, sizes = stack_A(lA, uA)
        nl, nu = unstack_A(A.matmul(w.t()), sizes, lA, uA)
        bl, bu = with_rounding(0.0, 0.0, lA, uA, self.rounding(vals[0], w, None))
        return [(nl, nu)], bl, bu

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        w, _ = self.weight_bias(vals)
        w = w.detach().double()
        return float(torch.linalg.matrix_norm(w, 2)) if norm == "l2" else float(w.abs().sum(0).max())


_CONV_INPUT_GRAD = {1: nn_grad.conv1d_input, 2: nn_grad.conv2d_input, 3: nn_grad.conv3d_input}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# a 2-D kernel with at most this many taps per output channel (C_in·k_h·k_w; a first layer on
# 1- or 3-channel images) is transposed as a matmul and a fold on CPU
FOLD_TAPS = 32


def conv_input_grad(in_shape: Sequence[int], w: torch.Tensor, A: torch.Tensor, stride: tuple, pad: tuple,
                    dil: tuple, groups: int) -> torch.Tensor:
    """``A`` (N, C_out, *out) pulled back through the convolution: the transposed convolution,
    (N, *in_shape). The same sums in another order, chosen for speed on CPU, where a bound
    pass pulls back tens of thousands of rows at once (measured, tools/bench/conv_backward.py):
    a kernel with few taps (C_in·k ≤ :data:`FOLD_TAPS`) as ``Wᵀ·A`` and a fold (2–7×: the
    transposed convolution spends its time on a single output channel), any other 2-D one as
    a transposed convolution in channels-last layout (1.1–3× with glibc's default
    allocator, about 1× once :mod:`certonnx.allocator` has tuned it). Elsewhere (CUDA, 1-D, 3-D,
    groups) autograd's own convolution backward."""
    nd = w.ndim - 2
    if A.device.type != "cpu" or nd != 2 or groups != 1:
        return _CONV_INPUT_GRAD[nd]((A.shape[0], *in_shape), w, A, stride, pad, dil, groups)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    if int(w.shape[1]) * kh * kw <= FOLD_TAPS:
        cols = torch.matmul(w.reshape(w.shape[0], -1).t(), A.flatten(2))  # (N, C_in·k_h·k_w, L)
        return F.fold(cols, tuple(in_shape[-2:]), (kh, kw), dilation=dil, padding=pad, stride=stride)
    out_pad = tuple(int(in_shape[1 + i]) - ((int(A.shape[2 + i]) - 1) * stride[i] - 2 * pad[i]
                                             + dil[i] * (int(w.shape[2 + i]) - 1) + 1) for i in range(2))
    out = F.conv_transpose2d(A.contiguous(memory_format=torch.channels_last), w, None, stride, pad, out_pad, 1,
                             dil)
    return out.contiguous()


@register
class ConvRule(_WeightedRule):
    """N-d convolution with zero padding; the CROWN step is the transposed convolution."""

    label = "Conv"
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def absorbs_channel_map(self) -> bool:
        return True  # axis 1 of a (B, C, *spatial) output is the output channel

    def check(self, gm: fx.GraphModule) -> None:
        super().check(gm)
        m = self.module
        assert isinstance(m, nn.modules.conv._ConvNd)
        if m.padding_mode != "zeros":
            raise UnsupportedOpError(self.label, self.node.name, f"padding_mode={m.padding_mode!r}")
        if isinstance(m.padding, str) and m.padding != "valid":
            raise UnsupportedOpError(self.label, self.node.name, f"padding={m.padding!r}")

    def _params(self) -> tuple[int, tuple, tuple, tuple, int]:
        m = self.module
        assert isinstance(m, nn.modules.conv._ConvNd)
        pad = (0,) * len(m.kernel_size) if isinstance(m.padding, str) else m.padding
        return len(m.kernel_size), m.stride, pad, m.dilation, m.groups

    def weight_bias(self, vals: Sequence[Value]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return module_weights(self.module)

    def apply(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        nd, stride, pad, dil, groups = self._params()
        return _CONV_FN[nd](x, w, b, stride, pad, dil, groups)

    def rownorm(self, w: torch.Tensor) -> torch.Tensor:
        # norm of the whole kernel: an upper bound of each output's row norm (border rows are
        # cut by the padding), hence a sound L2 radius
        nd = w.ndim - 2
        return w.flatten(1).norm(dim=1).view(-1, *([1] * nd))

    def rowmax(self, w: torch.Tensor) -> torch.Tensor:
        # the largest |weight| of the whole kernel: each output's row holds a subset of it
        return w.flatten(1).abs().amax(dim=1).view(-1, *([1] * (w.ndim - 2)))

    def ball_dual(self, w: torch.Tensor, norm: str, in_shape: Sequence[int]) -> torch.Tensor:
        """For L2, each output position's own row norm: the kernel taps that fall into the
        zero padding are not part of a border output's row, so ``sqrt(conv(1, W²))`` over an
        all-ones input is the exact per-position norm (widened by the rounding of its sum of
        squares, a sum of non-negative terms). L1 keeps the whole kernel's largest |w|."""
        if norm != "l2":
            return super().ball_dual(w, norm, in_shape)
        nd, stride, pad, dil, groups = self._params()
        ones = torch.ones((1, *in_shape), dtype=w.dtype, device=w.device)
        sq = _CONV_FN[nd](ones, w * w, None, stride, pad, dil, groups)
        k = int(w[0].numel())
        return (sq.clamp_min(0) * (1 + engine_gamma(k))).sqrt() * (1 + 2 * U32)

    def ball_bound_exact(self, norm: str) -> bool:
        return norm == "l2"

    def bias_view(self, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return b.view(-1, *([1] * (like.ndim - 2)))

    def patch_norm(self, m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # each output reads one patch of its group's channels; the patch over all channels
        # (a one-channel convolution of m² with ones) is at least as large
        nd, stride, pad, dil, _ = self._params()
        ones = torch.ones((1, m.shape[1], *w.shape[2:]), dtype=m.dtype, device=m.device)
        return _CONV_FN[nd](m * m, ones, None, stride, pad, dil, 1).clamp_min(0).sqrt()

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        nd, stride, pad, dil, groups = self._params()
        w, b = self.weight_bias(vals)
        A, sizes = stack_A(lA, uA)
        B, S = A.shape[:2]
        flat = A.reshape(B * S, *A.shape[2:])
        nA = conv_input_grad(self.in_shapes[0], w, flat, stride, pad, dil, groups)
        nA = nA.reshape(B, S, *self.in_shapes[0])
        if b is not None:
            bias = (A.flatten(3).sum(3) * b).sum(2)
        else:
            bias = torch.zeros(A.shape[:2], device=A.device, dtype=A.dtype)
        nl, nu = unstack_A(nA, sizes, lA, uA)
        bl, bu = unstack_A(bias, sizes, lA, uA)
        bl_, bu_ = with_rounding(bl if bl is not None else 0.0, bu if bu is not None else 0.0, lA, uA,
                                 self.rounding(vals[0], w, b))
        return [(nl, nu)], bl_, bu_

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        nd, stride, pad, dil, groups = self._params()
        w, _ = self.weight_bias(vals)
        w = w.detach().double()
        if norm != "l2":
            return float(w.flatten(1).abs().sum(1).max())  # each output's row sum, padding only cuts it
        # conv = W_mat ∘ unfold; ||unfold x||² = Σ_p mult(p)·x_p² with mult(p) the patches that
        # contain element p, so ||unfold||_2 <= sqrt(max mult): at most ceil(k / (s/gcd(s, d)))
        # taps per axis (common.window_multiplicity, dilation included). With groups, W_mat is
        # block diagonal, so its norm is the largest block's.
        mult = window_multiplicity(w.shape[2:], stride, dil)
        co = w.shape[0] // groups
        blocks = [torch.linalg.matrix_norm(w[g * co:(g + 1) * co].flatten(1), 2) for g in range(groups)]
        return float(max(blocks)) * math.sqrt(mult)


@register
class BatchNormRule(ChannelAffine):
    """BatchNorm as a per-channel affine map.

    In eval mode it uses the running statistics. In training mode the statistics of the clean
    batch are used (``observe`` is called by the engine with the clean input first), as
    certified training requires: the bound pass must not see statistics of perturbed data.
    """

    label = "BatchNorm"
    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    onnx2torch_names = ("OnnxBatchNorm",)

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def needs_clean(self) -> bool:
        return bool(self.module is not None and self.module.training)

    def check(self, gm: fx.GraphModule) -> None:
        if self.pert != [0]:
            raise UnsupportedOpError(self.label, self.node.name, "statistics must not depend on the input")
        m = self.module
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            # it would normalise each bound pass with the statistics of perturbed data
            raise UnsupportedOpError(self.label, self.node.name, "no running statistics (track_running_stats=False)")

    def observe(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.ndim))
        self.batch_stats = (x.mean(dims), x.var(dims, unbiased=False))

    def scale_shift(self, vals: Sequence[Value]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            w = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
            b = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
            eps = m.eps
            if m.training and self.batch_stats is not None:
                mean, var = self.batch_stats
            else:
                assert m.running_mean is not None and m.running_var is not None  # refused by check()
                mean, var = m.running_mean, m.running_var
        else:  # OnnxBatchNorm(x, weight, bias, running_mean, running_var)
            w, b, mean, var = vals[1], vals[2], vals[3], vals[4]
            eps = float(getattr(m, "epsilon"))  # noqa: B009 - OnnxBatchNorm's attribute
        scale = w / torch.sqrt(var + eps)
        shift = b - mean * scale
        self._shift_mag = (b.abs() + (mean * scale).abs()).detach()
        return scale, shift

    _shift_mag: torch.Tensor | None = None

    def shift_magnitude(self, vals: Sequence[Value]) -> torch.Tensor:
        """``|β| + |μ·s|``: the magnitude behind the shift ``t = β − μ·s``. Engines compute
        ``(x − μ)·s + β`` (or fold it), so their rounding scales with these terms, which can be
        far larger than ``|t|`` when ``β ≈ μ·s``."""
        self.scale_shift(vals)
        assert self._shift_mag is not None
        return self._shift_mag

    def _shape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return t.view(-1, *([1] * (ndim - 2)))

    def fan_in(self, vals: Sequence[Value]) -> int:
        # x·s + t, with s = w / sqrt(var + eps) and t = b − mean·s computed by the engine too
        return 6

    def rounding(self, itv: Interval | Folded, s: torch.Tensor, t: torch.Tensor, tmag: torch.Tensor) -> torch.Tensor:
        """``γ (|s| max|x| + |β| + |μ s|) + tiny`` per element (``tmag`` = ``|β| + |μ s|``, shaped
        like ``t``): the float error of ``(x − μ)·s + β`` however it is evaluated. When IBP
        folded the layer before into this one, only the output ``y = s·x + t`` is bounded; then
        ``|s·x| ≤ |y| + |t|`` gives the same bound from it."""
        if isinstance(itv, Folded):
            mag = itv.output.center.abs() + itv.output.radius + t.abs() + tmag
        else:
            mag = (itv.center.abs() + itv.radius) * s.abs() + tmag
        return mag * self.gamma + self.tiny

    def forward_error(self, vals: Sequence[Value]) -> torch.Tensor:
        scale, shift = self.scale_shift(vals)
        nd = vals[0].lower.ndim
        tmag = self._shape(self.shift_magnitude(vals), nd)
        return self.rounding(vals[0], self._shape(scale, nd), self._shape(shift, nd), tmag)

    def propagate_error(self, vals: Sequence[Value], errs: Sequence[torch.Tensor]) -> torch.Tensor:
        scale, _ = self.scale_shift(vals)
        return errs[0] * self._shape(scale, errs[0].ndim).abs()

    def ibp(self, vals: Sequence[Value]) -> Interval:
        itv: Interval = vals[0]
        scale, shift = self.scale_shift(vals)
        nd = itv.lower.ndim
        s, t = self._shape(scale, nd), self._shape(shift, nd)
        tmag = self._shape(self.shift_magnitude(vals), nd)
        return Interval.from_center(itv.center * s + t, itv.radius * s.abs() + self.rounding(itv, s, t, tmag))

    def backward(self, lA: AMat, uA: AMat, vals: Sequence[Value],
                 alpha: torch.Tensor | None = None) -> BackwardResult:
        scale, shift = self.scale_shift(vals)
        A, sizes = stack_A(lA, uA)
        nd = A.ndim - 1  # as a (B, C, ...) tensor
        s, t = self._shape(scale, nd), self._shape(shift, nd)
        nA = A * s
        bias = sum_bias(A, t)
        nl, nu = unstack_A(nA, sizes, lA, uA)
        bl, bu = unstack_A(bias, sizes, lA, uA)
        tmag = self._shape(self.shift_magnitude(vals), nd)
        bl_, bu_ = with_rounding(bl if bl is not None else 0.0, bu if bu is not None else 0.0, lA, uA,
                                 self.rounding(vals[0], s, t, tmag))
        return [(nl, nu)], bl_, bu_

    def lipschitz(self, vals: Sequence[Value], norm: str) -> float:
        scale, _ = self.scale_shift(vals)
        return float(scale.detach().abs().max())
