"""Input normalization: find it inside the graph, or prepend one declared by the user.

ε is always measured in raw input space (pixels in [0, 1]). Two cases:

* the ONNX graph starts with an affine normalization (``Sub`` then ``Div`` by constants, or
  ``Mul``/``Add``, per channel or scalar): the model already takes pixels; we only *report* it
  (``Normalization(inside=True)``) so that users know what ε means, and keep its constants frozen;
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


def _channel_vector(c: np.ndarray, rank: int, channels: int | None) -> np.ndarray | None:
    """A constant broadcast against an input of rank ``rank`` as a per-channel (axis 1) vector
    of length ``channels`` or a scalar (length 1); None for any other broadcast pattern."""
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return c.reshape(1)
    if c.ndim > rank or channels is None or c.size != channels:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return c.reshape(channels)


def detect_normalization(model: onnx.ModelProto) -> FoundNormalization | None:
    """Find ``x -> (Sub|Add|Mul|Div const)+`` right after the single input.

    The chain is composed into ``y = a * x + b`` (per channel); it is a normalization with
    ``mean = -b / a`` and ``std = 1 / a`` when ``a > 0``. The input must feed only this chain
    (otherwise the raw input is used elsewhere and this is not "a normalization in front").
    """
    inits = {t.name: t for t in model.graph.initializer}
    names = {i.name for i in model.graph.input} - set(inits)
    if len(names) != 1:
        return None
    (inp,) = [i for i in model.graph.input if i.name in names]
    dims = inp.type.tensor_type.shape.dim
    rank = len(dims)
    channels = dims[1].dim_value if rank >= 2 and dims[1].HasField("dim_value") else None
    if rank == 0:
        return None
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in set(n.input):
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}

    a = np.ones(1)
    b = np.zeros(1)
    cur = inp.name
    nodes: list[str] = []
    consts: list[str] = []
    while True:
        users = consumers.get(cur, [])
        if len(users) != 1 or cur in outputs:
            break
        n = users[0]
        if n.op_type not in AFFINE_OPS or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            break
        if n.input[0] == cur and n.input[1] in inits:
            cname = n.input[1]
        elif n.input[1] == cur and n.input[0] in inits and n.op_type in ("Add", "Mul"):
            cname = n.input[0]  # commutative
        else:
            break
        vec = _channel_vector(numpy_helper.to_array(inits[cname]), rank, channels)
        if vec is None or not np.all(np.isfinite(vec)):
            break
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
    norm = Normalization(mean=[float(f"{m:.7g}") for m in mean], std=[float(f"{s:.7g}") for s in std], inside=True)
    return FoundNormalization(norm, nodes, consts)


def prepend_normalization(model: CertModel, mean: Sequence[float] | float, std: Sequence[float] | float) -> CertModel:
    """Return a copy of ``model`` that takes raw inputs: ``(x - mean) / std`` goes in front.

    Used for ``--mean/--std`` when the ONNX file expects normalized input. ``mean``/``std`` are
    scalars or one value per channel (axis 1). The constants are buffers (not trained).
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if torch.any(std_t <= 0):
        raise CertonnxError("--std values must be positive")
    sample = model.sample_shape
    n = max(mean_t.numel(), std_t.numel())
    if n > 1:
        if not sample or sample[0] != n:
            raise CertonnxError(
                f"--mean/--std have {n} values but the input has {sample[0] if sample else 0} channels (axis 1)"
            )
        if mean_t.numel() not in (1, n) or std_t.numel() not in (1, n):
            raise CertonnxError("--mean and --std must have the same number of values (or one)")
    view = (n,) + (1,) * max(len(sample) - 1, 0) if n > 1 else ()
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
    norm = Normalization(mean=[float(v) for v in mean_t.expand(n)], std=[float(v) for v in std_t.expand(n)], inside=False)
    assert isinstance(gm, fx.GraphModule)
    return replace(model, module=gm, normalization=norm)
