"""Input normalization: find it inside the graph, or prepend one declared by the user.

ε is always measured in raw input space (pixels in [0, 1]). Two cases:

* the ONNX graph starts with an affine normalization (``Sub`` then ``Div`` by constants, or
  ``Mul``/``Add``, per channel or scalar, before or after a channels-last model's ``Transpose``):
  the model already takes pixels; we only *report* it (``Normalization(inside=True)``) so that
  users know what ε means, and keep its constants frozen;
* the model expects normalized input and the user declares ``--mean/--std``: we prepend
  ``(x - mean) / std`` to the torch graph (:func:`prepend_normalization`) so that the certified
  model, and the exported one, take pixels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from certonnx.errors import CertonnxError
from certonnx.graph.model import CertModel, Normalization

AFFINE_OPS = ("Sub", "Add", "Mul", "Div")


@dataclass
class FoundNormalization:
    """Result of :func:`detect_normalization`: the normalization and where it lives."""

    normalization: Normalization
    nodes: list[str] = field(default_factory=list)  # ONNX node names (or first outputs)
    constants: list[str] = field(default_factory=list)  # initializer names to keep frozen

    @property
    def is_identity(self) -> bool:
        return all(m == 0.0 for m in self.normalization.mean) and all(s == 1.0 for s in self.normalization.std)


def _axis_vector(c: np.ndarray, shape: Sequence[int | None]) -> tuple[int | None, np.ndarray] | None:
    """A constant broadcast against a tensor of ``shape`` (batch first): ``(None, [v])`` for a
    scalar, ``(axis, vector)`` when it varies along exactly one non-batch axis whose length it
    has; None for any other broadcast pattern."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return None, c.reshape(1)
    rank = len(shape)
    if c.ndim > rank:
        return None
    b = (1,) * (rank - c.ndim) + tuple(c.shape)
    varying = [k for k, d in enumerate(b) if d != 1]
    if len(varying) != 1 or varying[0] == 0 or shape[varying[0]] != b[varying[0]]:
        return None
    return varying[0], c.reshape(-1)


def detect_normalization(model: onnx.ModelProto) -> FoundNormalization | None:
    """Find ``x -> (Sub|Add|Mul|Div const | Transpose)+`` right after the single input.

    The affine steps are composed into ``y = a * x + b`` (per channel); it is a normalization
    with ``mean = -b / a`` and ``std = 1 / a`` when ``a > 0``. The input must feed only this
    chain (otherwise the raw input is used elsewhere and this is not "a normalization in front").

    Per-channel constants run along axis 1 of the tensor they act on (the channel axis of ONNX
    convolutions), which after a ``Transpose`` that keeps the batch first is another axis of the
    input: a channels-last model (Keras, tf2onnx) transposes ``(N, H, W, C)`` to ``(N, C, H, W)``
    and normalizes there, or normalizes ``(N, H, W, C)`` along its last axis before the
    transpose (accepted when the input looks channels-last, :func:`certonnx.layout.looks_channels_last`).
    All constants must run along the same input axis, reported as ``Normalization.axis`` when it
    is not 1.
    """
    from certonnx.layout import looks_channels_last

    inits = {t.name: t for t in model.graph.initializer}
    names = {i.name for i in model.graph.input} - set(inits)
    if len(names) != 1:
        return None
    (inp,) = [i for i in model.graph.input if i.name in names]
    dims = inp.type.tensor_type.shape.dim
    rank = len(dims)
    if rank == 0:
        return None
    in_shape: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    sample = [d for d in in_shape[1:] if d is not None]
    channels_last = rank == 4 and len(sample) == 3 and looks_channels_last(sample)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in set(n.input):
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}

    a = np.ones(1)
    b = np.zeros(1)
    perm = list(range(rank))  # axis k of the current tensor is input axis perm[k]
    in_axis: int | None = None  # the input axis the per-channel constants run along
    cur = inp.name
    nodes: list[str] = []
    consts: list[str] = []
    while True:
        users = consumers.get(cur, [])
        if len(users) != 1 or cur in outputs:
            break
        n = users[0]
        if n.domain not in ("", "ai.onnx"):
            break
        if n.op_type == "Transpose" and len(n.input) == 1:
            p = next((list(at.ints) for at in n.attribute if at.name == "perm"), list(range(rank))[::-1])
            if sorted(p) != list(range(rank)) or p[0] != 0:
                break  # the batch must stay first
            perm = [perm[k] for k in p]
            cur = n.output[0]
            continue
        if n.op_type not in AFFINE_OPS or len(n.input) != 2:
            break
        if n.input[0] == cur and n.input[1] in inits:
            cname = n.input[1]
        elif n.input[1] == cur and n.input[0] in inits and n.op_type in ("Add", "Mul"):
            cname = n.input[0]  # commutative
        else:
            break
        found = _axis_vector(numpy_helper.to_array(inits[cname]), [in_shape[k] for k in perm])
        if found is None or not np.all(np.isfinite(found[1])):
            break
        axis, vec = found
        if axis is not None:
            ia = perm[axis]
            if not (axis == 1 or (channels_last and ia == rank - 1)) or in_axis not in (None, ia):
                break
            in_axis = ia
        if n.op_type == "Sub":
            b = b - vec
        elif n.op_type == "Add":
            b = b + vec
        elif n.op_type == "Mul":
            a, b = a * vec, b * vec
        else:
            if np.any(vec == 0):
                break
            a, b = a / vec, b / vec
        nodes.append(n.name or n.output[0])
        consts.append(cname)
        cur = n.output[0]
    if not nodes:
        return None
    n_out = max(a.size, b.size)
    a = np.broadcast_to(a, (n_out,))
    b = np.broadcast_to(b, (n_out,))
    if np.any(a <= 0):
        return None
    mean = (-b / a).astype(np.float32) + np.float32(0.0)  # no -0.0 in reports
    std = (1.0 / a).astype(np.float32)
    # float32 round trip keeps reports readable (0.1307 stays 0.1307)
    norm = Normalization(mean=[float(f"{m:.7g}") for m in mean], std=[float(f"{s:.7g}") for s in std], inside=True,
                         axis=in_axis if in_axis not in (None, 1) else None)
    return FoundNormalization(norm, nodes, consts)


def prepend_normalization(model: CertModel, mean: Sequence[float] | float, std: Sequence[float] | float) -> CertModel:
    """Return a copy of ``model`` that takes raw inputs: ``(x - mean) / std`` goes in front.

    Used for ``--mean/--std`` when the ONNX file expects normalized input. ``mean``/``std`` are
    scalars or one value per channel: of axis 1, or of the last axis of a channels-last
    ``(N, H, W, C)`` input (:func:`certonnx.layout.looks_channels_last`) whose axis 1 does not
    fit. The constants are buffers (not trained).
    """
    from certonnx.layout import looks_channels_last

    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if torch.any(std_t <= 0):
        raise CertonnxError("--std values must be positive")
    sample = model.sample_shape
    n = max(mean_t.numel(), std_t.numel())
    axis = 1  # of the input, batch first
    if n > 1:
        last = len(sample) == 3 and looks_channels_last(sample)
        if last and sample[0] != n and sample[-1] == n:
            axis = len(sample)
        elif not sample or sample[0] != n:
            also = f" or {sample[-1]} (last axis)" if last else ""
            raise CertonnxError(f"--mean/--std have {n} values but the input has {sample[0] if sample else 0} "
                                f"channels (axis 1){also}")
        if mean_t.numel() not in (1, n) or std_t.numel() not in (1, n):
            raise CertonnxError("--mean and --std must have the same number of values (or one)")
    view = tuple(n if k == axis - 1 else 1 for k in range(len(sample))) if n > 1 else ()
    mean_b = mean_t.expand(n).reshape(view).clone()
    std_b = std_t.expand(n).reshape(view).clone()

    gm = copy.deepcopy(model.module)
    gm.register_buffer("certonnx_norm_mean", mean_b)
    gm.register_buffer("certonnx_norm_std", std_b)
    g = gm.graph
    placeholders = [nd for nd in g.nodes if nd.op == "placeholder"]
    x = placeholders[0]
    users = list(x.users)
    with g.inserting_after(x):
        m_node = g.get_attr("certonnx_norm_mean")
    with g.inserting_after(m_node):
        s_node = g.get_attr("certonnx_norm_std")
    with g.inserting_after(s_node):
        sub = g.call_function(torch.sub, (x, m_node))
    with g.inserting_after(sub):
        div = g.call_function(torch.div, (sub, s_node))
    for u in users:
        u.replace_input_with(x, div)
    g.lint()
    gm.recompile()
    # the values as the user wrote them (0.1307, not its float32 0.13070000708103180) in reports
    mean_l = [float(v) for v in np.atleast_1d(np.asarray(mean, dtype=np.float64))]
    std_l = [float(v) for v in np.atleast_1d(np.asarray(std, dtype=np.float64))]
    norm = Normalization(mean=mean_l * (n // len(mean_l)), std=std_l * (n // len(std_l)), inside=False,
                         axis=axis if axis != 1 else None)
    assert isinstance(gm, fx.GraphModule)
    return replace(model, module=gm, normalization=norm)


#: the normalizations models are usually trained with, by dataset: ``(name, mean, std)``
USUAL_NORMALIZATIONS = {
    "MNIST": ([0.1307], [0.3081]),
    "CIFAR-10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}
#: the hint needs normalized inputs to score this much more (absolute) and halve the error rate
HINT_GAIN = 0.2
HINT_SAMPLES = 256


def usual_normalization(sample_shape: Sequence[int]) -> tuple[str, list[float], list[float]] | None:
    """The dataset a per-sample input shape suggests, with its usual mean/std, in the form
    ``--mean/--std`` take: MNIST for 784 values, CIFAR-10 for ``(3, 32, 32)`` or channels-last
    ``(32, 32, 3)``; None otherwise."""
    shape = tuple(int(d) for d in sample_shape)
    size = int(np.prod(shape)) if shape else 1
    if size == 784:  # (1, 28, 28), (28, 28, 1), (784,): a scalar mean/std fits any of them
        name = "MNIST"
    elif shape in ((3, 32, 32), (32, 32, 3)):
        name = "CIFAR-10"
    else:
        return None
    mean, std = USUAL_NORMALIZATIONS[name]
    return name, list(mean), list(std)


def normalization_hint(model: CertModel, x: torch.Tensor, y: torch.Tensor, *, n: int = HINT_SAMPLES,
                       batch_size: int = 128) -> dict[str, object] | None:
    """When no normalization is known (none in the graph, none declared) and the input shape
    suggests a dataset, compare clean accuracy on up to ``n`` samples (spread over ``x``) as
    given and with that dataset's usual normalization prepended. Models trained on normalized
    input score far worse on raw pixels, and certifying them so gives meaningless numbers; so
    when normalizing gains :data:`HINT_GAIN` or more and halves the error rate, returns
    ``{"dataset", "mean", "std", "accuracy_raw", "accuracy_normalized", "samples", "message"}``
    with the flags to pass; None otherwise."""
    if model.normalization is not None or x.shape[0] == 0:
        return None
    guess = usual_normalization(model.sample_shape)
    if guess is None:
        return None
    name, mean, std = guess
    k = min(int(n), int(x.shape[0]))
    idx = torch.as_tensor(np.unique(np.linspace(0, x.shape[0] - 1, k).round().astype(np.int64)))
    xs, ys = x[idx], y[idx]
    try:
        normed = prepend_normalization(model, mean, std)
    except CertonnxError:
        return None

    def accuracy(m: torch.nn.Module) -> float:
        dev = next((t.device for t in (*m.parameters(), *m.buffers())), torch.device("cpu"))
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                pred = torch.cat([m(xs[i:i + batch_size].to(dev)).flatten(1).argmax(1).cpu()
                                  for i in range(0, xs.shape[0], batch_size)])
        finally:
            m.train(was)
        return float((pred == ys.cpu()).double().mean())

    raw, norm = accuracy(model.module), accuracy(normed.module)
    if not (norm - raw >= HINT_GAIN and 1.0 - norm <= (1.0 - raw) / 2):
        return None
    flags = f"--mean {','.join(f'{v:g}' for v in mean)} --std {','.join(f'{v:g}' for v in std)}"
    msg = (f"the model scores {raw:.0%} on these inputs but {norm:.0%} with the usual {name} normalization "
           f"({len(idx)} samples): it probably expects normalized input; rerun with {flags} "
           "(or the values it was trained with)")
    return {"dataset": name, "mean": mean, "std": std, "accuracy_raw": raw, "accuracy_normalized": norm,
            "samples": int(len(idx)), "flags": flags, "message": msg}
