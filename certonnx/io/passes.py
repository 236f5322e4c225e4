"""Import passes on ``onnx.ModelProto``: make what exporters write convertible and batch-dynamic.

Each pass is one small function ``ModelProto -> ModelProto`` (working on a copy, never on the
caller's proto) so that it can be tested on its own. :func:`run_passes` chains them in the order
the loader needs and returns human-readable notes on what was changed.

Why these passes exist:

* onnx2torch 1.5.15 has converters up to opset 18; opset 19+ graphs (dynamo exporter, jax2onnx)
  are converted down to 17 with ``onnx.version_converter``; very old graphs (< 7) up to 9.
* ``Reshape(allowzero=1)`` (dynamo exporter) is refused by onnx2torch; when the shape is a constant
  without a 0 entry, ``allowzero`` makes no difference and is dropped.
* ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains (``x.view(x.size(0), -1)``) are
  folded to constants. The batch entry is written as ``0`` ("copy dim 0 of the data"), so the
  graph stays batch-dynamic.
* Models exported with a fixed batch (VNN-COMP: input ``[1, 784, 1]``) get a symbolic batch
  dimension; ``Reshape`` constants whose first entry is that fixed batch, applied to a tensor
  whose first dim is the batch, get ``0`` there (same result at the fixed batch, correct for any
  batch). The loader's parity gate checks batch 1 and 2 afterwards.
* ``Identity`` and ``Dropout`` (inference: identity) nodes are removed; ``Constant`` nodes become
  initializers so that their float weights can become trainable parameters.
* GELU: opset-20 ``Gelu`` (which ``onnx.version_converter`` cannot take below 20) and the
  erf/tanh decompositions exporters write below opset 20 become one onnxruntime contrib node
  (``com.microsoft:Gelu`` / ``FastGelu``, converted to ``nn.GELU`` by
  :mod:`certonnx.io.converters`), so that a GELU is bounded as one function.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from certonnx.errors import ModelLoadError

BATCH_DIM = "batch"
TARGET_OPSET = 17
#: onnx2torch 1.5.15 knows converters up to this opset
MAX_OPSET = 18
MIN_OPSET = 7
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
#: Size limits checked before anything is allocated (:func:`check_sizes`). Far above what any
#: verifier handles (a 3x1024x1024 image has 3 M values), and low enough that a corrupt or hostile
#: file declaring a 10^9-wide input or a 40 GB intermediate gets a one-line error instead of
#: an 8 GB ``torch.zeros`` that has the process OOM-killed.
MAX_SAMPLE_VALUES = 1 << 24
MAX_TENSOR_BYTES = 1 << 28
#: largest tensor rank an ``axis``/``axes`` attribute may refer to
MAX_RANK = 64
#: ops whose outputs are (small) integer shape-like values and can be folded when their
#: inputs are constants or shapes of tensors
SHAPE_OPS = {
    "Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice", "Mul", "Add", "Sub",
    "Div", "Reshape", "Identity", "ConstantOfShape", "Range", "Equal", "Where", "Expand", "ReduceProd",
    "Neg", "Max", "Min", "Floor", "Ceil", "Sqrt",
}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def main_opset(model: onnx.ModelProto) -> int:
    """The default-domain (``ai.onnx``) opset of ``model``."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (old exporters list weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}


def _consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i:
                out.setdefault(i, []).append((n, k))
    return out


def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new


def _const_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """Value of ``name`` when it is an initializer (after :func:`constants_to_initializers`)."""
    t = _initializers(model).get(name)
    return None if t is None else numpy_helper.to_array(t)


def _dim0(vi: onnx.ValueInfoProto) -> onnx.TensorShapeProto.Dimension | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape") or len(tt.shape.dim) == 0:
        return None
    return tt.shape.dim[0]


def depends_on_input(model: onnx.ModelProto) -> set[str]:
    """Names of all values computed from the graph's (real) inputs."""
    dep = {i.name for i in real_inputs(model)}
    for n in model.graph.node:  # nodes are topologically sorted in valid ONNX
        if any(i in dep for i in n.input if i):
            dep.update(o for o in n.output if o)
    return dep


def remove_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on."""
    m = copy.deepcopy(model)
    needed = {o.name for o in m.graph.output}
    keep: list[onnx.NodeProto] = []
    for n in reversed(list(m.graph.node)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used_inits = [t for t in m.graph.initializer if t.name in needed]
    del m.graph.initializer[:]
    m.graph.initializer.extend(used_inits)
    vis = [v for v in m.graph.value_info if v.name in needed]
    del m.graph.value_info[:]
    m.graph.value_info.extend(vis)
    return m


# --------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------
def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference; a model on which it fails is returned unchanged (it is only a help).

    For reading shapes only: the contrib GELU nodes of :func:`fuse_gelu` are element-wise but
    unknown to ONNX's shape inference, which would stop at the first of them, so they are
    inferred as ``Identity`` (and come back as such in the returned model)."""
    probe = model
    if any(n.domain == CONTRIB_DOMAIN and n.op_type in _CONTRIB_GELU for n in model.graph.node):
        probe = copy.deepcopy(model)
        for n in probe.graph.node:
            if n.domain == CONTRIB_DOMAIN and n.op_type in _CONTRIB_GELU:
                n.domain, n.op_type = "", "Identity"
                del n.attribute[:]
    try:
        return onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        return copy.deepcopy(model)


def type_name(elem_type: int) -> str:
    """``FLOAT``, ``INT64``, ...; a corrupt file may hold a number no enum value has."""
    try:
        return str(TensorProto.DataType.Name(elem_type))
    except ValueError:
        return f"{elem_type} (no such type)"


def _itemsize(elem_type: int) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:  # noqa: BLE001 - undefined / string / exotic types
        return 4


def _fmt_dims(dims: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


_KNOWN_TYPES = set(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}
#: sub-byte element types: raw data packs 8 // bits values per byte
_PACKED_BITS = {getattr(TensorProto, n): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2),
                                                         ("UINT2", 2)) if hasattr(TensorProto, n)}


def _raw_bytes(dims: list[int], elem_type: int) -> int | None:
    """Bytes the raw data of a tensor of this shape and type must hold (None: variable, e.g. strings)."""
    if elem_type == TensorProto.STRING or elem_type not in _KNOWN_TYPES:
        return None
    n = math.prod(int(d) for d in dims)
    bits = _PACKED_BITS.get(elem_type)
    if bits is not None:
        return -(-n * bits // 8)
    try:
        return n * int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:  # noqa: BLE001 - a type numpy cannot represent: let onnx decide later
        return None


def check_sizes(model: onnx.ModelProto) -> None:
    """Refuse declared sizes no model certonnx can handle, before anything is allocated.

    Checked: every sample dimension of the real inputs (positive, at most
    :data:`MAX_SAMPLE_VALUES` values per sample), and the per-sample size of every initializer,
    ``Constant`` tensor and shape-inferred value (at most :data:`MAX_TENSOR_BYTES`; symbolic
    dimensions count as 1). A file can declare ``dims = [4, 10**12]`` with 16 bytes of data, or
    an ``Expand`` to 10^10 values: both would otherwise be allocated by onnxruntime or torch.
    """
    for inp in real_inputs(model):
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        n = 1
        for k, d in enumerate(dims[1:], 1):
            if isinstance(d, int):
                if d <= 0:
                    raise ModelLoadError(f"input {inp.name!r} has shape {_fmt_dims(dims)}: dimension {k} is {d}, "
                                         "every sample dimension must be positive")
                n *= d
        if n > MAX_SAMPLE_VALUES:
            raise ModelLoadError(f"input {inp.name!r} has shape {_fmt_dims(dims)}: {n:,} values per sample, more "
                                 f"than certonnx handles ({MAX_SAMPLE_VALUES:,}); is the file corrupt?")
        # a fixed batch is how the file must be run (onnxruntime re-checks run it in chunks of that
        # size): a whole fixed-shape input must be as small as one sample may be
        if dims and isinstance(dims[0], int) and (dims[0] < 0 or dims[0] * n > MAX_SAMPLE_VALUES):
            raise ModelLoadError(f"input {inp.name!r} has shape {_fmt_dims(dims)}: a fixed batch of {dims[0]:,} is "
                                 f"not usable (at most {MAX_SAMPLE_VALUES:,} values per run); is the file corrupt?")

    def too_big(dims: list[int], elem_type: int) -> int | None:
        n = 1
        for d in dims:
            n *= max(int(d), 1)
        b = n * _itemsize(elem_type)
        return b if b > MAX_TENSOR_BYTES else None

    def tensors() -> list[tuple[str, onnx.TensorProto]]:
        out = [("initializer", t) for t in model.graph.initializer]
        for nd in model.graph.node:
            for a in nd.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    label = nd.name or (nd.output[0] if nd.output else "?")
                    out.append((f"{nd.op_type} node {label!r}:", a.t))
        return out

    for what, t in tensors():
        b = too_big(list(t.dims), t.data_type)
        if b is not None:
            raise ModelLoadError(f"{what} {t.name!r} declares shape {_fmt_dims(list(t.dims))} ({b:,} bytes), more "
                                 f"than certonnx handles ({MAX_TENSOR_BYTES:,} bytes per tensor); is the file corrupt?")
        if t.data_type not in _KNOWN_TYPES:
            raise ModelLoadError(f"{what} {t.name!r} has element type {type_name(t.data_type)}; is the file corrupt?")
        # the checker refuses too little raw data; too much means the shape or type is wrong too (the
        # converter would fail later with a numpy reshape error blamed on the consuming op)
        need = _raw_bytes(list(t.dims), t.data_type)
        if t.HasField("raw_data") and need is not None and len(t.raw_data) != need:
            raise ModelLoadError(f"{what} {t.name!r} holds {len(t.raw_data):,} bytes but declares shape "
                                 f"{_fmt_dims(list(t.dims))} of {type_name(t.data_type)} ({need:,} bytes); "
                                 "is the file corrupt?")
    # element types no ONNX type has (a flipped byte): readers of the declared types would crash
    for kind, vis in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in vis:
            et = vi.type.tensor_type.elem_type
            if vi.type.HasField("tensor_type") and et not in _KNOWN_TYPES:
                raise ModelLoadError(f"{kind} {vi.name!r} has element type {type_name(et)}; is the file corrupt?")
    # an axis far beyond any rank: onnx2torch's Gather builds a list of `axis` slices (10^9 of them: 8 GB)
    for nd in model.graph.node:
        for a in nd.attribute:
            if a.name in ("axis", "axes") and any(abs(int(v)) > MAX_RANK for v in [a.i, *a.ints]):
                v = a.i if a.type == onnx.AttributeProto.INT else list(a.ints)
                raise ModelLoadError(f"node {nd.name or (nd.output[0] if nd.output else '?')!r} ({nd.op_type}) has "
                                     f"{a.name}={v}: no tensor has that many dimensions; is the file corrupt?")
    # Range's length depends on its values, which shape inference does not look at
    inits = _initializers(model)
    for nd in model.graph.node:
        if nd.op_type == "Range" and nd.domain in ("", "ai.onnx") and len(nd.input) == 3 and all(
            i in inits for i in nd.input
        ):
            try:
                start, limit, delta = (float(numpy_helper.to_array(inits[i]).reshape(-1)[0]) for i in nd.input)
                count = math.ceil((limit - start) / delta) if delta != 0 else 0
            except (ValueError, IndexError, OverflowError, ZeroDivisionError):
                continue
            if count * _itemsize(inits[nd.input[0]].data_type) > MAX_TENSOR_BYTES:
                raise ModelLoadError(f"Range node {nd.name or nd.output[0]!r} would produce {count:,} values, more "
                                     f"than certonnx handles ({MAX_TENSOR_BYTES:,} bytes per tensor)")
    inferred = infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        sizes = [int(d.dim_value) if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        b = too_big(sizes, tt.elem_type)
        if b is not None:
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            raise ModelLoadError(f"value {vi.name!r} would have shape {_fmt_dims(shown)} ({b:,} bytes per sample), "
                                 f"more than certonnx handles ({MAX_TENSOR_BYTES:,} bytes per tensor)")


def clear_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Forget inferred intermediate shapes (stale after we change the batch dimension)."""
    m = copy.deepcopy(model)
    del m.graph.value_info[:]
    return m


def convert_opset(model: onnx.ModelProto, target: int = TARGET_OPSET) -> onnx.ModelProto:
    """Convert opsets onnx2torch does not know (>= 19, < 7) to ``target`` / 9.

    Models in between are left alone: conversion can only lose information.
    """
    v = main_opset(model)
    if MIN_OPSET <= v <= MAX_OPSET:
        return model
    to = target if v > MAX_OPSET else 9
    try:
        from onnx import version_converter

        out = version_converter.convert_version(model, to)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ModelLoadError(f"cannot convert the model from opset {v} to opset {to}: {' '.join(str(e).split())[:300]}") from e
    return out


def remove_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop graph inputs that are also initializers (IR < 4 exporters list weights as inputs)."""
    m = copy.deepcopy(model)
    keep = real_inputs(m)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn ``Constant`` nodes into initializers (so float weights can become parameters and
    shape chains fold like any other constant)."""
    m = copy.deepcopy(model)
    keep: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type != "Constant" or n.domain not in ("", "ai.onnx") or len(n.attribute) != 1:
            keep.append(n)
            continue
        a = n.attribute[0]
        if a.name == "value":
            arr = numpy_helper.to_array(a.t)
        elif a.name == "value_float":
            arr = np.array(a.f, dtype=np.float32)
        elif a.name == "value_floats":
            arr = np.array(list(a.floats), dtype=np.float32)
        elif a.name == "value_int":
            arr = np.array(a.i, dtype=np.int64)
        elif a.name == "value_ints":
            arr = np.array(list(a.ints), dtype=np.int64)
        else:  # sparse or string constants: leave them to the converter
            keep.append(n)
            continue
        m.graph.initializer.append(numpy_helper.from_array(arr, n.output[0]))
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def remove_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Identity``, ``Dropout`` (inference: both pass their input through) and ``Cast``
    to the type the value already has (skl2onnx casts its float input to float).

    A Dropout whose mask output is used, or an Identity between the graph input and a graph
    output, is kept.
    """
    m = copy.deepcopy(model)
    if any(n.op_type == "Cast" for n in m.graph.node):
        types = _value_types(m)
        for n in m.graph.node:
            to = [a.i for a in n.attribute if a.name == "to"]
            if n.op_type == "Cast" and to and types.get(n.input[0]) == to[0]:
                n.op_type = "Identity"
                del n.attribute[:]
    outputs = {o.name for o in m.graph.output}
    used = {i for n in m.graph.node for i in n.input}
    keep: list[onnx.NodeProto] = []
    for n in m.graph.node:
        removable = n.op_type in ("Identity", "Dropout") and n.domain in ("", "ai.onnx") and n.input[0]
        if removable and n.op_type == "Dropout" and len(n.output) > 1 and n.output[1] and (
            n.output[1] in used or n.output[1] in outputs
        ):
            removable = False
        if not removable:
            keep.append(n)
            continue
        src, dst = n.input[0], n.output[0]
        if dst in outputs:
            producer = _producers(m).get(src)
            if producer is None or src in outputs:  # graph input -> output, or output fan-out: keep
                keep.append(n)
                continue
            # the producer writes the graph output directly
            for k, o in enumerate(producer.output):
                if o == src:
                    producer.output[k] = dst
            _rename_input(m, src, dst)
        else:
            _rename_input(m, dst, src)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def fix_reshape_allowzero(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Reshape(allowzero=1)`` with a constant shape free of zeros is a plain ``Reshape``."""
    m = copy.deepcopy(model)
    inits = _initializers(m)
    for n in m.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        attrs = [a for a in n.attribute if a.name == "allowzero"]
        if not attrs or attrs[0].i == 0 or n.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[n.input[1]])
        if not np.any(shape == 0):
            n.attribute.remove(attrs[0])
    return m


def normalize_gemm_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``Gemm`` a 1-D bias so onnx2torch makes an ``nn.Linear`` (which every bound method
    knows) instead of a generic ``OnnxGemm``: ``beta=0`` drops C; a scalar or ``(1, N)`` constant
    C becomes ``beta * C`` broadcast to ``(N,)`` (jax2onnx writes both)."""
    m = copy.deepcopy(model)
    inits = _initializers(m)
    changed = False
    for n in m.graph.node:
        if n.op_type != "Gemm" or len(n.input) < 3 or not n.input[2] or n.input[1] not in inits:
            continue
        if n.input[2] not in inits:
            continue
        attrs = {a.name: a for a in n.attribute}
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 2:
            continue
        n_out = w.shape[0] if trans_b else w.shape[1]
        c = numpy_helper.to_array(inits[n.input[2]])
        if beta == 0.0:
            del n.input[2]
            changed = True
            continue
        if c.ndim == 1 and c.shape[0] == n_out:
            continue
        if c.size == 1 or (c.ndim == 2 and c.shape == (1, n_out)):
            bias = (np.broadcast_to(c.reshape(-1), (n_out,)) * beta).astype(c.dtype)
            name = f"{n.input[2]}__bias_{n.name or n.output[0]}"
            m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias), name))
            n.input[2] = name
            if "beta" in attrs:
                n.attribute.remove(attrs["beta"])
            changed = True
    return remove_dead_nodes(m) if changed else model


def max_zero_to_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Max(x, 0)`` with a constant scalar 0 is ``Relu(x)`` (jax2onnx writes ``jnp.maximum``)."""
    m = copy.deepcopy(model)
    inits = _initializers(m)
    changed = False
    for n in m.graph.node:
        if n.op_type != "Max" or len(n.input) != 2 or n.domain not in ("", "ai.onnx"):
            continue
        for k in (0, 1):
            c = n.input[k]
            if c in inits:
                arr = numpy_helper.to_array(inits[c])
                if arr.size == 1 and float(arr.reshape(-1)[0]) == 0.0:
                    x = n.input[1 - k]
                    del n.input[:]
                    n.input.append(x)
                    n.op_type = "Relu"
                    changed = True
                    break
    return remove_dead_nodes(m) if changed else model


# --------------------------------------------------------------------------------------------
# GELU: opset-20 Gelu and the exporters' decompositions become one contrib node
# --------------------------------------------------------------------------------------------
#: onnxruntime's contrib domain, whose ``Gelu`` (erf form) and ``FastGelu`` (tanh form) hold a
#: fused GELU at any opset (see :mod:`certonnx.io.converters`)
CONTRIB_DOMAIN = "com.microsoft"
_CONTRIB_GELU = ("Gelu", "FastGelu")
#: relative tolerance on the constants of a decomposed GELU (1/√2 or √2, 0.5, 1, √(2/π),
#: 0.044715): 2⁻²² is four float32 ulps at most. The fused node computes GELU with the exact
#: constants; the difference this tolerance allows is inside the error allowance of the GELU
#: bound rule (:data:`certonnx.bounds.rounding.GELU_ERROR_REL`): with ``h ≈ ½``, ``b ≈ 1`` and the
#: inner scale off by relative ``τ`` each, ``|h·x·(b + erf(s·x)) − gelu(x)| ≤ 1.5·τ·|x|`` (outer
#: constants) ``+ ½|x|·erf'·|Δs·x| ≤ 0.3·τ`` (inner scale: ``max ½|x|·(2/√π)e^{−x²/2}|x|/√2 = 0.294``;
#: tanh form, ``max ½|x|·sech²(z)·√(2/π)(|x| + 2·0.044715|x|³) = 0.274``).
GELU_CONST_RTOL = 2.0**-22
_GELU_CONSTS = {
    "sqrt2": math.sqrt(2.0), "rsqrt2": math.sqrt(0.5), "half": 0.5, "one": 1.0,
    "k_tanh": math.sqrt(2.0 / math.pi), "c_tanh": 0.044715, "three": 3.0,
}


def _ensure_contrib_opset(m: onnx.ModelProto) -> bool:
    """Import the contrib domain (version 1) into ``m``; False when it is imported with another
    version (then no contrib node is written: its converter is registered for version 1)."""
    for o in m.opset_import:
        if o.domain == CONTRIB_DOMAIN:
            return int(o.version) == 1
    m.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return True


def gelu_to_contrib(model: onnx.ModelProto) -> onnx.ModelProto:
    """Opset-20 ``Gelu`` → ``com.microsoft:Gelu`` (``approximate="none"``) or ``FastGelu``
    (``"tanh"``): ``onnx.version_converter`` has no adapter below opset 20 (it asserts "No
    Previous Version of Gelu exists"), and onnx2torch no converter. Same function, computed by
    onnxruntime's own GELU kernels."""
    if not any(n.op_type == "Gelu" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    m = copy.deepcopy(model)
    if not _ensure_contrib_opset(m):
        return model
    for n in m.graph.node:
        if n.op_type != "Gelu" or n.domain not in ("", "ai.onnx"):
            continue
        approx = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "approximate"), b"none")
        approx = approx.decode() if isinstance(approx, bytes) else str(approx)
        if approx not in ("none", "tanh"):
            raise ModelLoadError(f"Gelu node {n.name or n.output[0]!r} has approximate={approx!r} "
                                 "(ONNX defines 'none' and 'tanh')")
        n.op_type = "FastGelu" if approx == "tanh" else "Gelu"
        n.domain = CONTRIB_DOMAIN
        del n.attribute[:]
    return m


class _Graph:
    """Producers, consumers and scalar constants of a model, for pattern matching."""

    def __init__(self, m: onnx.ModelProto) -> None:
        self.prod = _producers(m)
        self.cons = _consumers(m)
        self.inits = _initializers(m)
        self.outputs = {o.name for o in m.graph.output}

    def const(self, name: str, key: str) -> bool:
        """``name`` is a float32 scalar initializer within :data:`GELU_CONST_RTOL` of the
        constant ``key``. Rank ≤ 1 only, so it cannot broadcast the other operand to more axes."""
        t = self.inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT:
            return False
        a = numpy_helper.to_array(t)
        if a.size != 1 or a.ndim > 1:
            return False
        want = _GELU_CONSTS[key]
        return abs(float(a.reshape(-1)[0]) - want) <= GELU_CONST_RTOL * want

    def sole_use(self, name: str) -> onnx.NodeProto | None:
        """The one node that reads ``name`` (None: several readers, or a graph output)."""
        users = self.cons.get(name, [])
        if name in self.outputs or len(users) != 1 or list(users[0][0].input).count(name) != 1:
            return None
        return users[0][0]

    def node(self, name: str, op: str) -> onnx.NodeProto | None:
        n = self.prod.get(name)
        if n is None or n.op_type != op or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or len(n.output) != 1:
            return None
        return n

    def other(self, n: onnx.NodeProto, name: str) -> str:
        """The operand of the binary node ``n`` that is not ``name``."""
        return n.input[1] if n.input[0] == name else n.input[0]

    def scaled(self, name: str, op: str, key: str) -> tuple[str, onnx.NodeProto] | None:
        """``name = op(x, c)`` (or ``op(c, x)`` for Mul/Add) with ``c`` the constant ``key``:
        ``(x, node)``."""
        n = self.node(name, op)
        if n is None:
            return None
        a, b = n.input
        if self.const(b, key) and not self.const(a, key):
            return a, n
        if op in ("Mul", "Add") and self.const(a, key):
            return b, n
        return None


def _gelu_product(g: _Graph, a: str, x: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``a`` (= 1 + erf(·) or 1 + tanh(·)) times ``x`` times 0.5, in any order and association:
    ``(x·a)·½``, ``(a·x)·½``, ``(a·½)·x``, ``(x·½)·a``, ``x·(a·½)``, ... Returns the product's
    output and its Mul nodes; None when the pattern is not there."""
    m1 = g.sole_use(a)
    if m1 is None or m1.op_type != "Mul" or m1.domain not in ("", "ai.onnx") or len(m1.input) != 2:
        return None
    o = g.other(m1, a)
    p = m1.output[0]
    if o == x or g.const(o, "half"):  # (a·x)·½ or (a·½)·x: one more Mul by the missing factor
        m2 = g.sole_use(p)
        if m2 is None or m2.op_type != "Mul" or m2.domain not in ("", "ai.onnx") or len(m2.input) != 2:
            return None
        rest = g.other(m2, p)
        ok = g.const(rest, "half") if o == x else rest == x
        return (m2.output[0], [m1, m2]) if ok else None
    mh = g.node(o, "Mul")  # a·(x·½)
    if mh is not None and g.sole_use(o) is m1:
        s = g.scaled(o, "Mul", "half")
        if s is not None and s[0] == x:
            return p, [mh, m1]
    return None


def _match_erf_gelu(g: _Graph, erf: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """``x·½·(1 + erf(x/√2))`` (``x/√2`` also as ``x·(1/√2)``) ending at ``erf``'s consumers:
    ``(x, output, nodes)``."""
    t = erf.input[0]
    if g.sole_use(t) is not erf:
        return None
    s = g.scaled(t, "Div", "sqrt2") or g.scaled(t, "Mul", "rsqrt2")
    if s is None:
        return None
    x, scale = s
    add = _plus_one(g, erf.output[0])
    if add is None:
        return None
    prod = _gelu_product(g, add.output[0], x)
    return None if prod is None else (x, prod[0], [scale, erf, add, *prod[1]])


def _plus_one(g: _Graph, name: str) -> onnx.NodeProto | None:
    """The sole consumer of ``name`` when it is ``name + 1`` (a plain two-input ``Add`` with the
    constant one), else None: the ``1 + erf(·)`` / ``1 + tanh(·)`` of both GELU forms."""
    add = g.sole_use(name)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    return add if g.const(g.other(add, name), "one") else None


def _match_cube(g: _Graph, name: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``name = x³`` as ``Pow(x, 3)``, ``x·(x·x)`` or ``(x·x)·x``: ``(x, nodes)``."""
    n = g.prod.get(name)
    if n is None or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
        return None
    if n.op_type == "Pow" and g.const(n.input[1], "three"):
        return n.input[0], [n]
    if n.op_type != "Mul":
        return None
    for x, sq in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
        q = g.node(sq, "Mul")
        if q is not None and list(q.input) == [x, x] and g.sole_use(sq) is n:
            return x, [q, n]
    return None


def _match_tanh_gelu(g: _Graph, tanh: onnx.NodeProto) -> tuple[str, str, list[onnx.NodeProto]] | None:
    """``x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` ending at ``tanh``'s consumers."""
    zname = tanh.input[0]
    if g.sole_use(zname) is not tanh:
        return None
    s = g.scaled(zname, "Mul", "k_tanh")
    if s is None or g.sole_use(s[0]) is not s[1]:
        return None
    inner, kmul = s
    add = g.node(inner, "Add")
    if add is None:
        return None
    for x, mname in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        c = g.scaled(mname, "Mul", "c_tanh")
        if c is None or g.sole_use(mname) is not add or g.sole_use(c[0]) is not c[1]:
            continue
        cube = _match_cube(g, c[0])
        if cube is None or cube[0] != x:
            continue
        one = _plus_one(g, tanh.output[0])
        if one is None:
            return None
        prod = _gelu_product(g, one.output[0], x)
        if prod is None:
            return None
        return x, prod[0], [*cube[1], c[1], add, kmul, tanh, one, *prod[1]]
    return None


def fuse_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fuse the decomposed GELUs that exporters write below opset 20 into one contrib node:

    * erf form (``torch.nn.GELU()``): ``x·½·(1 + erf(x/√2))``, → ``com.microsoft:Gelu``;
    * tanh form (``GELU(approximate="tanh")``): ``x·½·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``,
      with ``x³`` as ``Pow(x, 3)`` or two Muls, → ``com.microsoft:FastGelu``.

    The three factors of the outer product may come in any order and association, the scaling
    of ``x`` as a Div by √2 or a Mul by 1/√2, constants in either operand slot and within
    :data:`GELU_CONST_RTOL`. Every intermediate value must feed only the next node of the
    pattern (and not be a graph output). Why: unfused, the bound engine sees ``x · (1 + erf(…))``,
    a product of two input-dependent tensors, which no bound rule accepts (and bounding it as
    such would lose the correlation); fused, GELU is bounded as one function."""
    if not any(n.op_type in ("Erf", "Tanh") for n in model.graph.node):
        return model
    m = copy.deepcopy(model)
    g = _Graph(m)
    fused: list[tuple[str, str, str, list[onnx.NodeProto]]] = []
    taken: set[int] = set()
    for n in m.graph.node:
        if n.domain not in ("", "ai.onnx") or len(n.input) != 1 or len(n.output) != 1:
            continue
        hit = (_match_erf_gelu(g, n) if n.op_type == "Erf" else
               _match_tanh_gelu(g, n) if n.op_type == "Tanh" else None)
        if hit is None or any(id(k) in taken for k in hit[2]):
            continue
        taken.update(id(k) for k in hit[2])
        fused.append(("Gelu" if n.op_type == "Erf" else "FastGelu", *hit))
    if not fused or not _ensure_contrib_opset(m):
        return model
    last = {id(nodes[-1]): (op, x, out) for op, x, out, nodes in fused}
    keep: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if id(n) in last:
            op, x, out = last[id(n)]
            # at the position of the pattern's last node: x is computed before, out read after
            keep.append(helper.make_node(op, [x], [out], name=f"{n.name or out}__gelu", domain=CONTRIB_DOMAIN))
        elif id(n) not in taken:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return remove_dead_nodes(m)


def select_float_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one output: certonnx certifies one float tensor (logits or scores).

    Classifier exporters (skl2onnx) add an integer ``label`` output; when exactly one output is
    a float tensor, it is kept and the rest of the graph pruned.
    """
    if len(model.graph.output) <= 1:
        return model
    floats = [o for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    if len(floats) != 1:
        names = ", ".join(o.name for o in model.graph.output)
        raise ModelLoadError(f"the model has {len(model.graph.output)} outputs ({names}); certonnx needs one float output")
    m = copy.deepcopy(model)
    keep = [o for o in m.graph.output if o.name == floats[0].name]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    return remove_dead_nodes(m)


def check_single_float_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The one real input, or ModelLoadError (several inputs, non-float input)."""
    ins = real_inputs(model)
    if len(ins) != 1:
        names = ", ".join(repr(i.name) for i in ins) or "none"
        raise ModelLoadError(f"the model has {len(ins)} inputs ({names}); certonnx needs exactly one")
    et = ins[0].type.tensor_type.elem_type
    if not ins[0].type.HasField("tensor_type") or et not in FLOAT_TYPES:
        tname = type_name(et) if et else "non-tensor"
        raise ModelLoadError(f"input {ins[0].name!r} has type {tname}; certonnx needs a float input")
    return ins[0]


def make_batch_dynamic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None]:
    """Give input and output a symbolic batch dimension; returns ``(model, fixed_batch)``.

    ``fixed_batch`` is the batch size the file was exported with (None if already dynamic).
    ``Reshape`` constants whose first entry equals that fixed batch, applied to data whose first
    dimension is the batch, get ``0`` in that entry: at the fixed batch it is the same reshape;
    for other batches it copies the batch size.
    """
    m = copy.deepcopy(model)
    inp = check_single_float_input(m)
    d0 = _dim0(inp)
    if d0 is None:
        return m, None
    fixed = d0.dim_value if d0.HasField("dim_value") else None
    if fixed is not None:
        # which values have the batch as first dim: infer shapes at the fixed batch and track
        # values computed from the input whose first dim still equals the fixed batch
        inferred = infer_shapes(m)
        shapes = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
        dep = depends_on_input(m)
        inits = _initializers(m)
        for n in m.graph.node:
            if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in inits or n.input[0] not in dep:
                continue
            shape = numpy_helper.to_array(inits[n.input[1]]).copy()
            data_vi = shapes.get(n.input[0])
            data_d0 = _dim0(data_vi) if data_vi is not None else None
            allowzero = any(a.name == "allowzero" and a.i == 1 for a in n.attribute)
            if (
                shape.ndim == 1 and len(shape) >= 1 and shape[0] == fixed and not allowzero
                and data_d0 is not None and data_d0.HasField("dim_value") and data_d0.dim_value == fixed
            ):
                shape[0] = 0
                name = f"{n.input[1]}__batch0_{n.name or len(m.graph.initializer)}"
                m.graph.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
                n.input[1] = name
        d0.ClearField("dim_value")
        d0.dim_param = BATCH_DIM
    for o in m.graph.output:
        od = _dim0(o)
        if od is not None and od.HasField("dim_value"):
            od.ClearField("dim_value")
            od.dim_param = BATCH_DIM
    m = clear_value_info(m)
    return remove_dead_nodes(m), fixed


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = infer_shapes(model)
    vis = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: v.type.tensor_type.elem_type for v in vis}


def fold_shape_chains(model: onnx.ModelProto, sample_shape: tuple[int, ...] | None = None) -> onnx.ModelProto:
    """Fold ``Shape``/``Gather``/``Concat``/``Unsqueeze``/``Cast`` chains into constants.

    The chain values are computed with onnxruntime at two batch sizes (2 and 3). A value that is
    the same for both is batch-independent and becomes an initializer. A ``Reshape`` shape that
    differs only in its first entry (2 vs 3, the batch) becomes a constant with ``0`` there
    (copy the data's batch), which is what ``x.view(x.size(0), -1)`` means. Anything else stays
    dynamic (it still converts; the bound engine treats it as a shape query).
    """
    if not any(n.op_type in ("Shape", "Size") for n in model.graph.node):
        return model
    m = copy.deepcopy(model)
    inits = set(_initializers(m))
    inp = check_single_float_input(m)
    # values that are functions of constants and tensor shapes only
    shapey: set[str] = set()
    for n in m.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in SHAPE_OPS:
            continue
        if n.op_type in ("Shape", "Size") or all((not i) or i in inits or i in shapey for i in n.input):
            if n.op_type not in ("Shape", "Size") and not any(i in shapey for i in n.input if i):
                continue  # pure constant arithmetic: leave to the converter
            shapey.update(o for o in n.output if o)
    consumers = _consumers(m)
    outputs = {o.name for o in m.graph.output}
    frontier = [
        v for v in sorted(shapey)
        if v in outputs or any(c.output[0] not in shapey for c, _ in consumers.get(v, []))
    ]
    if not frontier:
        return m
    if sample_shape is None:
        sample_shape = _sample_shape(inp)
        if sample_shape is None:
            return m
    values = _evaluate(m, inp, frontier, sample_shape, batches=(2, 3))
    if values is None:
        return m
    changed = False
    for v in frontier:
        a, b = values[0][v], values[1][v]
        const: np.ndarray | None = None
        if a.shape == b.shape and np.array_equal(a, b):
            const = a
        else:
            users = consumers.get(v, [])
            if (
                users and all(c.op_type == "Reshape" and k == 1 for c, k in users)
                and a.ndim == 1 and a.shape == b.shape and a[0] == 2 and b[0] == 3 and np.array_equal(a[1:], b[1:])
                and not np.any(a[1:] == 0)
            ):
                const = a.copy()
                const[0] = 0
                for c, _ in users:  # 0 means "copy", so allowzero must be off
                    for attr in list(c.attribute):
                        if attr.name == "allowzero":
                            c.attribute.remove(attr)
        if const is None:
            continue
        changed = True
        name = f"{v}__folded"
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(const), name))
        _rename_input(m, v, name)
    if not changed:
        return model
    return remove_dead_nodes(m)


def _sample_shape(inp: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    dims = inp.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims[1:]):
        return None
    return tuple(int(d.dim_value) for d in dims[1:])


def _evaluate(
    model: onnx.ModelProto, inp: onnx.ValueInfoProto, names: list[str], sample_shape: tuple[int, ...],
    batches: tuple[int, ...],
) -> list[dict[str, np.ndarray]] | None:
    """Run ``model`` with onnxruntime, returning intermediate values ``names`` per batch size."""

    m = copy.deepcopy(model)
    types = _value_types(m)
    existing = {o.name for o in m.graph.output}
    for v in names:
        if v not in existing:
            m.graph.output.append(helper.make_tensor_value_info(v, types.get(v) or TensorProto.INT64, None))
    try:
        sess = ort_session(m.SerializeToString())
    except Exception:  # noqa: BLE001 - folding is an optimisation: on failure keep the chain
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    out = []
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.random((b, *sample_shape)).astype(dtype)
        try:
            res = sess.run(names, {inp.name: x})
        except Exception:  # noqa: BLE001
            return None
        out.append(dict(zip(names, [np.asarray(r) for r in res])))
    return out


def ort_session(model_bytes: bytes):  # noqa: ANN201 - onnxruntime type is optional at import time
    """A CPU onnxruntime session with graph optimisations off (we compare against raw semantics)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """``{op_type: count}`` (custom domains as ``domain:op``)."""
    c = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node)
    return dict(sorted(c.items()))


# --------------------------------------------------------------------------------------------
PASSES: list[tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]]] = [
    ("remove initializer inputs", remove_initializer_inputs),
    ("Gelu to contrib Gelu", gelu_to_contrib),
    ("convert opset", convert_opset),
    ("constants to initializers", constants_to_initializers),
    ("select float output", select_float_output),
    ("remove Identity/Dropout", remove_identity),
    ("Reshape allowzero", fix_reshape_allowzero),
    ("Gemm bias to 1-D", normalize_gemm_bias),
    ("Max(x, 0) to Relu", max_zero_to_relu),
    ("fuse GELU", fuse_gelu),
]


def run_passes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Run the import pipeline; returns the rewritten model and notes on what changed."""
    notes: list[str] = []
    m = model
    check_sizes(m)  # before any pass or onnxruntime run allocates what the file declares
    v0 = main_opset(m)
    for name, fn in PASSES:
        before = m.SerializeToString(deterministic=True)
        m = fn(m)
        if m.SerializeToString(deterministic=True) != before:
            notes.append(name)
    if main_opset(m) != v0:
        notes.append(f"opset {v0} -> {main_opset(m)}")
    check_single_float_input(m)
    m, fixed = make_batch_dynamic(m)
    if fixed is not None:
        notes.append(f"batch dimension made dynamic (file fixed it to {fixed})")
    before = len(m.graph.node)
    m = fold_shape_chains(m)
    if len(m.graph.node) != before:
        notes.append(f"folded {before - len(m.graph.node)} shape nodes")
    m = fix_reshape_allowzero(m)
    check_sizes(m)  # folded shapes may now be known
    return m, notes
